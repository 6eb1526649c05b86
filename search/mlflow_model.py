"""A checkpoint as a real MLflow Model: a pyfunc logged from code (`pyfunc_model.py`), the
checkpoint as its artifact, the package's inference code beside it, a signature, an input
example and pinned pip requirements, linked to its trial's run; registered on request."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import is_tracking_uri_set
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deeplab_sweep.errors import ConfigError

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# What the model's code imports from this package: inference and what it needs, not Ray or MLflow.
INFERENCE_MODULE = "deeplab_sweep.trainable.inference"
PACKAGE_PARTS = ("deeplab_sweep.errors", "deeplab_sweep.datasets", "deeplab_sweep.trainable")
OWN_DISTRIBUTION = "deeplab-sweep"
MODEL_NAME = "deeplabv3plus"


def signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image")]),
        outputs=Schema(
            [
                ColSpec(Array(Array(DataType.integer)), "mask"),
                ColSpec(Array(Array(Array(DataType.float))), "probabilities", required=False),
            ]
        ),
        params=ParamSchema([ParamSpec("probabilities", DataType.boolean, False)]),
    )


def input_example() -> pd.DataFrame:
    """One small PNG (a gradient), as a served endpoint receives it."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    rgb = np.stack([np.tile(ramp, (48, 1)), np.tile(ramp[:48, None], (1, 64)), np.full((48, 64), 128, np.uint8)], -1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()]})


def pip_requirements() -> list[str]:
    """The installed versions of what the model's code imports (in a fresh interpreter): this
    package's own dependencies among them, and any imported distribution no other one requires
    (pyarrow, through Ray's filesystems); not this package, whose code travels with the model."""
    code = (
        f"import sys, importlib.metadata as md; import {INFERENCE_MODULE}; d = md.packages_distributions(); "
        "print('\\n'.join({x for m in list(sys.modules) for x in d.get(m.split('.')[0], [])}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    imported = {canonicalize_name(name) for name in out.split()} - {OWN_DISTRIBUTION}
    own = _requires(OWN_DISTRIBUTION)
    required_by_others = set().union(*(_requires(d) for d in imported))
    keep = {d for d in imported if d in own or d not in required_by_others} | {"mlflow"}
    return sorted(f"{d}=={md.version(d)}" for d in keep)


def _requires(distribution: str) -> set[str]:
    """The names a distribution requires, extras left out."""
    names = set()
    for text in md.requires(distribution) or []:
        req = Requirement(text)
        if req.marker is None or "extra" not in str(req.marker):
            names.add(canonicalize_name(req.name))
    return names


def stage_code(folder: Path, model_factory: str | None) -> list[str]:
    """The code that travels with the model, laid out for import: this package's inference
    parts, and the top-level package (or module) of a user's own factory when named."""
    root = folder / "deeplab_sweep"
    for name in PACKAGE_PARTS:
        _copy_python(name, root / name.split(".", 1)[1], root)
    paths = [str(root)]
    if model_factory:
        top = model_factory.split(":")[0].split(".")[0]
        paths.append(str(_copy_python(top, folder / "factory" / top, folder / "factory")))
    return paths


def _copy_python(module: str, dest: Path, folder: Path) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ConfigError(f"--model-factory: module {module!r} is not importable")
    dirs = [Path(p) for p in spec.submodule_search_locations or [] if Path(p).is_dir()]
    if not dirs:
        folder.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(spec.origin, folder))
    for path in dirs[0].rglob("*.py"):
        target = dest / path.relative_to(dirs[0])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


@contextlib.contextmanager
def _tracking(uri: str):
    """MLflow's model logging (and the registry's lookup of a `models:/` source) reads the
    process's tracking URI; it is put back after, unset if it was (`set_tracking_uri` writes
    the environment variable too)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    before = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def log_model(client, tracking_uri: str, run, checkpoint: Path, cfg, ckpt: dict, model_factory: str | None):
    """The checkpoint of `run` as a LoggedModel in its experiment, an output of the run at the
    checkpoint's epoch. `tracking_uri` is the resolved URI `client` uses."""
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=MODEL_NAME,
        source_run_id=run.info.run_id,
        model_type="semantic-segmentation",
        params={
            "model.backbone": cfg.model.backbone,
            "model.output_stride": str(cfg.model.output_stride),
            "model.factory": cfg.model.factory,
            "data.name": cfg.data.name,
            "data.num_classes": str(cfg.data.num_classes),
        },
        tags={f"checkpoint.{k}": f"{v:.6g}" for k, v in (ckpt.get("metrics") or {}).items() if _is_number(v)},
    )
    with tempfile.TemporaryDirectory() as tmp, _tracking(tracking_uri):
        mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            model_id=logged.model_id,
            python_model=str(MODEL_CODE),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=stage_code(Path(tmp), model_factory),
            model_config={"model_factory": model_factory} if model_factory else None,
            signature=signature(),
            input_example=input_example(),
            pip_requirements=pip_requirements(),
            metadata={"classes": list(cfg.data.spec.class_names), "checkpoint_epoch": ckpt["epoch"]},
        )
    client.log_outputs(run.info.run_id, [LoggedModelOutput(logged.model_id, step=ckpt["epoch"])])
    return client.finalize_logged_model(logged.model_id, "READY")


def register(client, tracking_uri: str, logged, name: str, alias: str) -> dict:
    """A new version of registered model `name` (created if new) from `logged`, under `alias`."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="DeepLabv3+ models registered by `deeplab best`")
    with _tracking(tracking_uri):  # the store looks a `models:/` source up in the process's tracking URI
        mv = client.create_model_version(
            name, source=f"models:/{logged.model_id}", run_id=logged.source_run_id, model_id=logged.model_id
        )
    client.set_registered_model_alias(name, alias, mv.version)
    return {"name": name, "version": mv.version, "alias": alias}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
