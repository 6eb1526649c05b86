"""Small datasets in the exact real layouts, for tests, demos and benchmarks.

Classes are learnable: each class has its own colour and shape, drawn over a noisy background,
so a small model can fit them and a sweep has a signal to find.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from deeplab_sweep.datasets.labels import CITYSCAPES_LABELS, voc_palette


def _class_colour(c: int, n: int) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((c * 0.61803) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if kind == 0:
        draw.rectangle(box, fill=fill)
    elif kind == 1:
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _voc_sample(rng: np.random.Generator, classes: list[int], w: int, h: int, void_border: bool):
    bg = rng.integers(40, 90, size=3)
    img = np.clip(bg + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(img)
    mask = Image.new("L", (w, h), 0)
    outline = Image.new("L", (w, h), 0)
    draw_i, draw_m, draw_o = ImageDraw.Draw(image), ImageDraw.Draw(mask), ImageDraw.Draw(outline)
    for _ in range(int(rng.integers(1, 4))):
        c = int(rng.choice(classes))
        bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        box = (x0, y0, x0 + bw, y0 + bh)
        colour = tuple(int(v) for v in np.clip(np.array(_class_colour(c, 21)) + rng.integers(-20, 20, 3), 0, 255))
        _draw_shape(draw_i, c % 3, box, colour)
        _draw_shape(draw_m, c % 3, box, c)
        _draw_shape(draw_o, c % 3, box, 255)
    m = np.array(mask)
    if void_border:
        # VOC marks object boundaries as void (255), a few pixels wide.
        o = np.array(outline)
        edge = (np.array(Image.fromarray(o).filter(ImageFilter.MaxFilter(5))) > 0) & (
            np.array(Image.fromarray(o).filter(ImageFilter.MinFilter(5))) == 0
        )
        m = np.where(edge, 255, m).astype(np.uint8)
    return image.filter(ImageFilter.GaussianBlur(0.6)), m


def _save_palette_png(mask: np.ndarray, path: Path) -> None:
    im = Image.frombytes("P", mask.shape[::-1], np.ascontiguousarray(mask).tobytes())
    im.putpalette([v for rgb in voc_palette() for v in rgb])
    im.save(path)


def synth_voc(
    out: str | Path,
    n_train: int = 24,
    n_val: int = 8,
    n_aug_extra: int = 16,
    size=(160, 120),
    num_object_classes: int = 5,
    seed: int = 0,
) -> Path:
    """VOCdevkit/VOC2012 with train/val/trainval lists, palette masks with void borders, and a
    SegmentationClassAug folder + train_aug.txt (train + extra ids, with some val ids that the
    loader must drop, as the real list is used)."""
    rng = np.random.default_rng(seed)
    base = Path(out) / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True, exist_ok=True)
    classes = list(range(1, num_object_classes + 1))
    w, h = size
    ids = {
        "train": [f"2007_{i:06d}" for i in range(n_train)],
        "val": [f"2008_{i:06d}" for i in range(n_val)],
        "aug": [f"2011_{i:06d}" for i in range(n_aug_extra)],
    }
    for split, names in ids.items():
        for name in names:
            # VOC image sizes vary (about 500x375); vary ours too so batching is exercised.
            jw, jh = (w, h) if rng.random() < 0.5 else (h, w) if split == "val" else (w, h)
            image, mask = _voc_sample(rng, classes, jw, jh, void_border=split != "aug")
            image.save(base / "JPEGImages" / f"{name}.jpg", quality=95)
            if split != "aug":
                _save_palette_png(mask, base / "SegmentationClass" / f"{name}.png")
            # SBD-derived masks are plain grey PNGs of class indices.
            aug_mask = np.where(mask == 255, 0, mask).astype(np.uint8) if split != "aug" else mask
            Image.fromarray(aug_mask).save(base / "SegmentationClassAug" / f"{name}.png")
    lists = base / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("\n".join(ids["train"]) + "\n")
    (lists / "val.txt").write_text("\n".join(ids["val"]) + "\n")
    (lists / "trainval.txt").write_text("\n".join(ids["train"] + ids["val"]) + "\n")
    (lists / "train_aug.txt").write_text("\n".join(ids["train"] + ids["aug"] + ids["val"][:2]) + "\n")
    return Path(out)


# Drawn Cityscapes scene: (labelId, kind) layers, back to front.
_CS_ROAD, _CS_SIDEWALK, _CS_BUILDING, _CS_SKY, _CS_VEG, _CS_CAR, _CS_PERSON, _CS_EGO, _CS_STATIC = (
    7,
    8,
    11,
    23,
    21,
    26,
    24,
    1,
    4,
)
_CS_COLOURS = {lid: colour for _, lid, _, colour in CITYSCAPES_LABELS if lid >= 0}


def _cityscapes_sample(rng: np.random.Generator, w: int, h: int):
    ids = np.full((h, w), _CS_SKY, np.uint8)
    horizon = int(h * rng.uniform(0.35, 0.5))
    ids[horizon:] = _CS_ROAD
    side = int(w * rng.uniform(0.1, 0.25))
    ids[horizon:, :side] = _CS_SIDEWALK
    lab = Image.fromarray(ids)
    d = ImageDraw.Draw(lab)
    for _ in range(int(rng.integers(2, 5))):
        x0 = int(rng.integers(0, w - w // 6))
        d.rectangle(
            (x0, int(horizon * rng.uniform(0.2, 0.7)), x0 + int(rng.integers(w // 8, w // 4)), horizon),
            fill=_CS_BUILDING,
        )
    x0 = int(rng.integers(0, w - w // 8))
    d.ellipse((x0, horizon - h // 6, x0 + w // 8, horizon + h // 20), fill=_CS_VEG)
    for _ in range(int(rng.integers(1, 3))):
        x0, y0 = int(rng.integers(side, w - w // 5)), int(rng.integers(horizon, h - h // 4))
        d.rectangle((x0, y0, x0 + w // 6, y0 + h // 8), fill=_CS_CAR)
    x0 = int(rng.integers(0, side + 1))
    d.ellipse((x0, horizon - h // 10, x0 + w // 20, horizon + h // 8), fill=_CS_PERSON)
    d.rectangle((0, h - h // 12, w, h), fill=_CS_EGO)  # ego vehicle: ignored after mapping
    d.rectangle((w - w // 12, horizon, w, horizon + h // 10), fill=_CS_STATIC)
    ids = np.array(lab)
    colour = np.zeros((h, w, 3), np.uint8)
    for lid in np.unique(ids):
        colour[ids == lid] = _CS_COLOURS[int(lid)]
    img = np.clip(colour.astype(np.float32) * 0.8 + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(img), ids, colour


def synth_cityscapes(out: str | Path, n_train: int = 12, n_val: int = 4, size=(256, 128), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    cities = {"train": ["aachen", "bremen"], "val": ["frankfurt"]}
    counts = {"train": n_train, "val": n_val}
    for split, names in cities.items():
        for k in range(counts[split]):
            city = names[k % len(names)]
            stem = f"{city}_{k:06d}_000019"
            img_dir = Path(out) / "leftImg8bit" / split / city
            gt_dir = Path(out) / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            image, ids, colour = _cityscapes_sample(rng, w, h)
            image.save(img_dir / f"{stem}_leftImg8bit.png")
            Image.fromarray(ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")
            # The files the loader must ignore, present as in the real download.
            Image.fromarray(colour).save(gt_dir / f"{stem}_gtFine_color.png")
            Image.fromarray(ids.astype(np.uint16) * 1000).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
            (gt_dir / f"{stem}_gtFine_polygons.json").write_text(
                json.dumps({"imgHeight": h, "imgWidth": w, "objects": []})
            )
    return Path(out)
