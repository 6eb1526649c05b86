"""Reference-implementation checkpoints imported strictly, and fine-tuning
from a checkpoint with clear errors for the wrong classes or backbone."""

from __future__ import annotations

import pytest
import torch

from deeplab_sweep.cli import main
from deeplab_sweep.search.compose import load_job
from deeplab_sweep.trainable.checkpoint import CheckpointError, load_checkpoint
from deeplab_sweep.trainable.engine import LocalWorker, fit
from deeplab_sweep.trainable.inference import load_model
from deeplab_sweep.trainable.models import SeparableConv2d, build_model
from tests.conftest import CONF


def reference_state(backbone: str, num_classes: int, separable: bool = False, seed: int = 0) -> dict:
    """A state dict in the reference's key layout: DataParallel's `module.` prefix and its
    separable convs as `body.0` / `body.1`; random values."""
    model = build_model(backbone, num_classes, 16, separable=separable)
    sep_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, SeparableConv2d)]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in model.state_dict().items():
        ref_key = key
        for p in sep_prefixes:
            if key.startswith(p):
                ref_key = p + "body." + key[len(p) :]
        # small values keep a random 50-layer network's activations finite
        value = 0.05 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t.clone()
        if key.endswith("running_var"):
            value = value.abs() + 0.5
        out["module." + ref_key] = value
    return out


def _save_reference(path, state):
    torch.save(
        {"model_state": state, "optimizer_state": {}, "scheduler_state": {}, "cur_itrs": 30000, "best_score": 0.783},
        path,
    )


@pytest.mark.parametrize("backbone, separable", [("mobilenet_v2", False), ("mobilenet_v2", True), ("resnet50", False)])
def test_import_is_strict_and_outputs_match(tmp_path, backbone, separable):
    ref = reference_state(backbone, 21, separable)
    src = tmp_path / f"best_deeplabv3plus_{backbone}_voc_os8.pth"
    _save_reference(src, ref)
    assert main(["import-checkpoint", str(src), "--out", str(tmp_path / "out")]) == 0
    model, cfg, ckpt = load_model(tmp_path / "out")
    assert (cfg.model.backbone, cfg.model.output_stride, cfg.model.separable) == (backbone, 8, separable)
    assert cfg.data.name == "voc" and ckpt["metrics"]["reference_iterations"] == 30000
    # The same tensors, put into a model by hand from the reference layout, give the same output.
    manual = build_model(backbone, 21, 8, separable=separable).eval()
    manual.load_state_dict({k.removeprefix("module.").replace(".body.", "."): v for k, v in ref.items()})
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        y = model(x)
        assert torch.isfinite(y).all() and torch.equal(y, manual(x))
    # and every reference tensor went somewhere
    assert len(ref) == len(model.state_dict())


def test_import_names_the_bad_key(tmp_path, capsys):
    ref = reference_state("mobilenet_v2", 21)
    ref["module.classifier.project.0.weight"] = torch.zeros(48, 99, 1, 1)
    _save_reference(tmp_path / "bad.pth", ref)
    assert main(["import-checkpoint", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "classifier.project.0.weight has shape (48, 99, 1, 1), the model expects (48, 24, 1, 1)" in err
    ref = reference_state("mobilenet_v2", 21)
    ref["module.extra.weight"] = torch.zeros(3)
    _save_reference(tmp_path / "extra.pth", ref)
    assert main(["import-checkpoint", str(tmp_path / "extra.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "tensors the model does not use, e.g. ['extra.weight']" in capsys.readouterr().err


def test_import_refuses_pickled_code(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model_state": Evil()}, tmp_path / "evil.pth")
    assert main(["import-checkpoint", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "not loadable as plain tensors" in capsys.readouterr().err


def _cfg(root, *overrides):
    return load_job(
        CONF / "train" / "demo.yaml",
        [
            f"data.root={root}",
            "train.epochs=1",
            "data.max_train_images=8",
            "data.max_val_images=2",
            "train.torch_threads=2",
            *overrides,
        ],
    ).run


def test_fine_tune_from_reference_checkpoint(synth_voc_root, tmp_path):
    ref = reference_state("mobilenet_v2", 21)
    _save_reference(tmp_path / "ref.pth", ref)
    worker = LocalWorker(checkpoint_root=tmp_path / "ft")
    fit(_cfg(synth_voc_root, f"train.init_checkpoint={tmp_path / 'ref.pth'}", "train.lr=1e-9"), worker)
    tuned = load_checkpoint(tmp_path / "ft" / "epoch_0001")["model"]
    # lr ~ 0: the fine-tuned conv weights are still the imported ones
    w = "classifier.classifier.0.weight"
    assert torch.allclose(tuned[w], ref["module." + w], atol=1e-4)


@pytest.mark.parametrize(
    "backbone, classes, message",
    [
        ("mobilenet_v2", 19, "is mobilenet_v2 with 19 classes; this run is mobilenet_v2 with 21 classes"),
        ("resnet50", 21, "is resnet50 with 21 classes; this run is mobilenet_v2 with 21 classes"),
    ],
)
def test_fine_tune_wrong_classes_or_backbone(synth_voc_root, tmp_path, backbone, classes, message):
    ref = reference_state(backbone, classes)
    _save_reference(tmp_path / "r.pth", ref)
    dataset = "cityscapes" if classes == 19 else "voc"
    assert (
        main(["import-checkpoint", str(tmp_path / "r.pth"), "--out", str(tmp_path / "ours"), "--dataset", dataset]) == 0
    )
    with pytest.raises(CheckpointError, match=message):
        fit(_cfg(synth_voc_root, f"train.init_checkpoint={tmp_path / 'ours'}"), LocalWorker())


def test_missing_init_checkpoint_is_a_config_error(synth_voc_root, workdir, capsys):
    rc = main(
        [
            "train",
            str(CONF / "train" / "demo.yaml"),
            f"data.root={synth_voc_root}",
            "train.init_checkpoint=/nope/ckpt.pt",
        ]
    )
    assert rc == 2 and "train.init_checkpoint = '/nope/ckpt.pt': file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_fine_tunes_from_imported_checkpoint(ray_cluster, synth_voc_root, workdir, tmp_path):
    from mlflow.tracking import MlflowClient

    from deeplab_sweep.search.sweep import run_sweep

    _save_reference(tmp_path / "ref.pth", reference_state("mobilenet_v2", 21))
    assert main(["import-checkpoint", str(tmp_path / "ref.pth"), "--out", str(tmp_path / "imported")]) == 0
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(
        "defaults: [train/demo]\n"
        "data: {max_train_images: 8, max_val_images: 2, crop_size: 48}\n"
        "train: {epochs: 1, cpus_per_worker: 0.95}\n"
        "sweep: {search: grid, num_samples: 1, asha: {enabled: false}}\n"
        "space:\n  train.lr: {type: choice, values: [0.001, 0.01]}\n"
    )
    job = load_job(
        cfg,
        [f"data.root={synth_voc_root}", "sweep.name=ft", f"train.init_checkpoint={tmp_path / 'imported'}"],
        conf_root=CONF,
    )
    summary = run_sweep(job)
    assert all(t["error"] is None and t["epochs"] == 1 for t in summary["trials"])
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("deeplab").experiment_id], "tags.`deeplab.kind` = 'trial'")
    assert {r.data.params["train.init_checkpoint"] for r in runs} == {str(tmp_path / "imported" / "checkpoint.pt")}
