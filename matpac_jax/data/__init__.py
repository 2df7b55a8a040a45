"""Data utilities for matpac_jax."""

from matpac_jax.data.demo import CLASS_NAMES, demo_splits, make_demo_corpus

__all__ = ["CLASS_NAMES", "demo_splits", "make_demo_corpus"]
