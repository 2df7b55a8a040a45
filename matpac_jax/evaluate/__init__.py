"""Evaluation utilities for matpac_jax (linear probes on frozen embeddings)."""

from matpac_jax.evaluate.probe import linear_probe, stratified_split

__all__ = ["linear_probe", "stratified_split"]
