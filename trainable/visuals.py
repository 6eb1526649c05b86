"""What an evaluation looks like, as two PNGs per eval (the reference showed this live in
visdom): a grid of fixed validation images (image | ground truth | prediction, in the dataset's
palette, void in black) and the row-normalised confusion matrix. Written by rank 0 next to
the checkpoint; whoever tracks the run (MLflow) logs them. No Ray, no MLflow here.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import write_png

from deeplab_sweep.datasets.catalog import Palette
from deeplab_sweep.datasets.labels import IGNORE_INDEX
from deeplab_sweep.datasets.transforms import MEAN, STD

TILE_HEIGHT = 160  # each row is scaled to this height: a few images stay a small PNG


def grid_name(epoch: int) -> str:
    return f"val_images_epoch_{epoch:04d}.png"


def confusion_name(epoch: int) -> str:
    return f"confusion_epoch_{epoch:04d}.png"


def colorize(mask: torch.Tensor, palette: Palette) -> torch.Tensor:
    """[H, W] class ids -> [3, H, W] uint8 in the dataset's palette; void (255) and unknown ids black."""
    lut = torch.zeros(256, 3, dtype=torch.uint8)
    colors = torch.tensor(palette, dtype=torch.uint8)
    lut[: len(colors)] = colors
    lut[IGNORE_INDEX] = 0
    return lut[mask.long().clamp(0, 255)].permute(2, 0, 1)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Normalised float [3, H, W] (as the val transform gives it) -> uint8 [3, H, W]."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (image.float().cpu() * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


def _row(image: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor, palette: Palette) -> torch.Tensor:
    h, w = mask.shape[-2:]
    size = [TILE_HEIGHT, max(1, round(w * TILE_HEIGHT / h))]
    tiles = [denormalize(image), colorize(mask.cpu(), palette), colorize(pred.cpu(), palette)]
    mode = ["bilinear", "nearest", "nearest"]
    out = [
        F.interpolate(t[None].float(), size=size, mode=m, **({"antialias": True} if m == "bilinear" else {}))[0]
        for t, m in zip(tiles, mode, strict=True)
    ]
    gap = torch.full((3, TILE_HEIGHT, 4), 255.0)
    return torch.cat([out[0], gap, out[1], gap, out[2]], dim=2)


def image_grid(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], palette: Palette) -> torch.Tensor:
    """(image, truth, prediction) triples -> one uint8 [3, H, W] grid, one row per image."""
    rows = [_row(i, m, p, palette) for i, m, p in samples]
    width = max(r.shape[-1] for r in rows)
    gap = torch.full((3, 4, width), 255.0)
    padded = []
    for r in rows:
        padded += [F.pad(r, (0, width - r.shape[-1]), value=255.0), gap]
    return torch.cat(padded[:-1], dim=1).round().clamp(0, 255).to(torch.uint8)


def confusion_figure(mat: torch.Tensor, class_names: tuple[str, ...], path: Path, title: str) -> None:
    """Rows: ground truth, normalised to sum 1 (recall on the diagonal); columns: prediction."""
    m = mat.double().cpu()
    with _CANVAS_LOCK:
        canvas = _confusion_canvas(class_names)
        canvas.redraw((m / m.sum(1, keepdim=True).clamp(min=1)).numpy(), title)
        write_png(canvas.rgb(), str(path))


class _ConfusionCanvas:
    """The figure laid out and drawn once, without what changes from epoch to epoch (the
    matrix, the frame drawn over it, the title); each epoch restores that drawing and draws
    only those (matplotlib's blitting): the same pixels as a full draw, in about a sixth of its time
    (tests/test_engine.py). Matplotlib's object API, not pyplot: no global figure registry, no
    GUI backend."""

    def __init__(self, class_names: tuple[str, ...]):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = len(class_names)
        fig = Figure(figsize=(2 + 0.32 * n, 1.6 + 0.32 * n), dpi=90)
        self.canvas = FigureCanvasAgg(fig)
        self.ax = ax = fig.add_subplot()
        self.image = ax.imshow(np.zeros((n, n)), vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        self.heading = ax.set_title("epoch 0000: val mIoU 0.000", fontsize=9)
        fig.colorbar(self.image, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        self.changing = sorted([self.image, *ax.spines.values(), self.heading], key=lambda a: a.get_zorder())
        for artist in self.changing:
            artist.set_animated(True)  # left out of the full draw below
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(fig.bbox)

    def redraw(self, matrix: np.ndarray, title: str) -> None:
        self.canvas.restore_region(self.background)
        self.image.set_data(matrix)
        self.heading.set_text(title)
        for artist in self.changing:
            self.ax.draw_artist(artist)

    def rgb(self) -> torch.Tensor:
        """What is drawn now, as a uint8 [3, H, W] image."""
        return torch.from_numpy(np.asarray(self.canvas.buffer_rgba())[..., :3].copy()).permute(2, 0, 1).contiguous()


_CANVAS_LOCK = threading.Lock()  # one canvas per class list in a process, drawn by one caller at a time


@functools.lru_cache(maxsize=2)
def _confusion_canvas(class_names: tuple[str, ...]) -> _ConfusionCanvas:
    return _ConfusionCanvas(class_names)


def write_visuals(
    out_dir: str | Path,
    epoch: int,
    samples: list[tuple],
    confusion: torch.Tensor,
    class_names: tuple[str, ...],
    palette: Palette,
    miou: float,
) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if samples:
        paths.append(out / grid_name(epoch))
        write_png(image_grid(samples, palette), str(paths[-1]))
    paths.append(out / confusion_name(epoch))
    confusion_figure(confusion, class_names, paths[-1], f"epoch {epoch}: val mIoU {miou:.3f}")
    return paths
