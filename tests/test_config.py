"""Configs composed from parts, overrides, validation errors, round trip, CLI."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from deeplab_sweep.cli import main
from deeplab_sweep.errors import ConfigError
from deeplab_sweep.search.checks import check_space
from deeplab_sweep.search.compose import compose, dump_yaml, load_job, load_yaml_config
from deeplab_sweep.search.job_config import JobConfig
from tests.conftest import CONF

DEMO = CONF / "train" / "demo.yaml"


def test_demo_composes_from_parts():
    job = load_job(DEMO)
    assert job.model.backbone == "mobilenet_v2" and job.model.output_stride == 16  # model/mobilenet_v2_os16
    assert job.data.root == "runs/data/synth_voc" and job.data.synthesize  # data/synth_voc
    assert job.mlflow.tracking_uri == "sqlite:///runs/mlflow.db"  # mlflow/local
    assert job.train.epochs == 4  # the file's own keys on top


def test_overrides_set_values_and_swap_groups():
    job = load_job(DEMO, ["train.lr=0.007", "model=resnet101_os8", "data.crop_size=96", "train.amp=bf16"])
    assert job.train.lr == 0.007
    assert (job.model.backbone, job.model.output_stride) == ("resnet101", 8)
    assert job.data.crop_size == 96 and job.train.amp == "bf16"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=0.1", "train.lrr: unknown key; allowed: epochs, lr,"),
        ("train.lr=0", "train.lr = 0: Input should be greater than 0"),
        ("train.lr=-1e-3", "train.lr = -0.001: Input should be greater than 0"),
        ("model.output_stride=12", "model.output_stride = 12: Input should be 8 or 16"),
        ("data.crop_size=16", "data.crop_size = 16: Input should be greater than or equal to 32"),
        ("data.crop_size=64.5", "data.crop_size = 64.5: Input should be a valid integer"),
        ("data.crop_size=big", "data.crop_size = 'big': Input should be a valid integer"),
        (
            "model.backbone=vgg16",
            "model.backbone = 'vgg16': unknown backbone 'vgg16'; "
            "allowed: mobilenet_v2, mobilenet_v2_reference, resnet101, resnet50",
        ),
        ("train.num_workers=0", "train.num_workers = 0: Input should be greater than or equal to 1"),
        ("bogus.key=1", "bogus: unknown key; allowed: data, model, train"),
        ("model=nope", "default 'model/nope' not found"),
    ],
)
def test_bad_values_name_key_and_allowed(override, expected):
    with pytest.raises(ConfigError) as e:
        load_job(DEMO, [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_bad_input_exits_2_before_ray(capsys):
    import ray

    ray_before = ray.is_initialized()  # the session's test cluster may already be up
    rc = main(["train", str(DEMO), "model.output_stride=12"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == "error: model.output_stride = 12: Input should be 8 or 16"
    assert ray.is_initialized() == ray_before


def test_missing_dataset_root_exits_2(capsys, workdir):
    rc = main(["train", str(DEMO), "data.synthesize=false", "data.root=/nonexistent/voc"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.root = '/nonexistent/voc': dataset root does not exist" in err


def test_malformed_yaml_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.1\n   epochs: [3\n")
    rc = main(["train", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "line" in err and "malformed YAML" in err


def test_resolved_config_round_trips_through_yaml():
    job = load_job(DEMO, ["train.lr=0.003", "data.val_crop=96", "train.grad_clip=5.0"])
    text = dump_yaml(job)
    again = load_yaml_config(text)
    assert again == job and isinstance(again, JobConfig)
    assert yaml.safe_load(text)["train"]["lr"] == 0.003


def test_print_config_cli(capsys):
    assert main(["train", str(DEMO), "train.epochs=7", "--print-config"]) == 0
    assert load_yaml_config(capsys.readouterr().out).train.epochs == 7


def _all_job_files():
    return sorted(p for d in ("train", "sweep") for p in (CONF / d).glob("*.yaml"))


@pytest.mark.parametrize("path", _all_job_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_validates_and_builds_on_cpu(path):
    """CPU smoke test of every config: it validates, and its model runs a forward pass."""
    import torch

    from deeplab_sweep.trainable.models import build_from_config

    job = load_job(path, ["model.pretrained_backbone=false"])
    if job.space:
        check_space(job)
    model = build_from_config(job.model, job.data.num_classes).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, job.data.num_classes, 64, 64)


def test_compose_detects_cycles(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "data" / "a.yaml").write_text("defaults: [data/b]\n")
    (tmp_path / "data" / "b.yaml").write_text("defaults: [data/a]\n")
    with pytest.raises(ConfigError, match="cycle"):
        compose(tmp_path / "data" / "a.yaml")


@pytest.mark.parametrize("cmd", ["data", "train", "sweep", "best", "import-checkpoint", "eval", "predict"])
def test_every_subcommand_has_help_with_examples(cmd):
    out = subprocess.run([sys.executable, "-m", "deeplab_sweep.cli", cmd, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "examples:" in out.stdout and "deeplab " + cmd in out.stdout


def test_a_web_server_at_the_cluster_address_is_named_not_ray(workdir, capsys, synth_voc_root):
    """A web server where the GCS should be (a dashboard's or MLflow's port, given by mistake):
    one line saying it is not a Ray cluster, exit 2, nothing logged."""
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the server's lines would mix with the command's one
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        rc = main(["train", str(CONF / "train/demo.yaml"), f"data.root={synth_voc_root}", "--address", address])
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: cluster.address = '{address}': something answers there, but not a Ray cluster")
    assert not (workdir / "runs").exists(), "nothing logged"


@pytest.mark.parametrize("cmd", ["train", "sweep"])
def test_unreachable_cluster_is_a_clear_error_without_dangling_runs(cmd, workdir, capsys, synth_voc_root):
    from mlflow.tracking import MlflowClient

    conf = CONF / ("train/demo.yaml" if cmd == "train" else "sweep/demo.yaml")
    rc = main([cmd, str(conf), f"data.root={synth_voc_root}", "--address", "127.0.0.1:1"])
    assert rc == 2
    assert "cluster.address = '127.0.0.1:1': no Ray cluster answers there" in capsys.readouterr().err
    db = workdir / "runs" / "mlflow.db"
    if db.exists():
        c = MlflowClient(f"sqlite:///{db}")
        assert all(not c.search_runs([e.experiment_id]) for e in c.search_experiments())


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", str(CONF / "sweep" / "demo.yaml"), "--tracking-uri", "http://127.0.0.1:1"],
        ["train", str(DEMO), "mlflow.tracking_uri=http://127.0.0.1:1"],
        ["best", "--experiment", "deeplab", "--tracking-uri", "http://127.0.0.1:1"],
    ],
)
def test_unreachable_tracking_server_is_a_clear_error_before_ray(argv, workdir, capsys, synth_voc_root):
    import time

    import ray

    ray_before = ray.is_initialized()
    t = time.monotonic()
    rc = main(argv + ([f"data.root={synth_voc_root}"] if argv[0] != "best" else []))
    assert rc == 2 and time.monotonic() - t < 30
    assert "http://127.0.0.1:1': tracking server does not answer" in capsys.readouterr().err
    assert ray.is_initialized() == ray_before


SWEEP = CONF / "sweep" / "demo.yaml"


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "train.epochs=1",
            "error: sweep.asha.grace_period = 2 is more than train.epochs = 1: lower the grace period, "
            "raise train.epochs, or set sweep.asha.enabled=false",
        ),
        (
            "train.eval_every=3",
            "error: sweep.asha.grace_period = 2: ASHA judges trials at epochs 2; train.eval_every = 3 evaluates "
            "no result at epoch 2: make the grace period a multiple of 3, or evaluate more often",
        ),
        (
            "sweep.metric=val/not_a_metric",
            "error: sweep.metric = 'val/not_a_metric': no trial reports it; allowed: train/loss, train/lr, "
            "train/images_per_s, train/epoch_time_s, train/first_step_s, val/mIoU, val/overall_acc, val/mean_acc, "
            "val/time_s, model/params, model/gflops, model/latency_ms, model/peak_mem_mb, "
            "or val/iou/<class> for a class of voc",
        ),
        (
            "sweep.objectives={val/mIoU: max, val/nope: min}",
            "error: sweep.objectives.val/nope = 'val/nope': no trial reports it",
        ),
        (
            "sweep.objectives={model/latency_ms: min, val/mIoU: max}",
            "error: sweep: metric/mode (val/mIoU, max) differ from the first of objectives (model/latency_ms: min)",
        ),
        (
            "sweep.constraints={model/peak_mem_mb: '< 5'}",
            "error: sweep.constraints.model/peak_mem_mb = '< 5': expected METRIC<=NUMBER or METRIC>=NUMBER",
        ),
        ("sweep.warm_start=[nope]", "error: sweep.warm_start: no sweep named 'nope' in MLflow experiment 'deeplab'"),
        (
            "sweep.budget.gpu_hours=10",
            "error: sweep.budget.gpu_hours = 10.0: trials hold no GPU (train.use_gpu=false); "
            "budget them in sweep.budget.cpu_hours",
        ),
        ("sweep.metric=val/iou/nope", "error: sweep.metric = 'val/iou/nope': no trial reports it"),
        (
            "sweep.budget.epochs=null",
            "error: sweep.hand_over.at = 0.25: a share of the sweep's budget, and it has none; set "
            "sweep.budget.epochs, cpu_hours or wall_time_s",
        ),
        (
            "model.backbone=resnet101",
            "space.data.batch_size.cases has no entry for it; allowed: mobilenet_v2, resnet50",
        ),
    ],
)
def test_sweep_bad_input_is_one_line_before_ray(override, expected, workdir, capsys):
    import ray

    ray_before = ray.is_initialized()
    assert main(["sweep", str(SWEEP), override, "sweep.name=bad"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in err and ray.is_initialized() == ray_before
    assert not (workdir / "runs" / "ray" / "bad").exists()


def test_per_class_iou_is_a_metric_a_sweep_may_use(workdir):
    from deeplab_sweep.search.checks import check_sweep

    check_sweep(load_job(SWEEP, ["sweep.metric=val/iou/aeroplane"]))


def test_overriding_a_searched_key_pins_it(capsys):
    job = load_job(SWEEP, ["data.crop_size=96", "model.backbone=resnet50"])
    err = capsys.readouterr().err
    assert "note: data.crop_size = 96 is pinned: space.data.crop_size is left out of this sweep" in err
    assert job.data.crop_size == 96 and "data.crop_size" not in job.space
    assert job.model.backbone == "resnet50" and "model.backbone" not in job.space
    # the batch size that depended on the backbone is now the choice of its resnet50 case
    assert (job.space["data.batch_size"].type, job.space["data.batch_size"].values) == ("choice", [4, 8])


@pytest.mark.parametrize("name", ["a/b", "it's", "two words", "-lead", "x" * 101])
def test_a_sweep_name_is_a_folder_tag_and_study_name(name, workdir, capsys):
    """A `/` nests the sweep's folder (its trials then map to no tag: sync made a second run per
    trial); a `'` breaks MLflow's filter strings."""
    assert main(["sweep", str(SWEEP), f"sweep.name={name}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: sweep.name = {name!r}: use letters, digits, '.', '_' and '-' only"), err
    assert err.count("\n") == 1 and not (workdir / "runs").exists()


@pytest.mark.parametrize("key", ["train.num_workers", "train.cpus_per_worker", "train.use_gpu", "train.torch_threads"])
def test_a_space_cannot_draw_a_trials_resources(key, workdir, capsys):
    """They are reserved (or, threads, set in a reused actor) before a trial's values are drawn."""
    values = "[true, false]" if key == "train.use_gpu" else "[1, 2]"
    assert main(["sweep", str(SWEEP), f"space.{key}={{type: choice, values: {values}}}", "sweep.name=r"]) == 2
    err = capsys.readouterr().err
    assert f"error: space.{key}: a trial's resources and threads are fixed before its values are drawn" in err
    assert err.count("\n") == 1 and not (workdir / "runs").exists()


def test_space_overrides_by_dotted_key():
    job = load_job(
        SWEEP,
        [
            "space.train.lr.high=0.1",  # one field of a searched key
            "space.model.separable={type: choice, values: [false, true]}",  # a whole entry
            "space.data.crop_size=null",  # dropped: not searched any more
        ],
    )
    assert (job.space["train.lr"].low, job.space["train.lr"].high) == (0.005, 0.1)
    assert job.space["model.separable"].values == [False, True]
    assert "data.crop_size" not in job.space
    assert set(load_job(SWEEP, ["space=pareto"]).space) == {
        "train.lr",
        "model.output_stride",
        "model.backbone",
        "model.separable",
    }


@pytest.mark.parametrize(
    "override, expected",
    [
        ("space.train.lr.hgh=0.1", "override space.train.lr.hgh=0.1: give a whole entry"),
        ("space.train.momentum.high=0.9", "override space.train.momentum.high=0.9: give a whole entry"),
        ("space=nope", "default 'sweep/space/nope' not found"),
    ],
)
def test_bad_space_override_is_one_line(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)) as e:
        load_job(SWEEP, [override])
    assert "\n" not in str(e.value)


def test_a_group_swap_that_swaps_nothing_is_refused():
    """`space=...` on a config without a space default was silently ignored: the run went on unchanged."""
    with pytest.raises(ConfigError, match=r"override space=demo: demo.yaml has no space/ default to swap"):
        load_job(DEMO, ["space=demo"])


def test_one_objective_is_a_single_objective_sweep():
    s = load_job(SWEEP, ["sweep.objectives={val/mIoU: max}"]).sweep
    assert s.objectives is None and s.objective_list == [("val/mIoU", "max")] and s.also_best == ()
