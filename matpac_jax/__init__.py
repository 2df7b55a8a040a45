"""matpac_jax: MATPAC / MATPAC++ self-supervised audio pretraining in JAX, and using the trained encoders."""


def load_encoder(path: str, chunk_batch: int = 16):
    """An encoder from an encoder directory, a training workdir or a checkpoint (see ``matpac_jax.inference``)."""
    from matpac_jax.inference import load_encoder as _load

    return _load(path, chunk_batch=chunk_batch)


__all__ = ["load_encoder"]
