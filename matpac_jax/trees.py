"""Nested dicts flattened to one level: the one implementation behind weight files ('/'-joined names), published
state dicts ('.'-joined) and config comparisons ('.'-joined, as JSON reads them back)."""

from __future__ import annotations

from collections.abc import Callable, Mapping


def flatten(tree: Mapping, sep: str = "/", leaf: Callable | None = None) -> dict:
    """{'a': {'b': {'c': x}}} -> {'a/b/c': x}, keys joined with ``sep``, in the tree's order; every value that is not
    a dict is a leaf, passed through ``leaf`` when given (e.g. ``np.asarray``). An empty dict leaves no key."""
    out = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}{sep}")
            else:
                out[f"{prefix}{key}"] = value if leaf is None else leaf(value)

    walk(tree, "")
    return out
