"""Reading image/mask pairs with fast decoders, and errors that name the file."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_png, read_file

from deeplab_sweep.errors import DatasetError

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they remain the fastest
# decoders in the pinned pair (libjpeg-turbo, libpng), so the warning is silenced here only.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)


__all__ = ["DatasetError", "SegmentationDataset", "decode_image_bytes", "read_image", "read_mask", "read_id_list"]


def _read_bytes(path: Path, what: str) -> torch.Tensor:
    if not Path(path).is_file():
        raise DatasetError(f"{path}: {what} file is missing")
    try:
        return read_file(str(path))
    except RuntimeError as e:
        raise DatasetError(f"{path}: unreadable {what} ({str(e).splitlines()[0]})") from None


def read_image(path: Path) -> torch.Tensor:
    """uint8 [3, H, W], decoded by libjpeg-turbo / libpng (not PIL)."""
    return decode_image_bytes(_read_bytes(path, "image"), str(path))


def decode_image_bytes(data: torch.Tensor | bytes, name: str) -> torch.Tensor:
    """An encoded image (JPEG, PNG, ...; a file's bytes) as uint8 [3, H, W], RGB; `name` says
    where it came from in the error."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise DatasetError(f"{name}: corrupt or unreadable image ({str(e).splitlines()[0]})") from None


def read_mask(path: Path) -> torch.Tensor:
    """uint8 [H, W] of stored values: palette PNG indices, never colours."""
    data = _read_bytes(path, "mask")
    try:
        m = decode_png(data, ImageReadMode.UNCHANGED)
    except RuntimeError as e:
        raise DatasetError(f"{path}: corrupt or non-PNG mask ({str(e).splitlines()[0]})") from None
    if m.shape[0] != 1:
        raise DatasetError(f"{path}: mask must be a single-channel (palette or grey) PNG, has {m.shape[0]} channels")
    return m[0]


class SegmentationDataset(Dataset):
    """(image, mask) pairs. Without a transform an item is (uint8 [3,H,W], int64 [H,W]).

    Stored mask values must be 0..`max_label` or 255 (void); anything else is reported with the
    file's name. `lut` maps stored values to class ids (Cityscapes labelIds -> trainIds).
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, Path]],
        max_label: int,
        lut: torch.Tensor | None = None,
        transform: Callable | None = None,
        limit: int | None = None,
    ):
        self.samples = list(samples)[:limit] if limit else list(samples)
        self.transform = transform
        self.lut = lut
        self.max_label = max_label

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 image [3,H,W], uint8 class-id mask [H,W]), checked."""
        img_path, mask_path = self.samples[index]
        image, mask = read_image(img_path), self._mask(mask_path)
        if image.shape[-2:] != mask.shape:
            raise DatasetError(
                f"{mask_path}: mask size {tuple(mask.shape)} differs from image "
                f"{img_path.name} size {tuple(image.shape[-2:])}"
            )
        # uint8 through the transforms (a quarter of the memory traffic); int64 at the end.
        return image, mask

    def load_encoded(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the image file's bytes, uint8 class-id mask [H,W]): for a transform that decodes
        images on the training device (its sizes are compared there)."""
        img_path, mask_path = self.samples[index]
        # A copy: the tensor read_file returns could not be sent from a loader worker (seen
        # here: "Bad file descriptor" in the worker's sender thread, and the loader hangs).
        return _read_bytes(img_path, "image").clone(), self._mask(mask_path)

    def _mask(self, path: Path) -> torch.Tensor:
        raw = read_mask(path)
        # uint8 wraps 255 (void) to 0: one add and one max check every pixel of the mask.
        if int((raw + 1).max()) > self.max_label + 1:
            values = [v for v in raw.unique().tolist() if v > self.max_label and v != 255]
            raise DatasetError(f"{path}: unexpected label values {values[:10]}")
        return self.lut[raw.long()] if self.lut is not None else raw

    def __getitem__(self, index: int):
        if getattr(self.transform, "encoded", False):
            return self.transform(*self.load_encoded(index))
        image, mask = self.load(index)
        return self.transform(image, mask) if self.transform else (image, mask.long())


def read_id_list(path: Path) -> list[str]:
    try:
        return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise DatasetError(f"{path}: split list is missing") from None
