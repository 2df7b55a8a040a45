"""matpac_jax: MATPAC / MATPAC++ self-supervised audio pretraining, S-SONDO distillation and AudioSet fine-tuning in
JAX, and using the trained models (``load_model``)."""


def load_model(path, chunk_batch: int = 16):
    """Any trained model: a model directory, a training workdir or a checkpoint (see ``matpac_jax.load``). Imported
    on first use: ``import matpac_jax`` must not import JAX before a multi-process job initialises it."""
    from matpac_jax.load import load_model as _load

    return _load(path, chunk_batch=chunk_batch)


def load_encoder(path, chunk_batch: int = 16):
    """``load_model`` restricted to ViT encoders (see ``matpac_jax.load.load_encoder``)."""
    from matpac_jax.load import load_encoder as _load

    return _load(path, chunk_batch=chunk_batch)


__all__ = ["load_encoder", "load_model"]
