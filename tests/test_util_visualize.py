"""util/visualize.py: the reconstruction figure's layout (gaps, titles, cells), its mask colour and grey rows."""
import numpy as np
import pytest
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import main_pretrain
import models_mae
from util.visualize import MASK_COLOURS, draw_reconstructions, mask_colour, reconstruct

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
MAGENTA = (255, 0, 255)
WHITE = 255


def _panels(pixels: torch.Tensor, removed: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """reconstruct()'s [N, 4, 3, H, W] normalised panels, built by hand from [N, 3, H, W] pixels in 0..1, an
    [N, H, W] removed mask and [N, 3, H, W] reconstructed pixels."""
    imgs, rec = (pixels - MEAN) / STD, (recon - MEAN) / STD
    keep = (~removed).unsqueeze(1).float()
    return torch.stack([imgs, imgs * keep, rec, imgs * keep + rec * (1 - keep)], dim=1)


def _patch_mask(n: int, size: int, patch: int, seed: int = 0) -> torch.Tensor:
    """[N, size, size] bool: 3 of every 4 patches removed, at random."""
    g = torch.Generator().manual_seed(seed)
    grid = size // patch
    keep = torch.rand(n, grid * grid, generator=g).argsort(dim=1)[:, : grid * grid // 4]
    removed = torch.ones(n, grid * grid, dtype=torch.bool)
    removed[torch.arange(n).unsqueeze(1), keep] = False
    return removed.view(n, grid, grid).repeat_interleave(patch, 1).repeat_interleave(patch, 2)


def _up(a: np.ndarray, scale: int) -> np.ndarray:
    return a.repeat(scale, axis=0).repeat(scale, axis=1)


@pytest.fixture(scope="module")
def grey_figure():
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(3, 1, 32, 32, generator=g).expand(3, 3, 32, 32)  # grey originals
    recon = torch.rand(3, 3, 32, 32, generator=g)  # a reconstruction with a colour cast
    removed = _patch_mask(3, 32, 4)
    return pixels, removed, draw_reconstructions(_panels(pixels, removed, recon), 0.75)


def test_cells_sit_on_a_grid_with_white_gaps(grey_figure):
    _, _, fig = grey_figure
    img = fig.pixels.astype(int)
    assert fig.pixels.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert fig.scale == 4 and fig.gap >= 4  # 32-px panels enlarged to 128-px cells
    band_top, band_bottom = fig.title_band
    assert len(fig.cells) == 3 and all(len(row) == 4 for row in fig.cells)
    for r, row in enumerate(fig.cells):
        for c, (top, left, bottom, right) in enumerate(row):
            assert (bottom - top, right - left) == (128, 128)
            assert top == band_bottom + r * (128 + fig.gap) and left == fig.gap + c * (128 + fig.gap)
    # the whole picture is the cells, the title band and white: gaps between cells, around the grid
    inside = np.zeros(img.shape[:2], dtype=bool)
    inside[band_top:band_bottom] = True
    for row in fig.cells:
        for top, left, bottom, right in row:
            inside[top:bottom, left:right] = True
    assert (img[~inside] == WHITE).all()
    assert img.shape[:2] == (band_bottom + 3 * (128 + fig.gap), 4 * 128 + 5 * fig.gap)
    # the gaps are where expected: full white columns between the cells, full white rows between the rows
    grid = img[band_bottom:]
    for c in range(5):
        x = c * (128 + fig.gap)
        assert (grid[:, x:x + fig.gap] == WHITE).all()
    for r in range(1, 3):
        y = fig.cells[r][0][0]
        assert (img[y - fig.gap:y] == WHITE).all()


def test_titles_name_the_columns_and_stay_in_their_band(grey_figure):
    _, _, fig = grey_figure
    assert fig.titles == ("original", "masked 75%", "reconstruction", "reconstruction + visible")
    img = fig.pixels.astype(int)
    band_top, band_bottom = fig.title_band
    ink = (img[band_top:band_bottom] < 200).any(axis=2)  # dark pixels of the titles' text
    for c, (top, left, bottom, right) in enumerate(fig.title_boxes):
        cell_left, cell_right = fig.cells[0][c][1], fig.cells[0][c][3]
        assert band_top <= top < bottom <= band_bottom and cell_left <= left < right <= cell_right
        assert ink[top:bottom, left:right].sum() > 20  # each title is drawn, inside its own box
    # nothing is drawn in the band outside the titles' boxes (one pixel of antialiasing allowed)
    outside = np.ones_like(ink)
    for top, left, bottom, right in fig.title_boxes:
        outside[max(top - 1, 0):bottom + 1, left - 1:right + 1] = False
    assert not ink[outside].any()
    pixels, removed, _ = grey_figure
    assert draw_reconstructions(_panels(pixels[:1], removed[:1], pixels[:1]), 0.5).titles[1] == "masked 50%"


def test_grey_originals_are_grey_and_the_mask_colour_marks_exactly_the_removed_patches(grey_figure):
    pixels, removed, fig = grey_figure
    img = fig.pixels.astype(int)
    assert fig.mask_colours == (MAGENTA,) * 3
    is_magenta = (img == MAGENTA).all(axis=2)
    for r, row in enumerate(fig.cells):
        cells = [img[t:b, lft:rgt] for t, lft, b, rgt in row]
        where = _up(removed[r].numpy(), fig.scale)
        # the masked cell is magenta exactly on the removed patches, nowhere else in the figure
        assert (cells[1][where] == MAGENTA).all()
        top, left, bottom, right = row[1]
        assert is_magenta[top:bottom, left:right].sum() == where.sum()
        # every other pixel of the row is grey: R = G = B
        for c, cell in enumerate(cells):
            grey = cell if c != 1 else cell[~where]
            assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
        # the original, enlarged by nearest neighbour, as it is
        expected = _up((pixels[r, 0] * 255).round().int().numpy(), fig.scale)
        assert np.abs(cells[0][..., 0] - expected).max() <= 1
        assert np.abs(cells[1][~where][..., 0] - expected[~where]).max() <= 1  # the visible patches
    assert is_magenta.sum() == sum(_up(m.numpy(), fig.scale).sum() for m in removed)


def test_colour_originals_keep_their_colours_and_get_a_mask_colour_they_lack():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    photo = torch.stack([0.3 + 0.4 * xx, 0.5 + 0.3 * torch.sin(6 * yy), 0.9 - 0.7 * yy])  # sky to grass
    pink = photo.clone()
    pink[:, :8, :8] = torch.tensor([1.0, 0.1, 0.9]).view(3, 1, 1)  # a corner near magenta
    pixels = torch.stack([photo, pink])
    removed = _patch_mask(2, 32, 8, seed=3)
    fig = draw_reconstructions(_panels(pixels, removed, pixels), 0.75, scale=2)
    assert fig.scale == 2 and fig.mask_colours == (MAGENTA, MASK_COLOURS[1])  # the pink one: cyan
    for r, row in enumerate(fig.cells):
        top, left, bottom, right = row[0]
        expected = _up((pixels[r].permute(1, 2, 0) * 255).round().int().numpy(), 2)
        assert np.abs(fig.pixels[top:bottom, left:right].astype(int) - expected).max() <= 1  # in colour
        top, left, bottom, right = row[1]
        where = _up(removed[r].numpy(), 2)
        assert (fig.pixels[top:bottom, left:right][where] == fig.mask_colours[r]).all()


def test_mask_colour_choice():
    greys = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    assert mask_colour(greys) == MAGENTA  # every grey level is far from it
    assert mask_colour(np.array([[250, 10, 250]], dtype=np.uint8)) == (0, 255, 255)
    every = np.stack(np.meshgrid(*[np.arange(0, 256, 51)] * 3), -1).reshape(-1, 3).astype(np.uint8)
    # nothing is far enough from a picture of every colour: the farthest candidate
    chosen = mask_colour(every)
    distance = {c: np.sqrt(((every.astype(float) - c) ** 2).sum(1)).min() for c in MASK_COLOURS}
    assert chosen in MASK_COLOURS and distance[chosen] == max(distance.values())


def test_cells_are_not_enlarged_from_128_px():
    pixels = torch.rand(1, 3, 128, 128)
    fig = draw_reconstructions(_panels(pixels, _patch_mask(1, 128, 16), pixels), 0.75)
    assert fig.scale == 1 and fig.cells[0][0][2] - fig.cells[0][0][0] == 128


def test_tensorboard_gets_the_figure_as_hwc(grey_figure):
    torch.manual_seed(0)
    model = models_mae.mae_vit_micro_patch4(norm_pix_loss=True)
    images = ((torch.rand(2, 1, 32, 32).expand(2, 3, 32, 32) - MEAN) / STD)
    calls = []

    class Writer:
        def add_image(self, tag, img, step, dataformats):
            calls.append((tag, img, step, dataformats))

    main_pretrain.log_reconstructions(Writer(), model, images, 3, 0.75, torch.device("cpu"))
    [(tag, img, step, dataformats)] = calls
    expected = draw_reconstructions(reconstruct(model, images, 0.75, seed=0), 0.75)
    assert (tag, step, dataformats) == ("reconstruction", 3, "HWC")
    np.testing.assert_array_equal(img, expected.pixels)
    assert len(expected.cells) == 2 and img.dtype == np.uint8 and img.shape[2] == 3


def test_no_global_matplotlib_state():
    import util.visualize
    source = open(util.visualize.__file__).read()
    assert "pyplot" not in source and "matplotlib.use" not in source  # Figure + FigureCanvasAgg only
