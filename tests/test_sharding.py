"""The same steps on 1 device, data=8 and data=4 x fsdp=2 (8 simulated CPU devices), and with the layer scan
under FSDP, agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config

from matpac_jax import parallel
from matpac_jax.matpac import task as pretrain

STEPS = 3


_RUNS = {}


def run_on(mesh_config, devices, **model):
    """Cached per mesh (and model options): every test reuses the same three steps."""
    key = (tuple(sorted(mesh_config.items())), len(devices), tuple(sorted(model.items())))
    if key not in _RUNS:
        _RUNS[key] = _run(mesh_config, devices, model)
    return _RUNS[key]


def _run(mesh_config, devices, model):
    config = load_config()
    config.model.update(model)
    mesh = parallel.make_mesh(mesh_config, devices)
    _, init_fn, step_fn, _ = pretrain.build(config, mesh)
    batches, _ = pretrain.make_input(config)
    state = init_fn(jax.random.key(config.seed))
    losses = []
    for t in range(STEPS):
        state, m = step_fn(state, parallel.global_batch(batches(t), mesh), jax.random.key(t))
        losses.append(float(m["loss"]))
    return np.array(losses), jax.device_get(state), state


@pytest.fixture(scope="module")
def reference():
    return run_on({"data": 1}, jax.devices()[:1])


@pytest.mark.parametrize(
    "mesh_config, model",
    [({"data": 8}, {}), ({"data": 4, "fsdp": 2}, {}), ({"data": 4, "fsdp": 2}, {"scan_layers": True})],
    ids=["data8", "data4_fsdp2", "data4_fsdp2_scan"],
)
def test_losses_and_parameters_agree_across_meshes(reference, mesh_config, model):
    assert len(jax.devices()) >= 8, "conftest sets 8 simulated CPU devices"
    ref_losses, ref_state, _ = reference
    losses, state, _ = run_on(mesh_config, jax.devices()[:8], **model)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_state), jax.tree.leaves(state), strict=True):
        a, b = np.asarray(a), np.asarray(b)  # other meshes reduce in other orders: tolerance of the tensor's scale
        atol = max(1e-6, 1e-5 * float(np.abs(a).max()))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_fsdp_shards_weight_matrices_and_optimizer_moments():
    _, _, state = run_on({"data": 4, "fsdp": 2}, jax.devices()[:8])
    qkv = state.student["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec[0] == "fsdp"
    assert qkv.addressable_shards[0].data.shape[0] == qkv.shape[0] // 2
    mu = [
        x
        for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if parallel.path_name(p).endswith("mu/encoder/blocks_0/attn/qkv/kernel")
    ]
    assert mu and mu[0].sharding.spec[0] == "fsdp"
    bias = state.student["encoder"]["blocks_0"]["attn"]["qkv"]["bias"]
    assert bias.sharding.is_fully_replicated


def test_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.make_mesh({"data": 8, "fsdp": 2}, jax.devices()[:8])
    with pytest.raises(ValueError, match="at most one axis"):
        parallel.make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="unknown axes"):
        parallel.make_mesh({"model": 2})
    mesh = parallel.make_mesh({"data": -1, "fsdp": 2}, jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}


def test_batch_is_split_over_data_parallel_axes():
    mesh = parallel.make_mesh({"data": 4, "fsdp": 2}, jax.devices()[:8])
    batch = parallel.global_batch({"audio": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}, mesh)
    assert batch["audio"].shape == (16, 3)
    assert {s.data.shape for s in batch["audio"].addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(batch["audio"]), np.arange(48).reshape(16, 3))
    assert jnp.sum(batch["audio"]) == 48 * 47 / 2
