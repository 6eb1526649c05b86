"""The package installs beside the rest of the ML stack: everything under one `deeplab_sweep`
namespace, Hugging Face's `datasets` (installed in this venv by the test extra) untouched, and
the `deeplab` CLI with its conf/ working from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DEEPLAB = str(Path(sys.executable).with_name("deeplab"))


def _run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("where", ["elsewhere", "repository"])
def test_hf_datasets_is_not_shadowed(where, tmp_path):
    """`python -c` puts the working folder first on sys.path: in the repository folder our
    datasets/ is right there, and must still not stand in for Hugging Face's package."""
    cwd = REPO if where == "repository" else tmp_path
    code = (
        "import datasets, deeplab_sweep.datasets.catalog as ours; "
        "print(datasets.__file__); print(callable(datasets.load_dataset)); print(ours.__file__)"
    )
    res = _run([sys.executable, "-c", code], cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    hf_file, has_load_dataset, ours = res.stdout.split()
    assert "site-packages" in hf_file and has_load_dataset == "True"
    assert Path(ours) == REPO / "datasets" / "catalog.py"


def test_only_one_top_level_package(tmp_path):
    code = (
        "import importlib.util as u; "
        "print([n for n in ('search', 'trainable', 'deeplab_sweep') if u.find_spec(n) is not None])"
    )
    res = _run([sys.executable, "-c", code], tmp_path)
    assert res.stdout.strip() == "['deeplab_sweep']", res.stdout + res.stderr


@pytest.mark.slow
def test_cli_works_from_outside_the_repository(tmp_path):
    assert _run([DEEPLAB, "--help"], tmp_path).returncode == 0
    res = _run([DEEPLAB, "data", "synth", "voc", "--out", "voc", "--train", "8", "--val", "2"], tmp_path)
    assert res.returncode == 0 and (tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages").is_dir(), res.stderr
    res = _run([DEEPLAB, "data", "verify", "voc", "--root", "voc"], tmp_path)
    assert res.returncode == 0 and "voc at voc: OK" in res.stdout, res.stdout + res.stderr
    # conf/sweep/demo.yaml is not in this folder: the installed conf/ answers for it.
    res = _run(
        [
            DEEPLAB,
            "sweep",
            "conf/sweep/demo.yaml",
            "data.root=voc",
            "sweep.num_samples=1",
            "sweep.name=one",
            "train.epochs=2",
            "sweep.asha.enabled=false",
            "cluster.num_cpus=1",
            "cluster.object_store_memory=100000000",
        ],
        tmp_path,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "best trial" in res.stdout
    assert (tmp_path / "runs" / "mlflow.db").is_file() and (tmp_path / "runs" / "ray" / "one").is_dir()
