"""Shared fixtures: generated datasets in the real layouts, and one real local Ray cluster
(2 CPUs, capped object store, dashboard on) shut down at the end of the session."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# Quiet, small, bounded: tests must never swap this 2-core machine.
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@pytest.fixture(scope="session")
def synth_voc_root(tmp_path_factory) -> Path:
    from datasets.synth import synth_voc

    return synth_voc(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="session")
def synth_cityscapes_root(tmp_path_factory) -> Path:
    from datasets.synth import synth_cityscapes

    return synth_cityscapes(tmp_path_factory.mktemp("cityscapes"))


@pytest.fixture
def voc_copy(synth_voc_root, tmp_path) -> Path:
    """A private copy a test may damage."""
    dest = tmp_path / "voc"
    shutil.copytree(synth_voc_root, dest)
    return dest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from search.cluster import runtime_env

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=150 * 1024 * 1024, include_dashboard=True,
                 log_to_driver=False, configure_logging=False, runtime_env=runtime_env())
    yield
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a fresh folder: the embedded defaults (runs/...) land inside it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
