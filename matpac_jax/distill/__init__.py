"""S-SONDO distillation (SPEC §6): teacher embeddings, cluster-balanced sampling, students."""
