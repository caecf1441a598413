"""Tests for util.pos_embed: sin-cos tables checked by hand, position-table interpolation."""
import math

import numpy as np
import pytest
import torch

import models_vit
from util.pos_embed import (get_1d_sincos_pos_embed_from_grid, get_2d_sincos_pos_embed,
                            interpolate_pos_embed)


def _hand_entry(embed_dim, row, col, channel):
    """The 2-D sin-cos table with python math: first half = width coordinate, second half = height."""
    half = embed_dim // 2
    coord = col if channel < half else row
    k = channel % half
    quarter = half // 2
    i = k % quarter
    omega = 1.0 / 10000 ** (i / quarter)
    return math.sin(coord * omega) if k < quarter else math.cos(coord * omega)


def test_2d_table_hand_values():
    # D=16: half width 8, omega_i = 10000^(-i/4) = 1, 0.1, 0.01, 0.001
    table = get_2d_sincos_pos_embed(16, 4)
    assert table.shape == (16, 16)
    row, col = 1, 2
    pos = row * 4 + col  # row-major grid
    assert table[pos, 0] == pytest.approx(math.sin(2.0), abs=1e-6)   # sin(col * 1)
    assert table[pos, 1] == pytest.approx(math.sin(0.2), abs=1e-6)   # sin(col * 0.1)
    assert table[pos, 3] == pytest.approx(math.sin(0.002), abs=1e-6)
    assert table[pos, 4] == pytest.approx(math.cos(2.0), abs=1e-6)   # cos(col * 1)
    assert table[pos, 8] == pytest.approx(math.sin(1.0), abs=1e-6)   # sin(row * 1)
    assert table[pos, 12] == pytest.approx(math.cos(1.0), abs=1e-6)  # cos(row * 1)
    assert table[pos, 13] == pytest.approx(math.cos(0.1), abs=1e-6)  # cos(row * 0.1)
    # position 0: sin part 0, cos part 1
    assert table[0].tolist() == pytest.approx([0, 0, 0, 0, 1, 1, 1, 1] * 2, abs=1e-7)


@pytest.mark.parametrize("embed_dim,grid", [(32, 5), (64, 14), (24, (3, 5))])
def test_2d_table_against_naive_formula(embed_dim, grid):
    h, w = (grid, grid) if isinstance(grid, int) else grid
    table = get_2d_sincos_pos_embed(embed_dim, grid)
    assert table.shape == (h * w, embed_dim)
    for row in range(h):
        for col in range(w):
            for ch in range(embed_dim):
                assert table[row * w + col, ch] == pytest.approx(
                    _hand_entry(embed_dim, row, col, ch), abs=2e-5), (row, col, ch)


def test_cls_row_is_zero():
    table = get_2d_sincos_pos_embed(16, 3, cls_token=True)
    assert table.shape == (10, 16)
    assert np.all(table[0] == 0)
    np.testing.assert_array_equal(table[1:], get_2d_sincos_pos_embed(16, 3))


def test_1d_table_hand_values():
    out = get_1d_sincos_pos_embed_from_grid(4, np.array([0.0, 1.0, 3.0]))
    # d=4: omega = 1, 0.01
    expected = [[0, 0, 1, 1],
                [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)],
                [math.sin(3), math.sin(0.03), math.cos(3), math.cos(0.03)]]
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_odd_embed_dim_rejected():
    with pytest.raises(ValueError):
        get_2d_sincos_pos_embed(15, 2)


def test_interpolate_noop_when_grids_match():
    model = models_vit.vit_tiny_patch16(img_size=32, depth=1)  # 2x2 grid
    pe = torch.randn(1, 5, 192)
    other = torch.randn(3)
    ckpt = {"pos_embed": pe, "other": other}
    interpolate_pos_embed(model, ckpt)
    assert ckpt["pos_embed"] is pe and ckpt["other"] is other
    assert set(ckpt) == {"pos_embed", "other"}
    interpolate_pos_embed(model, {"no_pos": other})  # no table: nothing to do, no error


def test_interpolate_resizes_and_keeps_cls_and_orientation():
    model = models_vit.vit_tiny_patch16(img_size=48, depth=1)  # 3x3 grid
    D, old = 192, 6
    cls = torch.randn(1, 1, D)
    # channel 0: varies along the width only; channel 1: along the height only; channel 2: constant
    rows, cols = torch.meshgrid(torch.arange(old), torch.arange(old), indexing="ij")
    grid = torch.zeros(old, old, D)
    grid[..., 0] = cols.float()
    grid[..., 1] = rows.float()
    grid[..., 2] = 3.5
    pe = torch.cat([cls, grid.reshape(1, old * old, D)], dim=1)
    ckpt = {"pos_embed": pe}
    interpolate_pos_embed(model, ckpt)
    new = ckpt["pos_embed"]
    assert new.shape == (1, 1 + 9, D)
    torch.testing.assert_close(new[:, :1], cls, rtol=0, atol=0)
    g = new[0, 1:].reshape(3, 3, D)
    # width channel constant down each column, increasing along a row; height channel likewise
    torch.testing.assert_close(g[..., 0], g[:1, :, 0].expand(3, 3))
    assert g[0, 0, 0] < g[0, 1, 0] < g[0, 2, 0]
    torch.testing.assert_close(g[..., 1], g[:, :1, 1].expand(3, 3))
    assert g[0, 0, 1] < g[1, 0, 1] < g[2, 0, 1]
    # by symmetry of the bicubic kernel, a centred 6->3 resize keeps the ramp centred
    assert g[1, 1, 0].item() == pytest.approx(2.5, abs=1e-5)
    torch.testing.assert_close(g[..., 2], torch.full((3, 3), 3.5))
    model.load_state_dict({**model.state_dict(), "pos_embed": new})


def _reference_table(embed_dim, grid):
    """The reference's table entry by entry in float64 (python math), then float32 as the models store it."""
    table = np.zeros((1 + grid * grid, embed_dim))  # the cls row stays zero
    for row in range(grid):
        for col in range(grid):
            table[1 + row * grid + col] = [_hand_entry(embed_dim, row, col, ch) for ch in range(embed_dim)]
    return torch.from_numpy(table).float()


def test_tables_are_bitwise_the_references_float64_ones():
    import models_mae

    expected = _reference_table(768, 14)  # MAE-B: computed in float32 it was up to 1.8e-6 off
    got = torch.from_numpy(get_2d_sincos_pos_embed(768, 14, cls_token=True)).float()
    assert torch.equal(got, expected)
    model = models_mae.mae_vit_tiny_patch16(img_size=224, depth=1, decoder_depth=1)
    assert torch.equal(model.pos_embed[0], _reference_table(192, 14))
    assert torch.equal(model.decoder_pos_embed[0], _reference_table(128, 14))
