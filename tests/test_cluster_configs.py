"""The cluster examples are valid for the tools that read them: every Ray cluster launcher YAML
against Ray's own cluster-config schema (shipped in the ray wheel), the KubeRay RayJob against
KubeRay's published CRD schema (tests/schemas/), and both install and run what this repository
is. Nothing here starts a cluster: there is no cloud or Kubernetes on this machine."""

from __future__ import annotations

import gzip
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from deeplab_sweep.search.compose import load_job
from tests.conftest import CONF, REPO

LAUNCHERS = sorted((CONF / "cluster" / "launcher").glob("*.yaml"))
RAYJOB = CONF / "cluster" / "kuberay" / "rayjob-voc.yaml"


def _strict(schema):
    """Kubernetes rejects unknown fields (kubectl --validate=strict): where its schema neither
    lists additional properties nor preserves unknown fields, none are allowed."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_example_is_a_valid_ray_cluster_config_that_installs_this_repository(path):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, schema)
    mounts = config["file_mounts"]
    # What setup_commands install from and pin with is put on the node by file_mounts.
    pip = next(c for c in config["setup_commands"] if "pip install" in c)
    args = shlex.split(pip.split("pip install", 1)[1])
    installed, pins = args[args.index("-e") + 1], args[args.index("-c") + 1]
    assert mounts.get(installed) == ".", f"{installed} is installed but file_mounts does not carry the repository there"
    assert pins == f"{installed}/constraints.txt" and (REPO / "constraints.txt").is_file()
    assert ".gitignore" in config.get("rsync_filter", []), "runs, checkpoints and data would be uploaded"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0


def test_kuberay_rayjob_is_valid_for_kuberays_crd_and_runs_the_voc_sweep():
    with gzip.open(REPO / "tests" / "schemas" / "kuberay-v1.7.0-rayjob-v1.schema.json.gz") as f:
        schema = _strict(json.load(f))
    job = yaml.safe_load(RAYJOB.read_text())
    jsonschema.validate(job, schema)
    # The strict schema does catch a misspelt field.
    with pytest.raises(jsonschema.ValidationError, match="entryPoint"):
        jsonschema.validate({**job, "spec": {**job["spec"], "entryPoint": "x"}}, schema)

    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["enableInTreeAutoscaling"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    shared = {m["mountPath"] for m in worker["volumeMounts"]}
    # The entrypoint is a sweep this package composes, on the GPU, with its storage and data on
    # the volume every pod mounts.
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["deeplab", "sweep"]
    overrides = [w for w in words[3:] if "=" in w and not w.startswith("-")]
    sweep = load_job(CONF / "sweep" / Path(words[2]).name, overrides)
    assert sweep.train.use_gpu and sweep.train.num_workers * sweep.sweep.max_concurrent <= gpu["maxReplicas"]
    assert float(worker["resources"]["requests"]["cpu"]) >= sweep.train.cpus_per_worker
    assert any(sweep.storage.path.startswith(m) for m in shared) and any(sweep.data.root.startswith(m) for m in shared)
    assert re.fullmatch(r"http://[\w.-]+:\d+", words[words.index("--tracking-uri") + 1])
