"""`deeplab best --register` / `--log-model`: a real MLflow Model (from code, no pickle) that a
fresh process loads with `mlflow.pyfunc.load_model` and `mlflow models serve` serves, each
giving the masks `deeplab predict` writes; a user's own model code travels only when named."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from deeplab_sweep.cli import main
from deeplab_sweep.search import tracking
from tests.conftest import free_port, random_checkpoint, wait_until_answering

TOY = "tests.toy_model:build"
SERVE_TIMEOUT_S = 180


def _store(tmp_path: Path, experiment: str, checkpoint: Path) -> str:
    """A tracking store holding one finished trial run with a checkpoint, as a sweep leaves it."""
    tmp_path.mkdir(exist_ok=True)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment(experiment, artifact_location=str(tmp_path / "mlartifacts" / experiment))
    run = c.create_run(exp, tags={tracking.KIND_TAG: tracking.KIND_TRIAL, tracking.SWEEP_TAG: "s"})
    c.log_metric(run.info.run_id, tracking.best_metric("val/mIoU"), 0.5, step=3)
    c.log_artifacts(run.info.run_id, str(checkpoint.parent), "checkpoint")
    c.set_terminated(run.info.run_id)
    return uri


def _images(folder: Path) -> dict[str, Path]:
    """A PNG and a JPEG of other sizes than each other, with structure a model responds to."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:70, 0:90]
    png = np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
    jpeg = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    Image.fromarray(png).save(folder / "a.png")
    Image.fromarray(jpeg).save(folder / "b.jpg", quality=90)
    return {"png": folder / "a.png", "jpeg": folder / "b.jpg"}


# A fresh interpreter without this package's editable install: the model's own code must do.
FRESH = """
import json, sys
import numpy as np, pandas as pd
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
import mlflow.pyfunc
out = {}
for key, uri, files in json.loads(sys.argv[1]):
    model = mlflow.pyfunc.load_model(uri)
    from PIL import Image
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    encoded = [open(f, "rb").read() for f in files]
    by_bytes = model.predict(pd.DataFrame({"image": encoded}), params={"probabilities": True})
    by_array = model.predict(pd.DataFrame({"image": arrays}))
    out[key] = {
        "bytes": [m.tolist() for m in by_bytes["mask"]],
        "arrays": [m.tolist() for m in by_array["mask"]],
        "probability_sums": [float(np.abs(p.sum(0) - 1).max()) for p in by_bytes["probabilities"]],
        "code": sys.modules["deeplab_sweep.trainable.inference"].__file__,
    }
print(json.dumps(out))
"""


@pytest.mark.slow
def test_registered_model_loads_and_serves_the_masks_of_predict(tmp_path, capsys, monkeypatch):
    ckpt = random_checkpoint(tmp_path / "ckpt", "model.backbone=mobilenet_v2", "model.output_stride=16")
    uri = _store(tmp_path, "deeplab", ckpt)
    images = _images(tmp_path / "images")
    assert (
        main(["predict", "--checkpoint", str(ckpt), *map(str, images.values()), "--out", str(tmp_path / "pred")]) == 0
    )
    want = {k: np.asarray(Image.open(tmp_path / "pred" / f"{p.stem}_ids.png")) for k, p in images.items()}
    assert all(len(np.unique(m)) > 1 for m in want.values()), "masks of one class compare nothing"

    capsys.readouterr()
    argv = ["best", "--experiment", "deeplab", "--tracking-uri", uri, "--out", str(tmp_path / "best")]
    assert main([*argv, "--register", "seg", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["registered"]["alias"] == "best" and info["registered"]["version"] == 1

    # What was logged: an MLflow Model from code, nothing pickled, pinned to what is installed.
    c = MlflowClient(uri)
    version_ = c.get_model_version_by_alias("seg", "best")
    assert version_.source == info["logged_model"]["uri"] and version_.run_id == info["run_id"]
    assert [o.model_id for o in c.get_run(info["run_id"]).outputs.model_outputs] == [info["logged_model"]["model_id"]]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where MLflow resolves models:/ URIs
    local = Path(mlflow.artifacts.download_artifacts("models:/seg@best", dst_path=str(tmp_path / "m")))
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert "model_code_path" in mlmodel["flavors"]["python_function"]
    assert json.loads(mlmodel["signature"]["inputs"]) == [{"type": "binary", "name": "image", "required": True}]
    requirements = (local / "requirements.txt").read_text().split()
    for dist in ("torch", "torchvision", "numpy", "pillow", "mlflow"):
        assert f"{dist}=={version(dist)}" in requirements, requirements
    assert not [r for r in requirements if "deeplab" in r]

    # A user's own model: refused unless named, then its code travels with the model.
    toy = random_checkpoint(tmp_path / "toy", f"model.factory={TOY}")
    toy_uri = _store(tmp_path, "toy", toy)
    toy_argv = [
        "best",
        "--experiment",
        "toy",
        "--tracking-uri",
        toy_uri,
        "--out",
        str(tmp_path / "best"),
        "--log-model",
    ]
    assert main(toy_argv) == 2
    assert f"--model-factory {TOY}" in capsys.readouterr().err
    assert main([*toy_argv, "--model-factory", TOY, "--json"]) == 0
    toy_model = json.loads(capsys.readouterr().out)["logged_model"]["uri"]

    files = [str(images["png"]), str(images["jpeg"])]
    jobs = [["deeplab", "models:/seg@best", files], ["toy", toy_model, files[:1]]]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(jobs)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    for i, key in enumerate(("png", "jpeg")):
        assert np.array_equal(np.array(got["deeplab"]["bytes"][i]), want[key])
        assert max(got["deeplab"]["probability_sums"]) < 1e-5
    assert np.array_equal(np.array(got["deeplab"]["arrays"][0]), want["png"])  # a PNG decodes to the same pixels
    assert "/code/deeplab_sweep/trainable/inference.py" in got["deeplab"]["code"]
    toy_want = _predict(toy, images["png"], tmp_path / "toy_pred")
    assert np.array_equal(np.array(got["toy"]["bytes"][0]), toy_want)

    _served_masks_equal(uri, images["jpeg"], want["jpeg"], tmp_path)


def _predict(checkpoint: Path, image: Path, out: Path) -> np.ndarray:
    assert (
        main(["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(out), "--model-factory", TOY]) == 0
    )
    return np.asarray(Image.open(out / f"{image.stem}_ids.png"))


def _served_masks_equal(uri: str, image: Path, want: np.ndarray, log_folder: Path) -> None:
    """`mlflow models serve` of the registered model answers an encoded image with its mask,
    and a request that holds no image with a 400 that says why."""
    with _model_server(uri, log_folder) as port:
        request = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image.read_bytes()).decode()]]}}
        (answer,) = _post(port, request)["predictions"]
        assert np.array_equal(np.array(answer["mask"]), want)
        bad = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"not an image").decode()]]}}
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post(port, bad)
        assert refused.value.code == 400 and "image 0: corrupt or unreadable image" in refused.value.read().decode()


def _with_venv_bin() -> str:
    """PATH with this interpreter's bin/ first: MLflow's server runs `uvicorn` from PATH, which
    holds the venv's bin/ only when the venv is activated (not under `.venv/bin/python -m pytest`)."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


class _Served:
    def __init__(self, proc):
        self.proc = proc

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


@contextlib.contextmanager
def _model_server(uri: str, log_folder: Path, tries: int = 3):
    """`mlflow models serve` of models:/seg@best on 127.0.0.1; its port, once it answers. A free
    port can be taken by another process (the other chain's Ray) before the server binds it:
    a server that exits is started again on another, and its output shown if none starts."""
    for attempt in range(tries):
        port, log = free_port(), log_folder / f"serve-{attempt}.log"
        served = _Served(
            subprocess.Popen(
                [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/seg@best"]
                + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": _with_venv_bin()},
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        try:
            wait_until_answering(f"http://127.0.0.1:{port}/ping", served, SERVE_TIMEOUT_S, "mlflow models serve")
        except RuntimeError as e:
            if attempt + 1 < tries and served.proc.poll() is not None:
                continue
            raise AssertionError(f"{e}; its output ends:\n{log.read_text()[-3000:]}") from None
        try:
            yield port
        finally:
            served.stop()
        return


def _post(port: int, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as answer:
        return json.load(answer)
