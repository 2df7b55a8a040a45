"""The ViT backbone every method shares (tokenizer, transformer, positions); method-specific heads live with their
method (matpac_jax.matpac, matpac_jax.distill, matpac_jax.finetune)."""
