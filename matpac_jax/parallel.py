"""Meshes and shardings. Sharding is data: one rules table, applied by path to any state pytree.

Mesh axes: `data` (pure data parallel, parameters replicated), `fsdp` (data parallel with parameters and optimizer
state sharded), optionally `tensor`. The batch is split over (data, fsdp).
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of axes). Axes missing from the mesh are dropped.
LOGICAL_TO_MESH = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",  # model-width dimension of weight matrices: sharded by FSDP
    "mlp": "tensor",
    "heads": "tensor",
}

# Parameter path (regex on 'a/b/c') -> logical axis per dimension: the shared models' (the ViT of models.vit). A
# method adds the rules of its own layers (StepProgram.sharding_rules), tried first. First match wins; unmatched
# leaves (biases, norms, tokens, the step counter) are replicated. Optimizer moments share their parameter's path
# suffix, so they are sharded like the parameter.
PARAM_RULES = (
    (r"attn/qkv/kernel$", ("embed", "heads")),
    (r"attn/proj/kernel$", ("heads", "embed")),
    (r"mlp/fc1/kernel$", ("embed", "mlp")),
    (r"mlp/fc2/kernel$", ("mlp", "embed")),
    (r"tokenizer/proj/kernel$", (None, None, None, "embed")),
)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """Mesh from {'data': n, 'fsdp': m[, 'tensor': t][, 'dcn_data': k]}; one size may be -1 (= the remaining devices).

    ``dcn_data`` = k > 1 makes a hybrid mesh for k slices (multi-slice TPU) or k hosts / nodes (multi-node GPU):
    the other sizes describe one slice (fast ICI / NVLink links), and the ``data`` axis is k times longer, its outer
    factor across the slower data-centre network, so only the data-parallel gradient reduction crosses it. Slices are
    the devices' ``slice_index`` where there are several, else the processes.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(mesh_config) - set(MESH_AXES) - {"dcn_data"}
    if unknown:
        raise ValueError(f"config.mesh: unknown axes {sorted(unknown)}; known: {MESH_AXES} and dcn_data")
    dcn = int(mesh_config.get("dcn_data", 1))
    if dcn < 1 or len(devices) % dcn:
        raise ValueError(f"config.mesh.dcn_data={dcn}: {len(devices)} devices do not split into {dcn} slices")
    per_slice = len(devices) // dcn
    sizes = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES if a in mesh_config}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if per_slice % fixed:
            raise ValueError(f"config.mesh: {per_slice} devices are not divisible by the fixed axes ({fixed})")
        sizes[free[0]] = per_slice // fixed
    total = math.prod(sizes.values()) * dcn
    if total > len(devices):
        raise ValueError(
            f"config.mesh {sizes} x dcn_data {dcn} needs {total} devices, only {len(devices)} are available"
        )
    names = tuple(sizes)
    if dcn == 1:
        grid = np.array(devices[:total]).reshape(tuple(sizes.values()))
    else:
        from jax.experimental import mesh_utils

        if "data" not in names:
            raise ValueError("config.mesh.dcn_data needs a 'data' axis")
        slices = {getattr(d, "slice_index", None) for d in devices}
        dcn_shape = tuple(dcn if a == "data" else 1 for a in names)
        grid = mesh_utils.create_hybrid_device_mesh(tuple(sizes.values()), dcn_shape, devices,
                                                    process_is_granule=len(slices) < 2 or None in slices)  # fmt: skip
        sizes["data"] *= dcn
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def logical_to_spec(logical: tuple, shape: tuple, mesh: Mesh) -> P:
    """PartitionSpec for `shape` from logical axes; a dimension not divisible by its mesh axes stays replicated."""
    spec = []
    for name, dim in zip(logical, shape, strict=True):
        axes = LOGICAL_TO_MESH.get(name) if name else None
        axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in mesh.shape)
        size = math.prod(mesh.shape[a] for a in axes)
        spec.append(None if not axes or size == 1 or dim % size else (axes[0] if len(axes) == 1 else axes))
    return P(*spec)


def path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def spec_for(name: str, shape: tuple, mesh: Mesh, rules: tuple = ()) -> P:
    for pattern, logical in (*rules, *PARAM_RULES):
        if re.search(pattern, name) and len(logical) == len(shape):
            return logical_to_spec(logical, shape, mesh)
    return P()


def state_shardings(tree, mesh: Mesh, rules: tuple = ()):
    """NamedSharding for every leaf of a (possibly abstract) pytree, by ``rules`` (a method's), then the table."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path_name(path), tuple(np.shape(x)), mesh, rules)), tree
    )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes."""
    axes = tuple(a for a in LOGICAL_TO_MESH["batch"] if a in mesh.shape)
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def place(tree, shardings):
    """Host arrays (the same on every process) -> global arrays with ``shardings`` (a matching tree): each process
    puts on its devices only the shards they hold."""
    return jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: a[idx]), tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in LOGICAL_TO_MESH["batch"] if a in mesh.shape)


def global_batch(host_batch: dict, mesh: Mesh) -> dict:
    """This process's slice of the batch -> global jax.Arrays sharded over the data-parallel axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in host_batch.items()
    }
