"""Where trials go, before any trial starts: packing workers onto node types, trials at once
now and at the autoscaler's maximum, `deeplab sweep --plan` over every shipped launcher
example and real sweep, and a sweep that cannot fit refused in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deeplab_sweep.cli import main
from deeplab_sweep.search.placement import NodeType, make_plan, pack
from tests.conftest import CONF

LAUNCHERS = sorted((CONF / "cluster" / "launcher").glob("*.yaml"))
REAL_SWEEPS = [CONF / "sweep" / n for n in ("voc.yaml", "cityscapes.yaml", "voc_finetune.yaml")]


def test_exact_fit_nodes_take_one_worker_each():
    """Four 8-CPU GPU nodes, workers of 8 CPUs: one trial of four workers, one per node."""
    nodes = [("gpu", {"CPU": 8.0, "GPU": 1.0})] * 4 + [("head", {"CPU": 0.0})]
    assert pack(nodes, {"CPU": 8.0, "GPU": 1.0}, 4) == (1, {"gpu": 4})
    assert pack(nodes, {"CPU": 8.0, "GPU": 1.0}, 2) == (2, {"gpu": 2})
    assert pack(nodes, {"CPU": 8.0, "GPU": 1.0}, 5) == (0, {})


def test_workers_pack_onto_as_few_nodes_as_possible():
    nodes = [("big", {"CPU": 8.0, "GPU": 4.0}), ("big", {"CPU": 8.0, "GPU": 4.0})]
    assert pack(nodes, {"CPU": 2.0, "GPU": 1.0}, 4) == (2, {"big": 4})


def test_plan_counts_now_and_at_the_largest():
    class Train:
        num_workers, cpus_per_worker, use_gpu, resources_per_worker = 2, 1.0, False, {}

    plan = make_plan(Train, [NodeType("head", {"CPU": 0.0}, 1, 1), NodeType("w", {"CPU": 1.0}, 0, 6)], "test")
    assert (plan.at_once_now, plan.at_once_most, plan.one_trial) == (0, 3, {"w": 2})


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda p: p.name)
@pytest.mark.parametrize("sweep", REAL_SWEEPS, ids=lambda p: p.name)
def test_every_real_sweep_fits_every_launcher_example(sweep: Path, launcher: Path, capsys):
    assert main(["sweep", str(sweep), "--plan", "--cluster-config", str(launcher)]) == 0
    out = capsys.readouterr().out
    assert "trials at once:" in out and "at the largest" in out
    assert "ESTIMATE" in out and "GPU-hours" in out


def test_plan_that_cannot_fit_names_the_key(capsys):
    launcher = str(LAUNCHERS[0])
    rc = main(
        ["sweep", str(CONF / "sweep" / "voc.yaml"), "--plan", "--cluster-config", launcher, "train.cpus_per_worker=12"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: train.cpus_per_worker = 12 does not fit any node") and "\n" == err[-1]
    rc = main(
        ["sweep", str(CONF / "sweep" / "voc.yaml"), "--plan", "--cluster-config", launcher, "train.num_workers=5"]
    )
    assert rc == 2 and "train.num_workers = 5 x {CPU: 8, GPU: 1} does not fit" in capsys.readouterr().err


def test_sweep_that_cannot_fit_is_refused_before_ray(synth_voc_root, workdir, tmp_path, capsys):
    import ray

    launcher = tmp_path / "small.yaml"
    launcher.write_text(
        "max_workers: 2\nhead_node_type: head\navailable_node_types:\n"
        "  head: {resources: {CPU: 0}}\n  w: {resources: {CPU: 1}, min_workers: 0, max_workers: 2}\n"
    )
    ray_before = ray.is_initialized()
    rc = main(
        [
            "sweep",
            str(CONF / "sweep" / "demo.yaml"),
            f"data.root={synth_voc_root}",
            "--cluster-config",
            str(launcher),
            "train.num_workers=3",
            "train.cpus_per_worker=1",
        ]
    )
    assert rc == 2 and "train.num_workers = 3 x {CPU: 1} does not fit" in capsys.readouterr().err
    assert ray.is_initialized() == ray_before and not (workdir / "runs" / "ray").exists()


@pytest.mark.parametrize(
    ("backbone", "separable", "norm"),
    [("mobilenet_v2", False, "bn"), ("resnet50", True, "bn"), ("mobilenet_v2", False, "gn")],
)
def test_the_estimates_flops_equal_a_count_from_the_convolutions_shapes(backbone, separable, norm):
    """The FLOPs behind `--plan`'s GPU-hours against a count made without torch's FLOP counter:
    a convolution's forward is 2 x batch x output pixels x weight elements; in training its
    weight's gradient costs the same, and so does its input's, except for the convolution that
    takes the image (nothing asks for the image's gradient). Depthwise convolutions (MobileNetV2,
    the separable head) included: torch 2.14's own backward formula counts them `groups` times.
    BatchNorm or GroupNorm: the count leaves normalisation layers out of its model."""
    import torch

    from deeplab_sweep.trainable.cost import flops_per_image
    from deeplab_sweep.trainable.models import build_from_config
    from deeplab_sweep.trainable.run_config import ModelConfig

    cfg, crop = ModelConfig(backbone=backbone, output_stride=16, separable=separable, norm=norm), 65
    convs = []  # (the conv's forward FLOPs, whether its input is the image)
    with torch.device("meta"), torch.no_grad():
        model, x = build_from_config(cfg, 21).train(), torch.empty(2, 3, crop, crop)
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(
                    lambda m, inp, out: convs.append(
                        (2 * out.shape[0] * out[0, 0].numel() * m.weight.numel(), inp[0] is x)
                    )
                )
        model(x)
    forward = sum(f for f, _ in convs)
    images_gradient = sum(f for f, is_image in convs if is_image)
    assert images_gradient > 0 and any(m.groups > 1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert flops_per_image(cfg, 21, crop, train=False) == forward / 2
    assert flops_per_image(cfg, 21, crop, train=True) == (3 * forward - images_gradient) / 2


def test_the_plans_cost_is_at_most_the_sweeps_epoch_budget():
    """No trial starts once `sweep.budget.epochs` is spent: a sweep of many trials under ASHA is
    priced at its budget, the epochs of a full trial x budget / epochs."""
    from deeplab_sweep.search.compose import load_job
    from deeplab_sweep.search.placement import cost_lines

    job = load_job(CONF / "sweep" / "voc.yaml", ["sweep.num_samples=500", "sweep.budget.epochs=92"])
    lines = cost_lines(job)
    one = float(re.search(r"one full trial .* = ([\d.]+) GPU-hours", lines[2])[1])
    assert "its budget of 92 epochs (sweep.budget.epochs)" in lines[3]
    assert float(re.search(r"= ([\d.]+) GPU-hours", lines[3])[1]) == pytest.approx(2 * one, rel=0.35)
