"""Tests for matpac_jax.flops: every expectation is a hand count of 2*MACs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from matpac_jax.flops import count_matmul_flops, eqn_matmul_flops, jaxpr_matmul_flops, sub_jaxprs

f32 = jnp.float32


def sds(*shape, dtype=f32):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_single_matmul():
    M, K, N = 3, 5, 7
    assert count_matmul_flops(lambda a, b: a @ b, sds(M, K), sds(K, N)) == 2 * M * K * N


def test_concrete_arrays_and_jaxpr_entry_point():
    a, b = np.ones((4, 6), np.float32), jnp.ones((6, 2))
    assert count_matmul_flops(jnp.dot, a, b) == 2 * 4 * 6 * 2
    closed = jax.make_jaxpr(jnp.dot)(a, b)
    assert jaxpr_matmul_flops(closed) == jaxpr_matmul_flops(closed.jaxpr) == 2 * 4 * 6 * 2
    with pytest.raises(TypeError):
        jaxpr_matmul_flops("not a jaxpr")


def test_batched_einsum():
    B, Q, Kk, D = 2, 5, 7, 16
    f = lambda q, k: jnp.einsum("bqd,bkd->bqk", q, k)
    assert count_matmul_flops(f, sds(B, Q, D), sds(B, Kk, D)) == 2 * B * Q * Kk * D


def test_keyword_arguments_are_traced():
    def f(x, *, w, scale):
        return (x @ w) * scale

    assert count_matmul_flops(f, sds(4, 8), w=sds(8, 3), scale=2.0) == 2 * 4 * 8 * 3


def test_elementwise_not_counted():
    f = lambda x: jnp.sum(jax.nn.softmax(jnp.tanh(x) * 3.0 + 1.0))
    assert count_matmul_flops(f, sds(16, 32)) == 0


B_MLP, D_IN, D_H, D_OUT = 8, 16, 32, 4


def _mlp(params, x):
    h = jax.nn.relu(x @ params["w1"])
    return h @ params["w2"]


MLP_PARAMS = {"w1": sds(D_IN, D_H), "w2": sds(D_H, D_OUT)}
MLP_FWD = 2 * B_MLP * D_IN * D_H + 2 * B_MLP * D_H * D_OUT


def test_mlp_forward():
    assert count_matmul_flops(_mlp, MLP_PARAMS, sds(B_MLP, D_IN)) == MLP_FWD


def test_mlp_grad_wrt_params():
    loss = lambda p, x: jnp.sum(_mlp(p, x) ** 2)
    # backward (input not differentiated): dW2 = h^T g [D_H,B]x[B,D_OUT]; dh = g W2^T [B,D_OUT]x[D_OUT,D_H];
    # dW1 = x^T dh [D_IN,B]x[B,D_H].
    dW2 = 2 * D_H * B_MLP * D_OUT
    dh = 2 * B_MLP * D_OUT * D_H
    dW1 = 2 * D_IN * B_MLP * D_H
    got = count_matmul_flops(jax.grad(loss), MLP_PARAMS, sds(B_MLP, D_IN))
    assert got == MLP_FWD + dW2 + dh + dW1 == 2 * MLP_FWD + 2 * B_MLP * D_H * D_OUT == 22528


def test_mlp_grad_wrt_params_and_input_adds_dx():
    loss = lambda p, x: jnp.sum(_mlp(p, x) ** 2)
    got = count_matmul_flops(jax.grad(loss, argnums=(0, 1)), MLP_PARAMS, sds(B_MLP, D_IN))
    dx = 2 * B_MLP * D_H * D_IN
    assert got == 3 * MLP_FWD == 22528 + dx


def test_remat_inside_grad_counts_recomputation():
    loss = lambda p, x: jnp.sum(_mlp(p, x) ** 2)
    loss_remat = lambda p, x: jnp.sum(jax.checkpoint(_mlp)(p, x) ** 2)
    args = (MLP_PARAMS, sds(B_MLP, D_IN))
    plain = count_matmul_flops(jax.grad(loss), *args)
    remat = count_matmul_flops(jax.grad(loss_remat), *args)
    # The default policy saves nothing: the backward recomputes h = x @ w1 (the output matmul is not needed).
    assert remat == plain + 2 * B_MLP * D_IN * D_H
    # Without differentiation remat is a no-op wrapper.
    assert count_matmul_flops(jax.checkpoint(_mlp), *args) == MLP_FWD


def test_nested_jit():
    inner = jax.jit(lambda a, b: a @ b)

    @jax.jit
    def outer(a, b):
        return inner(inner(a, b), b.T) + jax.jit(lambda z: z @ b.T)(inner(a, b))

    M, N = 4, 6
    # a [M,N], b [N,N]: two nested inner calls + one inner call + one inline jit, each [M,N]x[N,N]
    assert count_matmul_flops(outer, sds(M, N), sds(N, N)) == 4 * 2 * M * N * N


def test_scan_multiplies_by_length():
    L, B, D = 5, 3, 8

    def f(ws, x):
        def layer(h, w):
            return jnp.tanh(h @ w), None

        return lax.scan(layer, x, ws)[0]

    assert count_matmul_flops(f, sds(L, D, D), sds(B, D)) == L * 2 * B * D * D
    # grad through scan: forward + (dW, dh) per layer
    g = jax.grad(lambda ws, x: jnp.sum(f(ws, x)))
    assert count_matmul_flops(g, sds(L, D, D), sds(B, D)) == 3 * L * 2 * B * D * D


def test_fori_loop_static_bounds_is_scan():
    D = 8
    f = lambda x, w: lax.fori_loop(0, 4, lambda i, h: h @ w, x)
    assert count_matmul_flops(f, sds(2, D), sds(D, D)) == 4 * 2 * 2 * D * D


def test_cond_and_switch_take_max_branch():
    D = 8

    def f(p, x, w):
        return lax.cond(p, lambda x: x @ w @ w @ w, lambda x: x @ w, x)

    assert count_matmul_flops(f, sds(dtype=jnp.bool_), sds(2, D), sds(D, D)) == 3 * 2 * 2 * D * D

    def g(i, x, w):
        return lax.switch(i, [lambda x: x, lambda x: x @ w @ w, lambda x: x @ w], x)

    assert count_matmul_flops(g, sds(dtype=jnp.int32), sds(2, D), sds(D, D)) == 2 * 2 * 2 * D * D


def test_custom_jvp_counts_primal_only():
    @jax.custom_jvp
    def f(x, w):
        return x @ w

    @f.defjvp
    def f_jvp(primals, tangents):
        x, w = primals
        dx, _ = tangents
        return f(x, w), (dx @ w) @ jnp.eye(w.shape[1])  # extra matmul only in the jvp rule

    x, w = sds(4, 8), sds(8, 3)
    assert count_matmul_flops(f, x, w) == 2 * 4 * 8 * 3
    # grad wrt x: primal + transpose of (dx @ w) @ eye -> g @ eye^T and (.) @ w^T
    got = count_matmul_flops(jax.grad(lambda x, w: jnp.sum(f(x, w))), x, w)
    assert got == 2 * 4 * 8 * 3 + 2 * 4 * 3 * 3 + 2 * 4 * 3 * 8


def test_custom_vjp_counts_primal_and_traced_bwd():
    @jax.custom_vjp
    def f(x, w):
        return x @ w

    def fwd(x, w):
        return x @ w, (x, w)

    def bwd(res, g):
        x, w = res
        return g @ w.T, x.T @ g

    f.defvjp(fwd, bwd)
    x, w = sds(4, 8), sds(8, 3)
    mm = 2 * 4 * 8 * 3
    assert count_matmul_flops(f, x, w) == mm
    assert count_matmul_flops(jax.grad(lambda x, w: jnp.sum(f(x, w)), argnums=(0, 1)), x, w) == 3 * mm


def test_vmap_of_matmul():
    f = jax.vmap(lambda x, w: x @ w, in_axes=(0, None))
    assert count_matmul_flops(f, sds(5, 4, 8), sds(8, 3)) == 5 * 2 * 4 * 8 * 3


def test_flax_patch_embed_conv():
    B, C_out = 2, 24
    model = nn.Conv(C_out, kernel_size=(16, 16), strides=(16, 16), padding="VALID")
    x = sds(B, 80, 608, 1)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    expected = 2 * B * (5 * 38) * (16 * 16 * 1) * C_out
    assert count_matmul_flops(model.apply, params, x) == expected
    assert expected == 4_669_440
    # weight gradient (input not differentiated) is one conv of the same cost
    g = jax.grad(lambda p, x: jnp.sum(model.apply(p, x) ** 2))
    assert count_matmul_flops(g, params, x) == 2 * expected
    # the input gradient is an lhs-dilated (transposed) conv; its inserted zeros are not counted, so it costs
    # exactly the forward (stride == kernel, VALID) instead of 16*16 times more
    g2 = jax.grad(lambda p, x: jnp.sum(model.apply(p, x) ** 2), argnums=(0, 1))
    assert count_matmul_flops(g2, params, x) == 3 * expected


def test_lhs_dilated_conv_counts_only_real_taps():
    # Brute-force reference: with all-ones operands each output element equals the number of (tap, in-feature)
    # products that hit a real input element, so 2 * sum(output) is the exact non-zero MAC count x 2.
    N, C, C_OUT = 2, 3, 5
    kw = dict(
        window_strides=(1, 2),
        padding=((1, 2), (3, 0)),
        lhs_dilation=(2, 3),
        rhs_dilation=(1, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    f = lambda x, w: lax.conv_general_dilated(x, w, **kw)
    x, w = jnp.ones((N, 7, 6, C)), jnp.ones((3, 4, C, C_OUT))
    reference = 2 * int(jnp.sum(f(x, w)))
    assert count_matmul_flops(f, x, w) == reference
    # grad of a strided SAME conv wrt its input: also checked against the brute-force count
    conv = lambda x, w: lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x, w = jnp.ones((2, 9, 10, 3)), jnp.ones((3, 3, 3, 4))
    dx = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(conv(x, w))))(x)
    convs = [e for e in dx.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    (eqn,) = [e for e in convs if e.params["lhs_dilation"] == (2, 2)]
    ones_out = lax.conv_general_dilated_p.bind(
        jnp.ones(eqn.invars[0].aval.shape), jnp.ones(eqn.invars[1].aval.shape), **eqn.params
    )
    fwd = count_matmul_flops(conv, x, w)  # the primal conv is in the grad jaxpr too
    assert fwd == 2 * (2 * 5 * 5 * 4) * 9 * 3
    assert jaxpr_matmul_flops(dx) == fwd + 2 * int(jnp.sum(ones_out))


def test_conv_layouts_groups_and_padding():
    # NCHW / OIHW, SAME padding, feature groups: out [N, C_OUT, H, W], kernel [C_OUT, C/G, kh, kw]
    N, C, H, W, C_OUT, G, k = 2, 8, 10, 12, 6, 2, 3

    def f(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=G)

    got = count_matmul_flops(f, sds(N, C, H, W), sds(C_OUT, C // G, k, k))
    assert got == 2 * (N * C_OUT * H * W) * (k * k) * (C // G)
    # depthwise, NHWC/HWIO, stride 2, VALID
    dn = ("NHWC", "HWIO", "NHWC")
    g = lambda x, w: lax.conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=dn, feature_group_count=C)
    got = count_matmul_flops(g, sds(N, H, W, C), sds(k, k, 1, C))
    assert got == 2 * (N * ((H - k) // 2 + 1) * ((W - k) // 2 + 1) * C) * (k * k) * 1


def test_conv_batch_group_count():
    # out feature C_OUT must be divisible by batch_group_count; out batch = N / bgc.
    N, C, L, C_OUT, bgc, k = 4, 3, 9, 6, 2, 3
    f = lambda x, w: lax.conv_general_dilated(x, w, (1,), "VALID", batch_group_count=bgc)
    got = count_matmul_flops(f, sds(N, C, L), sds(C_OUT, C, k))
    assert got == 2 * ((N // bgc) * C_OUT * (L - k + 1)) * k * C


def test_flax_dense_bf16_same_as_f32():
    B, T, D, F = 4, 10, 32, 64
    counts = []
    for dtype in (jnp.float32, jnp.bfloat16):
        model = nn.Dense(F, dtype=dtype, param_dtype=dtype)
        x = sds(B, T, D, dtype=dtype)
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
        counts.append(count_matmul_flops(model.apply, params, x))
    assert counts[0] == counts[1] == 2 * B * T * D * F


def test_flax_attention_block():
    B, T, D, H = 2, 12, 32, 4
    model = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D, out_features=D)
    x = sds(B, T, D)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    proj = 4 * 2 * B * T * D * D  # q, k, v, out projections
    attn = 2 * 2 * B * T * T * D  # QK^T and PV over all heads
    assert count_matmul_flops(lambda p, x: model.apply(p, x), params, x) == proj + attn


def test_jax_nn_dot_product_attention():
    B, T, S, N, Hd = 2, 7, 9, 3, 8
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v)
    got = count_matmul_flops(f, sds(B, T, N, Hd), sds(B, S, N, Hd), sds(B, S, N, Hd))
    assert got == 2 * 2 * B * N * T * S * Hd


def test_opaque_attention_primitive_is_not_counted_and_warns():
    # stands for cuDNN's fused attention (model.attn_impl='cudnn'): a primitive with no jaxpr inside
    from jax.extend.core import Primitive

    prim = Primitive("fused_attention_fwd")
    prim.def_abstract_eval(lambda q, k: q)
    f = lambda q, k: prim.bind(q, k) @ k.T
    with pytest.warns(UserWarning, match="fused_attention_fwd"):
        assert count_matmul_flops(f, sds(4, 8), sds(6, 8)) == 2 * 4 * 8 * 6


def test_cudnn_fused_attention_counts_as_xla_attention_does():
    """The primitives jax's cuDNN attention binds (jax/_src/cudnn/fused_attention_stablehlo.py: operands query, key,
    value first; ``layout`` 0 = BTNH) cannot be traced on a CPU, so stand-ins of the same names and operands are
    counted here: forward + backward equal the count of XLA's attention under jax.grad (two matmuls forward, four
    backward), so the MFU of a cuDNN row and of an XLA row compare."""
    from jax.extend.core import Primitive

    B, T, N, H = 2, 12, 3, 8
    fwd, bwd = Primitive("dot_product_attention_fwd_wrapper"), Primitive("dot_product_attention_bwd_wrapper")
    fwd.multiple_results = bwd.multiple_results = True
    fwd.def_abstract_eval(lambda q, k, v, **_: [q])
    bwd.def_abstract_eval(lambda q, k, v, o, do, **_: [q, k, v])
    q = sds(B, T, N, H)

    def fused(q, k, v):
        (o,) = fwd.bind(q, k, v, layout=0)
        return bwd.bind(q, k, v, o, o, layout=0)

    def xla_grad(q, k, v):
        return jax.grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v).sum(), argnums=(0, 1, 2))(q, k, v)

    assert count_matmul_flops(fused, q, q, q) == count_matmul_flops(xla_grad, q, q, q) == 12 * B * N * T * T * H


def test_one_equation_and_the_jaxprs_it_holds():
    """What program_audit walks with: the FLOPs of one matmul equation, the jaxprs held by one equation parameter."""
    closed = jax.make_jaxpr(lambda p, x, w: lax.cond(p, lambda x: jnp.tanh(x @ w), jnp.tanh, x))(
        sds(dtype=jnp.bool_), sds(2, 8), sds(8, 8)
    )
    (cond,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "cond"]
    branches = sub_jaxprs(cond.params["branches"])
    assert len(branches) == 2 and sub_jaxprs(cond.params["branches"][0]) == [branches[0]]
    assert sub_jaxprs(3) == []
    eqns = [e for b in branches for e in b.eqns]
    assert sorted(eqn_matmul_flops(e) for e in eqns) == [0, 0, 2 * 2 * 8 * 8]
