"""`deeplab export`: ONNX (in ONNX Runtime) and TorchScript give the eager model's logits, with
the batch, height and width free; the sidecar says how to feed the model; bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deeplab_sweep.cli import main
from deeplab_sweep.trainable.inference import load_model
from tests.conftest import random_checkpoint

VOC_CLASSES = 21
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet50"])
@pytest.mark.parametrize("stride", [8, 16])
def test_onnx_and_torchscript_give_the_eager_logits(tmp_path, backbone, stride, capsys):
    import onnxruntime

    path = random_checkpoint(tmp_path / "ckpt", f"model.backbone={backbone}", f"model.output_stride={stride}")
    for fmt in ("onnx", "torchscript"):
        assert main(["export", "--checkpoint", str(path), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    eager, _, _ = load_model(path)
    onnx = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    script = torch.jit.load(str(tmp_path / "torchscript" / "model.pt"))
    for shape in ((1, 3, 97, 129), (2, 3, 160, 64)):  # batch, height and width other than the traced ones
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = eager(x).numpy()
            got_script = script(x).numpy()
        (got_onnx,) = onnx.run(None, {"image": x.numpy()})
        assert want.shape == (shape[0], VOC_CLASSES, *shape[2:])
        # To 1e-4 relative; near zero, to 1e-5 of the logits' range (a random ResNet's logits
        # reach ~300 here, and the eager model's own fp32 error against fp64 is 1e-6 of that).
        atol = 1e-5 * float(np.abs(want).max())
        np.testing.assert_allclose(got_onnx, want, rtol=1e-4, atol=atol)
        np.testing.assert_allclose(got_script, want, rtol=1e-4, atol=atol)
    sidecar = json.loads((tmp_path / "onnx" / "model.json").read_text())
    assert {k: sidecar["input"][k] for k in IMAGENET} == IMAGENET
    assert len(sidecar["classes"]) == VOC_CLASSES and sidecar["classes"][0] == "background"
    assert sidecar["model"] == {"backbone": backbone, "output_stride": stride} and sidecar["file"] == "model.onnx"


def test_bad_input_to_export_is_one_line(tmp_path, capsys):
    garbage = tmp_path / "bad" / "checkpoint.pt"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a checkpoint")
    own = random_checkpoint(tmp_path / "own", "model.factory=tests.toy_model:build")
    good = random_checkpoint(tmp_path / "good", "model.backbone=mobilenet_v2")
    cases = {
        (str(garbage), "onnx"): f"error: {garbage}: not a loadable checkpoint (",
        (str(good), "tflite"): "error: --format = 'tflite': not one of onnx, torchscript",
        (str(own), "torchscript"): f"error: {own}: its config names model.factory = 'tests.toy_model:build'",
    }
    for (ckpt, fmt), says in cases.items():
        assert main(["export", "--checkpoint", ckpt, "--format", fmt, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(says) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
