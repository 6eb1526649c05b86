"""Loaders read the real layouts exactly; transforms; errors name the file."""

from __future__ import annotations

import io
import shutil
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab_sweep.cli import main
from deeplab_sweep.datasets.catalog import build_dataset
from deeplab_sweep.datasets.cityscapes import Cityscapes
from deeplab_sweep.datasets.download import fetch, prepare_cityscapes, safe_extract
from deeplab_sweep.datasets.labels import CITYSCAPES_LABELS, voc_palette
from deeplab_sweep.datasets.transforms import MEAN_PIXEL, DeviceTrainAugment, train_transform, val_transform
from deeplab_sweep.datasets.verify import verify
from deeplab_sweep.datasets.voc import VOCSegmentation
from deeplab_sweep.errors import DatasetError

VOC = "VOCdevkit/VOC2012"


def _ids(root: Path, name: str) -> list[str]:
    return (root / VOC / "ImageSets/Segmentation" / f"{name}.txt").read_text().split()


def test_voc_splits_and_item_types(synth_voc_root):
    for split in ("train", "val", "trainval"):
        ds = VOCSegmentation(synth_voc_root, split)
        assert len(ds) == len(_ids(synth_voc_root, split))
    image, mask = VOCSegmentation(synth_voc_root, "train")[0]
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    assert mask.dtype == torch.int64 and mask.shape == image.shape[1:]


def test_voc_masks_are_palette_indices_not_colours(synth_voc_root):
    ds = VOCSegmentation(synth_voc_root, "train")
    img_path, mask_path = ds.samples[0]
    pil = Image.open(mask_path)
    assert pil.mode == "P"
    _, mask = ds[0]
    assert torch.equal(mask, torch.from_numpy(np.array(pil)).long())
    values = set(mask.unique().tolist())
    assert 255 in values, "void borders stay 255"
    assert values <= set(range(21)) | {255}


def test_train_aug_uses_aug_masks_and_drops_val_ids(synth_voc_root):
    ds = VOCSegmentation(synth_voc_root, "train_aug")
    listed = _ids(synth_voc_root, "train_aug")
    val = set(_ids(synth_voc_root, "val"))
    assert set(listed) & val, "the generated list contains val ids, as a test of their removal"
    ids = [img.stem for img, _ in ds.samples]
    assert not set(ids) & val and len(ids) == len([i for i in listed if i not in val])
    assert all(m.parent.name == "SegmentationClassAug" for _, m in ds.samples)
    assert len(build_dataset("voc_aug", synth_voc_root, "train")) == len(ds)


def test_cityscapes_maps_label_ids_to_train_ids(synth_cityscapes_root):
    ds = Cityscapes(synth_cityscapes_root, "train")
    table = {lid: tid for _, lid, tid, _ in CITYSCAPES_LABELS if lid >= 0}
    for i in range(3):
        _, mask_path = ds.samples[i]
        raw = np.array(Image.open(mask_path))
        _, mask = ds[i]
        expected = np.vectorize(lambda v: table.get(int(v), 255))(raw)
        assert np.array_equal(mask.numpy(), expected)
    assert all(m.name.endswith("_gtFine_labelIds.png") for _, m in ds.samples)
    # ego vehicle (1) and static (4) are drawn: they must come out as 255
    _, mask = ds[0]
    assert 255 in mask.unique().tolist() and mask.max() == 255 and mask[mask != 255].max() < 19


def test_cityscapes_license_plate_and_unknown_ids(synth_cityscapes_root, tmp_path):
    root = tmp_path / "cs"
    shutil.copytree(synth_cityscapes_root, root)
    ds = Cityscapes(root, "val")
    _, mask_path = ds.samples[0]
    raw = np.array(Image.open(mask_path))
    raw[0, 0] = 255  # license plate (-1) as the official scripts write it
    Image.fromarray(raw).save(mask_path)
    assert ds[0][1][0, 0] == 255
    raw[0, 0] = 77
    Image.fromarray(raw).save(mask_path)
    with pytest.raises(DatasetError, match=rf"{mask_path.name}.*unexpected label values \[77\]"):
        ds[0]


def test_train_transform_scale_pad_crop_flip_jointly():
    torch.manual_seed(0)
    # Label k is painted with grey level 10*k: after any joint transform they must still agree.
    blocks = torch.randint(0, 20, (6, 8))
    mask = blocks.repeat_interleave(10, 0).repeat_interleave(10, 1)  # 10x10 blocks: mostly interior pixels
    image = (mask * 10).to(torch.uint8).expand(3, -1, -1).clone()
    t = train_transform(128, 0.5, 2.0)
    for _ in range(10):
        x, y = t(image, mask)
        assert x.shape == (3, 128, 128) and x.dtype == torch.float32
        assert y.shape == (128, 128) and y.dtype == torch.int64
        grey = (x[0] * 0.229 + 0.485) * 255
        labelled = y != 255
        # away from label edges the bilinear image matches the nearest-neighbour mask
        assert (grey[labelled] - 10 * y[labelled]).abs().median() < 2
    # at scale 0.5 the 30x40 image must be padded: mask 255, image mean (0 after normalising)
    x, y = train_transform(128, 0.5, 0.5)(image, mask)
    assert (y == 255).sum() == 128 * 128 - 30 * 40
    pad = y == 255
    assert x[:, pad].abs().max() < 0.02
    assert MEAN_PIXEL == (124, 116, 104)


def test_flip_happens_and_is_joint():
    mask = torch.zeros(64, 64, dtype=torch.long)
    mask[:, :8] = 3
    image = (mask * 50).to(torch.uint8).expand(3, -1, -1).clone()
    t = train_transform(64, 1.0, 1.0)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        x, y = t(image, mask)
        left = bool((y[:, :8] == 3).all())
        seen.add(left)
        assert left == bool((x[0, :, :8] > x[0, :, -8:]).all())
    assert seen == {True, False}


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])  # JPEG images, PNG images
def test_device_augment_equals_the_cpu_path_on_fixed_seeds(dataset, synth_voc_root, synth_cityscapes_root):
    """The GPU path's code run on the CPU: bytes read in the loader, the crop, scale and flip
    drawn there, decoding and pixels on the device; the same seeds give exactly what the CPU
    pipeline (torchvision's Compose with its own flip) gives."""
    root, load = (synth_voc_root, VOCSegmentation) if dataset == "voc" else (synth_cityscapes_root, Cityscapes)
    cpu = load(root, "train", transform=train_transform(64, 0.5, 2.0))
    device = load(root, "train", transform=DeviceTrainAugment(64, 0.5, 2.0))
    n, flips, windows = min(4, len(cpu)), set(), set()
    for seed in range(4):
        torch.manual_seed(seed)
        expected = [cpu[i] for i in range(n)]
        torch.manual_seed(seed)
        raw = [device[i] for i in range(n)]
        assert all(r[0].dim() == 1 for r in raw)  # the loader handed over bytes, not pixels
        images, masks = device.transform.apply(raw, torch.device("cpu"))
        assert torch.equal(images, torch.stack([e[0] for e in expected]))
        assert torch.equal(masks, torch.stack([e[1] for e in expected]))
        flips |= {r[3] for r in raw}
        windows |= {r[2]["box"] for r in raw}
    assert flips == {True, False} and len(windows) > n  # the draws varied: the test compared something


def test_val_transform_whole_and_centre_crop():
    image = torch.randint(0, 255, (3, 90, 120), dtype=torch.uint8)
    mask = torch.randint(0, 21, (90, 120))
    x, y = val_transform(None)(image, mask)
    assert x.shape == (3, 90, 120) and torch.equal(y, mask)
    x, y = val_transform(64)(image, mask)
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)


def _first(root: Path, folder: str, ext: str) -> Path:
    return sorted((root / VOC / folder).glob(f"*.{ext}"))[0]


def test_corrupt_image_names_file(voc_copy):
    img = voc_copy / VOC / "JPEGImages" / f"{_ids(voc_copy, 'train')[0]}.jpg"
    img.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DatasetError, match=rf"{img}: corrupt or unreadable image"):
        VOCSegmentation(voc_copy, "train")[0]


def test_missing_mask_names_file(voc_copy):
    mask = voc_copy / VOC / "SegmentationClass" / f"{_ids(voc_copy, 'train')[0]}.png"
    mask.unlink()
    with pytest.raises(DatasetError, match=rf"{mask}: mask file is missing"):
        VOCSegmentation(voc_copy, "train")[0]


def test_size_mismatch_names_file(voc_copy):
    mask = voc_copy / VOC / "SegmentationClass" / f"{_ids(voc_copy, 'train')[0]}.png"
    Image.open(mask).crop((0, 0, 50, 40)).save(mask)
    with pytest.raises(DatasetError, match=rf"{mask}: mask size \(40, 50\) differs from image"):
        VOCSegmentation(voc_copy, "train")[0]


def test_unexpected_label_value_names_file(voc_copy):
    mask = voc_copy / VOC / "SegmentationClass" / f"{_ids(voc_copy, 'train')[0]}.png"
    pil = Image.open(mask)
    arr = np.array(pil)
    arr[5, 5] = 42
    out = Image.frombytes("P", arr.shape[::-1], arr.tobytes())
    out.putpalette([v for rgb in voc_palette() for v in rgb])
    out.save(mask)
    with pytest.raises(DatasetError, match=rf"{mask}: unexpected label values \[42\]"):
        VOCSegmentation(voc_copy, "train")[0]


def test_synth_and_verify_cli(tmp_path, capsys):
    assert main(["data", "synth", "voc", "--out", str(tmp_path / "v")]) == 0
    assert main(["data", "verify", "voc", "--root", str(tmp_path / "v")]) == 0
    assert main(["data", "verify", "voc_aug", "--root", str(tmp_path / "v")]) == 0
    assert main(["data", "synth", "cityscapes", "--out", str(tmp_path / "c")]) == 0
    assert main(["data", "verify", "cityscapes", "--root", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "train: 24 image/mask pairs" in out and "val: 8 image/mask pairs" in out and out.count("OK") == 3


def test_verify_reports_bad_file_and_fails(voc_copy, capsys):
    img = voc_copy / VOC / "JPEGImages" / f"{_ids(voc_copy, 'val')[1]}.jpg"
    img.write_bytes(b"garbage")
    report = verify("voc", voc_copy)
    assert not report.ok and any(str(img) in p for p in report.problems)
    assert main(["data", "verify", "voc", "--root", str(voc_copy)]) == 1
    assert str(img) in capsys.readouterr().err


def test_verify_missing_layout(tmp_path, capsys):
    assert main(["data", "verify", "voc", "--root", str(tmp_path)]) == 1
    assert "VOCdevkit/VOC2012" in capsys.readouterr().err


def test_download_fails_fast_offline_with_placement_hint(tmp_path):
    import time

    t = time.monotonic()
    with pytest.raises(DatasetError) as e:
        fetch("http://127.0.0.1:9/VOCtrainval_11-May-2012.tar", tmp_path / "VOCtrainval_11-May-2012.tar", timeout=5)
    assert time.monotonic() - t < 10
    assert f"place it at {tmp_path / 'VOCtrainval_11-May-2012.tar'}" in str(e.value)


class _RangeHandler(BaseHTTPRequestHandler):
    payload = b""
    served_ranges: list = []

    def do_GET(self):
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        type(self).served_ranges.append(start)
        body = self.payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_download_resumes_partial_file_and_checks_md5(tmp_path):
    import hashlib

    data = bytes(range(256)) * 400
    _RangeHandler.payload, _RangeHandler.served_ranges = data, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = tmp_path / "f.tar"
        (tmp_path / "f.tar.part").write_bytes(data[:1000])
        url = f"http://127.0.0.1:{server.server_address[1]}/f.tar"
        fetch(url, dest, hashlib.md5(data).hexdigest())
        assert dest.read_bytes() == data and _RangeHandler.served_ranges == [1000]
        with pytest.raises(DatasetError, match="md5"):
            fetch(url, tmp_path / "g.tar", "0" * 32)
    finally:
        server.shutdown()


def test_safe_extract_refuses_escape(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(DatasetError, match="outside"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tf:
        info = tarfile.TarInfo("VOCdevkit/x")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(DatasetError, match="outside"):
        safe_extract(link, tmp_path / "out2")


def test_safe_extract_good_archive(tmp_path):
    archive = tmp_path / "ok.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("VOCdevkit/VOC2012/a.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"ok"))
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out/VOCdevkit/VOC2012/a.txt").read_bytes() == b"ok"


def test_cityscapes_download_explains_which_zip(tmp_path, capsys):
    assert main(["data", "download", "cityscapes", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "leftImg8bit_trainvaltest.zip" in err and "gtFine_trainvaltest.zip" in err and str(tmp_path) in err
    with pytest.raises(DatasetError):
        prepare_cityscapes(tmp_path)


def test_a_dataset_is_one_entry_of_the_table(synth_voc_root, monkeypatch, capsys):
    """Everything reads the table: a new entry is a dataset the configs, the CLI and training
    know, with its own classes, and nothing else changes."""
    import dataclasses

    from deeplab_sweep.datasets import catalog
    from deeplab_sweep.search.compose import load_job
    from deeplab_sweep.trainable.engine import LocalWorker, fit
    from tests.conftest import CONF

    names = ("background", "one", "two", "three", "four", "five")
    monkeypatch.setitem(
        catalog.DATASETS, "shapes", dataclasses.replace(catalog.DATASETS["voc"], name="shapes", class_names=names)
    )
    overrides = ["data.name=shapes", "train.epochs=1", "data.max_train_images=8", "data.max_val_images=2"]
    cfg = load_job(CONF / "train" / "demo.yaml", [f"data.root={synth_voc_root}", *overrides]).run
    assert cfg.data.num_classes == 6
    (report,) = fit(cfg, LocalWorker())
    assert {k for k in report if k.startswith("val/iou/")} == {f"val/iou/{n}" for n in names}
    assert main(["data", "verify", "shapes", "--root", str(synth_voc_root)]) == 0
    assert "shapes at" in capsys.readouterr().out
