"""Reconstruction pictures: original | masked | reconstruction | reconstruction + visible patches.

`reconstruct` runs the model; `draw_reconstructions` lays the panels out as a labelled figure (one row per
image, white gaps between cells, column titles, removed patches in a colour no original contains), drawn
with matplotlib's Agg canvas and returned as RGB pixels for PNG files and TensorBoard.
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from util.errors import UserError
from util.masking import block_noise, grid_noise

PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")
# colours for removed patches, in order of preference: saturated, so never a grey level; each row uses the
# first one far enough from every pixel of its original (magenta unless the original holds colours near it)
MASK_COLOURS = ((255, 0, 255), (0, 255, 255), (0, 255, 0), (0, 0, 255), (255, 0, 0), (255, 255, 0))
MIN_MASK_DISTANCE = 96.0  # Euclidean distance in 0..255 RGB between the mask colour and any original pixel
DPI = 100  # figure pixels per inch; a title's size in points is fontsize * DPI / 72 pixels
Box = Tuple[int, int, int, int]  # (top, left, bottom, right) in figure pixels, bottom and right exclusive


@torch.no_grad()
def reconstruct(model: torch.nn.Module, imgs: torch.Tensor, mask_ratio: float = 0.75,
                seed: Optional[int] = 0) -> torch.Tensor:
    """Return the four panels as normalised images, [N, 4, C, H, W].

    Masks come from a private generator seeded with `seed` (the global random streams are untouched), of
    the model's mask type (random, block or grid).
    For models trained with norm_pix_loss, each predicted patch is mapped back to pixel space with
    the mean and variance of the original patch.
    """
    was_training = model.training
    model.eval()
    n, L = imgs.shape[0], model.patch_embed.num_patches
    mask_type = getattr(model, "mask_type", "random")
    if mask_type == "random":
        g = torch.Generator().manual_seed(0 if seed is None else seed)
        noise = torch.rand(n, L, generator=g).to(imgs.device)
    else:  # the masks the model was trained with, from a forked (then restored) random state
        with torch.random.fork_rng(devices=[]):
            state = np.random.get_state()
            torch.manual_seed(0 if seed is None else seed)
            np.random.seed(0 if seed is None else seed)
            grid = model.patch_embed.grid_size
            noise = grid_noise(n, grid, imgs.device) if mask_type == "grid" else \
                block_noise(n, grid, mask_ratio, imgs.device)
            np.random.set_state(state)
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    pred = pred.float()
    if getattr(model, "norm_pix_loss", False):
        target = model.patchify(imgs)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.e-6) ** .5 + mean
    recon = model.unpatchify(pred)
    p_h, p_w = model.patch_embed.patch_size
    # [N, L] -> [N, 1, H, W]: 1 where the patch was removed
    pix_mask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p_h * p_w * imgs.shape[1]))
    masked = imgs * (1 - pix_mask)
    pasted = imgs * (1 - pix_mask) + recon * pix_mask
    if was_training:
        model.train()
    return torch.stack([imgs, masked, recon, pasted], dim=1)


def shown_channels(spec: str, in_chans: int) -> Union[str, Tuple[int, int, int]]:
    """What a picture shows of in_chans channels: 'grey' (each channel a row, in grey) or three channel numbers (an
    RGB composite), from --vis_channels ('' for the default: 1 channel grey, 3 as RGB, 2 each in grey, more than 3
    channels 0, 1, 2)."""
    spec = spec.strip().lower()
    if not spec:
        return "grey" if in_chans in (1, 2) else (0, 1, 2)
    if spec in ("grey", "gray"):
        return "grey"
    try:
        picked = tuple(int(v) for v in spec.split(","))
    except ValueError:
        picked = ()
    if len(picked) != 3 or not all(0 <= c < in_chans for c in picked):
        raise UserError(f"--vis_channels {spec}: give three channel numbers from 0 to {in_chans - 1} (e.g. "
                        f"{','.join(str(c) for c in range(min(3, in_chans)))}) for a composite, or 'grey'")
    return picked


def panel_pixels(panels: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                 channels: Union[str, Sequence[int], None] = None) -> Tuple[np.ndarray, np.ndarray]:
    """[N, 4, C, H, W] normalised panels -> ([N', 4, H, W, 3] uint8 pixels, [N', H, W] bool removed patches).

    `channels` (shown_channels' answer; None: its default for C): three channel numbers drawn as RGB, or 'grey':
    each channel of each image drawn in grey in a row of its own (N' = N * C), in [0, 1] after de-normalisation.

    The row of a grey original (its three channels equal to within one grey level) is shown in grey: the
    model never saw colour there, and a cast in the reconstruction would only show how its errors differ
    between channels, which the per-channel de-normalisation (ImageNet mean and std) and norm_pix_loss's
    per-patch scale amplify. Removed patches are those of the 'masked' panel that are exactly 0 in every
    channel of the normalised panel; their pixels are left as de-normalised (the mean colour) for the
    caller to paint.
    """
    mean_t = torch.tensor(mean).view(1, 1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, 1, -1, 1, 1)
    x = panels.detach().float().cpu()
    removed = (x[:, 1] == 0).all(dim=1)  # [N, H, W]
    x = (x * std_t + mean_t).clamp(0, 1)
    n, c = x.shape[0], x.shape[2]
    channels = shown_channels("", c) if channels is None else channels
    if channels == "grey":  # [N, 4, C, H, W] -> [N * C, 4, 1, H, W]: image n's channel k is row n * C + k
        x = x.transpose(1, 2).reshape(n * c, 1, 4, *x.shape[3:]).transpose(1, 2)
        removed = removed.repeat_interleave(c, dim=0)
        x = x.expand(-1, -1, 3, -1, -1)
    else:
        x = x[:, :, list(channels)]
        original = x[:, 0]
        grey = (original.amax(dim=1) - original.amin(dim=1)).amax(dim=(1, 2)) <= 1 / 255  # [N]
        x[grey] = x[grey].mean(dim=2, keepdim=True).expand_as(x[grey])
    pixels = (x.permute(0, 1, 3, 4, 2).numpy() * 255).round().astype(np.uint8)  # [N, 4, H, W, 3]
    return pixels, removed.numpy()


def mask_colour(originals: np.ndarray, candidates: Sequence[Tuple[int, int, int]] = MASK_COLOURS,
                min_distance: float = MIN_MASK_DISTANCE) -> Tuple[int, int, int]:
    """The first candidate at least `min_distance` (RGB, 0..255) from every pixel of `originals` [..., 3]
    (uint8), else the candidate farthest from them: magenta for grey and almost all natural images."""
    colours = originals.reshape(-1, 3).astype(np.float32)
    colours = np.unique(colours, axis=0)  # distinct colours only: a photo repeats most of its pixels
    distances = [float(np.sqrt(((colours - np.float32(c)) ** 2).sum(axis=1)).min()) for c in candidates]
    for c, d in zip(candidates, distances):
        if d >= min_distance:
            return tuple(c)
    return tuple(candidates[int(np.argmax(distances))])


@dataclass(frozen=True)
class ReconstructionFigure:
    """A drawn figure and where its parts are (figure pixels, origin at the top left)."""

    pixels: np.ndarray  # [H, W, 3] uint8, RGB
    titles: Tuple[str, ...]  # the four column titles
    title_boxes: Tuple[Box, ...]  # each title's inked extent, as the renderer measured it
    title_band: Tuple[int, int]  # (top, bottom) of the band above the first row that holds the titles
    cells: Tuple[Tuple[Box, ...], ...]  # [row][column] -> the image cell
    gap: int  # white pixels between cells and around the grid
    scale: int  # integer nearest-neighbour enlargement of each panel
    mask_colours: Tuple[Tuple[int, int, int], ...]  # [row] -> the colour of its removed patches ('masked' column)

    def save(self, path: str) -> None:
        """Write the figure as a PNG."""
        Image.fromarray(self.pixels).save(path)


def column_titles(mask_ratio: float) -> Tuple[str, ...]:
    """'original', 'masked 75%', 'reconstruction', 'reconstruction + visible'."""
    return ("original", f"masked {round(100 * mask_ratio)}%", "reconstruction", "reconstruction + visible")


def draw_reconstructions(panels: torch.Tensor, mask_ratio: float, scale: Optional[int] = None,
                         min_cell: int = 128, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                         channels: Union[str, Sequence[int], None] = None) -> ReconstructionFigure:
    """Draw reconstruct()'s panels as a figure: one row per image, four titled columns, white gaps.

    Args:
        panels: [N, 4, C, H, W] normalised panels from `reconstruct`.
        mask_ratio: the ratio the panels were masked with (for the 'masked' column's title).
        scale: integer nearest-neighbour enlargement of every panel; None: the smallest that makes a cell
            at least `min_cell` pixels on its longer side (4 for 32-px images, 1 from 128 px).
        min_cell: see `scale`.
        mean, std: the normalisation of the panels (one number per channel).
        channels: what is shown of the channels (`panel_pixels`): None for 1 channel in grey, 3 as RGB, more
            as channels 0, 1, 2; three channel numbers; or 'grey', a row per channel of each image.

    Grey originals are drawn grey (see `panel_pixels`). Removed patches are painted in `mask_colour`'s choice
    for the row's original: magenta (#FF00FF) for every grey one and almost every photo; for an original that
    holds colours near magenta, the first of cyan, green, blue, red, yellow that it does not. The titles
    shrink, and the last one wraps, to fit their column.
    """
    pixels, removed = panel_pixels(panels, mean, std, channels)
    colours = tuple(mask_colour(original) for original in pixels[:, 0])
    for masked, where, colour in zip(pixels[:, 1], removed, colours):
        masked[where] = colour
    n, k, h, w, _ = pixels.shape
    scale = scale or max(1, math.ceil(min_cell / max(h, w)))
    if scale > 1:
        pixels = pixels.repeat(scale, axis=2).repeat(scale, axis=3)
    cell_h, cell_w = h * scale, w * scale
    gap = max(6, round(0.06 * max(cell_h, cell_w)))

    # matplotlib is slow to import (~0.5 s): only when a figure is drawn, not by every entry point's start
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(dpi=DPI, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    titles = column_titles(mask_ratio)
    fontsize, shown = _fit_titles(fig, canvas, titles, cell_w)
    lines = max(t.count("\n") + 1 for t in shown)
    band = math.ceil(lines * 1.3 * fontsize * DPI / 72) + 2 * gap  # titles, with a gap above and below
    width, height = k * cell_w + (k + 1) * gap, band + n * (cell_h + gap)
    fig.set_size_inches(width / DPI, height / DPI)

    cells = tuple(tuple((band + r * (cell_h + gap), gap + c * (cell_w + gap),
                         band + r * (cell_h + gap) + cell_h, gap + c * (cell_w + gap) + cell_w) for c in range(k))
                  for r in range(n))
    for r in range(n):
        for c in range(k):
            top, left = cells[r][c][:2]
            # pixels as they are, at whole-pixel offsets (no resampling); yo counts from the bottom
            fig.figimage(pixels[r, c], xo=left, yo=height - top - cell_h, origin="upper")
    texts = [fig.text((gap + c * (cell_w + gap) + cell_w / 2) / width, 1 - band / 2 / height, t, ha="center",
                      va="center", fontsize=fontsize, color="black") for c, t in enumerate(shown)]
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if rgb.shape[:2] != (height, width):
        raise RuntimeError(f"matplotlib drew {rgb.shape[1]}x{rgb.shape[0]} pixels, expected {width}x{height}")
    renderer = canvas.get_renderer()
    boxes = []
    for t in texts:
        b = t.get_window_extent(renderer)  # display pixels, origin at the bottom left
        boxes.append((math.floor(height - b.y1), math.floor(b.x0), math.ceil(height - b.y0), math.ceil(b.x1)))
    return ReconstructionFigure(rgb, titles, tuple(boxes), (0, band), cells, gap, scale, colours)


def _fit_titles(fig: "Figure", canvas: "FigureCanvasAgg", titles: Sequence[str], cell_w: int,
                max_size: float = 12.0, min_size: float = 8.0) -> Tuple[float, Tuple[str, ...]]:
    """(font size in points, titles as drawn): the largest size up to `max_size` at which every title fits
    `cell_w` pixels; a title that would need less than `min_size` breaks its line before ' + '."""
    renderer = canvas.get_renderer()

    def size_for(texts: Sequence[str]) -> float:
        probe = [fig.text(0, 0, t, fontsize=10) for t in texts]
        widest = max(p.get_window_extent(renderer).width for p in probe)
        for p in probe:
            p.remove()
        return min(max_size, 10 * 0.95 * cell_w / widest)

    size = size_for(titles)
    if size < min_size:
        wrapped = tuple(t.replace(" + ", "\n+ ") for t in titles)
        size = max(size, size_for(wrapped))
        return size, wrapped
    return size, tuple(titles)
