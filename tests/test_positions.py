"""Positions beyond the pretraining length as m2d computes them (models.positions): torch's bicubic interpolation in
NumPy, against an independent float64 loop over aten's documented formula and against torch itself when installed."""

import math

import numpy as np
import pytest

from matpac_jax.models.positions import bicubic_resize, m2d_positions
from matpac_jax.models.vit import sincos_pos_embed_2d

SHAPES = [  # (in [H, W], out [H, W]): m2d's 5x38 -> 5x62, down, mixed, single rows / columns
    ((5, 38), (5, 62)),
    ((6, 9), (4, 5)),
    ((3, 4), (7, 11)),
    ((1, 3), (1, 8)),
    ((8, 8), (8, 1)),
]


def torch_formula_bicubic(x: np.ndarray, size: tuple[int, int], align_corners: bool) -> np.ndarray:
    """aten ``upsample_bicubic2d`` (native/UpSample.h, native/cpu/UpSampleKernel.cpp), one output element at a time
    in float64: ``area_pixel_compute_scale`` / ``area_pixel_compute_source_index(cubic=true)`` (the source coordinate,
    not clamped at 0), ``guard_index_and_lambda`` (floor capped at in - 1, fraction clamped to [0, 1]),
    ``get_cubic_upsample_coefficients`` with A = -0.75 (``cubic_convolution1`` / ``2``), and the 4x4 neighbourhood read
    through ``upsample_get_value_bounded`` (indices clamped to the border)."""
    a = -0.75
    conv1 = lambda t: ((a + 2) * t - (a + 3)) * t * t + 1  # noqa: E731
    conv2 = lambda t: ((a * t - 5 * a) * t + 8 * a) * t - 4 * a  # noqa: E731

    def source(i, n_in, n_out):
        if align_corners:
            return i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else 0.0
        return (n_in / n_out) * (i + 0.5) - 0.5

    def guard(real, n_in):
        idx = min(math.floor(real), n_in - 1)
        return idx, min(max(real - idx, 0.0), 1.0)

    h_in, w_in = x.shape[-2:]
    out = np.zeros(x.shape[:-2] + tuple(size))
    for oy in range(size[0]):
        iy, ty = guard(source(oy, h_in, size[0]), h_in)
        wy = [conv2(ty + 1), conv1(ty), conv1(1 - ty), conv2(2 - ty)]
        for ox in range(size[1]):
            ix, tx = guard(source(ox, w_in, size[1]), w_in)
            wx = [conv2(tx + 1), conv1(tx), conv1(1 - tx), conv2(2 - tx)]
            acc = 0.0
            for m in range(4):
                yy = min(max(iy - 1 + m, 0), h_in - 1)
                for n in range(4):
                    xx = min(max(ix - 1 + n, 0), w_in - 1)
                    acc = acc + wy[m] * wx[n] * x[..., yy, xx].astype(np.float64)
            out[..., oy, ox] = acc
    return out


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shapes", SHAPES)
def test_bicubic_resize_is_atens_formula(shapes, align_corners):
    x = np.random.default_rng(0).normal(size=(2, *shapes[0]))
    got = bicubic_resize(x, shapes[1], align_corners)
    np.testing.assert_allclose(got, torch_formula_bicubic(x, shapes[1], align_corners), rtol=0, atol=1e-12)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shapes", SHAPES)
def test_bicubic_resize_equals_torch_interpolate(shapes, align_corners):
    torch = pytest.importorskip("torch", reason="torch is not installed: the comparison with F.interpolate is skipped")
    x = np.random.default_rng(1).normal(size=(1, 3, *shapes[0]))
    f = lambda a: torch.nn.functional.interpolate(  # noqa: E731
        torch.from_numpy(a), size=shapes[1], mode="bicubic", align_corners=align_corners
    ).numpy()
    np.testing.assert_allclose(bicubic_resize(x, shapes[1], align_corners), f(x), rtol=0, atol=1e-12)  # float64
    # float32 as m2d runs it: torch's scale and coefficients in float32 (measured 7e-6 on values of scale 4)
    np.testing.assert_allclose(bicubic_resize(x, shapes[1], align_corners), f(x.astype(np.float32)), atol=2e-5)


def test_m2d_positions_5x38_to_5x62_resamples_time_and_copies_frequency():
    table = sincos_pos_embed_2d(768, 5, 38, cls_row=False)  # [190, 768]
    got = m2d_positions(table, 5, 62)
    assert got.shape == (310, 768) and got.dtype == np.float32
    # timm's resample_abs_pos_embed as m2d calls it: [1, F, T0, D] -> [1, D, F, T0] -> interpolate -> back
    grid = np.moveaxis(table.reshape(1, 5, 38, 768), -1, 1)
    want = np.moveaxis(torch_formula_bicubic(grid, (5, 62), align_corners=False), 1, -1).reshape(310, 768)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # float32 table of values in [-1, 1]
    # the figure the issue quotes: up to 2.02 per element from the exact 5x62 sin-cos table
    assert abs(float(np.max(np.abs(got - sincos_pos_embed_2d(768, 5, 62, cls_row=False)))) - 2.02) < 0.01


def test_m2d_positions_equals_timm_resample_abs_pos_embed_in_torch():
    torch = pytest.importorskip("torch", reason="torch is not installed: the comparison with F.interpolate is skipped")
    pos = sincos_pos_embed_2d(768, 5, 38)[None]  # [1, 191, 768], the published pretrained table with its CLS row
    posemb = torch.from_numpy(pos)
    prefix, rest = posemb[:, :1], posemb[:, 1:]  # timm_layers_pos_embed.py as patched by m2d (patch_m2d.diff)
    rest = rest.reshape(1, 5, 38, -1).permute(0, 3, 1, 2)
    rest = torch.nn.functional.interpolate(rest, size=[5, 62], mode="bicubic")
    want = torch.cat([prefix, rest.permute(0, 2, 3, 1).reshape(1, -1, 768)], dim=1).numpy()
    got = m2d_positions(pos[0, 1:], 5, 62)
    np.testing.assert_array_equal(want[0, 0], pos[0, 0])  # the CLS row is not resampled
    np.testing.assert_allclose(got, want[0, 1:], rtol=0, atol=1e-5)  # measured 1.5e-6 (float32 torch)


def test_m2d_positions_cuts_a_shorter_grid_and_keeps_an_equal_one():
    table = np.random.default_rng(2).normal(size=(5 * 8, 16)).astype(np.float32)
    np.testing.assert_array_equal(m2d_positions(table, 5, 8), table)
    np.testing.assert_array_equal(m2d_positions(table, 5, 3), table.reshape(5, 8, 16)[:, :3].reshape(15, 16))
    with pytest.raises(ValueError, match="not a grid of 3 frequency patches"):
        m2d_positions(table, 3, 8)
