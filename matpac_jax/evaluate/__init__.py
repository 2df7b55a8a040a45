"""Evaluation: linear probes on frozen embeddings (harness) and the downstream dataset adapters (datasets)."""

from matpac_jax.evaluate.harness import evaluate_task, probe_split, stratified_split

__all__ = ["evaluate_task", "probe_split", "stratified_split"]
