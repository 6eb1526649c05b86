"""Class names, palettes and the Cityscapes labelId -> trainId table."""

from __future__ import annotations

IGNORE_INDEX = 255

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def voc_palette() -> list[tuple[int, int, int]]:
    """The VOC colour map (bit-interleaved class index), 256 entries; 255 (void) is (224, 224, 192)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal.append((r, g, b))
    return pal


# (name, labelId, trainId, colour) from cityscapesScripts' labels.py; trainId 255 = ignored.
CITYSCAPES_LABELS = (
    ("unlabeled", 0, 255, (0, 0, 0)),
    ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)),
    ("out of roi", 3, 255, (0, 0, 0)),
    ("static", 4, 255, (0, 0, 0)),
    ("dynamic", 5, 255, (111, 74, 0)),
    ("ground", 6, 255, (81, 0, 81)),
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)),
    ("bridge", 15, 255, (150, 100, 100)),
    ("tunnel", 16, 255, (150, 120, 90)),
    ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, 255, (0, 0, 90)),
    ("trailer", 30, 255, (0, 0, 110)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
    ("license plate", -1, 255, (0, 0, 142)),
)
CITYSCAPES_CLASSES = tuple(name for name, _, t, _ in sorted(CITYSCAPES_LABELS, key=lambda r: r[2]) if t != 255)

# labelIds PNGs store 0..33; license plate (-1) is written as 255 by the official scripts.
CITYSCAPES_MAX_LABEL_ID = max(lid for _, lid, _, _ in CITYSCAPES_LABELS)


def cityscapes_lut():
    """uint8 labelId -> trainId lookup (a torch tensor); anything not in the table maps to 255."""
    import torch

    lut = torch.full((256,), IGNORE_INDEX, dtype=torch.uint8)
    for _, lid, tid, _ in CITYSCAPES_LABELS:
        if lid >= 0:
            lut[lid] = tid
    return lut


def cityscapes_palette() -> list[tuple[int, int, int]]:
    """trainId -> colour, 256 entries, void (255) black."""
    pal = [(0, 0, 0)] * 256
    for _, _, tid, colour in CITYSCAPES_LABELS:
        if tid != 255:
            pal[tid] = colour
    return pal
