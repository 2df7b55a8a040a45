"""Starting a run from stored weights, one path for every method (big_vision's ``model_init``): the method's
``StepProgram.initial_weights(abstract)`` reads its files (through ``load_model`` or a published reader) and returns
a nested dict that mirrors part of the state; here each array is checked against the state's leaf at that path
(``ConfigError`` naming every path whose shape differs, or that the state lacks), cast to the leaf's dtype and placed
with the leaf's sharding, and replaces that leaf in the freshly initialised state. A resumed run restores its
checkpoint instead: stored weights only seed step 0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from matpac_jax import parallel
from matpac_jax.config_lib import ConfigError


def _leaves(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, (*prefix, key)).items()}
    return {prefix: tree}


def _get(state: Any, path: tuple) -> Any:
    node = state
    for key in path:
        node = getattr(node, key) if not isinstance(node, dict) else node[key]
    return node


def _set(state: Any, path: tuple, value: Any) -> Any:
    """``state`` with the leaf at ``path`` replaced (dataclass fields by ``replace``, dicts copied)."""
    key, rest = path[0], path[1:]
    if isinstance(state, dict):
        return state | {key: _set(state[key], rest, value) if rest else value}
    return state.replace(**{key: _set(getattr(state, key), rest, value) if rest else value})


def check_weights(weights: dict, abstract: Any, source: str = "the stored weights") -> dict[tuple, np.ndarray]:
    """{path: host array cast to the state's dtype} of ``weights``; ConfigError listing every misfit: a shape that
    differs, a path the state lacks, a leaf of the state missing from a group the weights give (a group: the first
    two keys of a path, e.g. params/encoder: a group is replaced whole)."""
    out: dict[tuple, np.ndarray] = {}
    bad: list[str] = []
    given = _leaves(weights)
    for group in {path[:2] for path in given}:
        try:
            leaves = jax.tree_util.tree_leaves_with_path(_get(abstract, group))
        except (AttributeError, KeyError, TypeError):
            continue  # reported below, per leaf
        for sub, _ in leaves:
            path = (*group, *(getattr(k, "key", getattr(k, "name", k)) for k in sub))
            if path not in given:
                bad.append(f"{'/'.join(map(str, path))}: missing")
    for path, array in given.items():
        name = "/".join(map(str, path))
        try:
            leaf = _get(abstract, path)
        except (AttributeError, KeyError, TypeError):
            bad.append(f"{name}: not in the state")
            continue
        if np.shape(array) != tuple(leaf.shape):
            bad.append(f"{name}: stored {np.shape(array)}, state {tuple(leaf.shape)}")
            continue
        out[path] = np.asarray(array, leaf.dtype)
    if bad:
        raise ConfigError(f"{source}: the stored weights do not fit the model: {'; '.join(sorted(bad))}")
    return out


def with_initial_weights(
    init_fn: Callable, abstract: Any, weights: dict, source: str = "the stored weights"
) -> Callable:
    """``init_fn`` (rng -> sharded state) whose leaves at the paths of ``weights`` are the stored arrays (checked
    now, before anything runs; ``source`` names them in errors)."""
    arrays = check_weights(weights, abstract, source)

    def init(rng: jax.Array) -> Any:
        state = init_fn(rng)
        for path, array in arrays.items():
            state = _set(state, path, parallel.place(array, _get(abstract, path).sharding))
        return state

    return init
