"""Your own model through `model.factory` (checked before Ray),
`model.norm` bn | syncbn | gn, visual validation PNGs in MLflow, and validation on centre crops
or whole images."""

from __future__ import annotations

import re

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torchvision.io import read_image

from deeplab_sweep.datasets.base import read_mask
from deeplab_sweep.errors import ConfigError
from deeplab_sweep.search.compose import load_job
from deeplab_sweep.trainable.engine import evaluate, val_loader
from deeplab_sweep.trainable.models import (
    build_from_config,
    build_model,
    check_model,
    param_groups,
    registered_backbones,
    registered_models,
)
from deeplab_sweep.trainable.run_config import ModelConfig
from tests.conftest import CONF

TOY = "tests.toy_model:build"


def _norms(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))}


def test_builtin_is_registered_like_a_user_model():
    assert registered_models() == ["deeplabv3plus"]
    assert ModelConfig().factory == "deeplabv3plus"
    with pytest.raises(ValueError, match=r"unknown model 'deeplab'; allowed: deeplabv3plus, or your own"):
        ModelConfig(factory="deeplab")
    # A user model has no DeepLab backbone to validate; its own keys go in `options`.
    cfg = ModelConfig(factory=TOY, backbone="my-own", options={"width": 4})
    model = build_from_config(cfg, 5)
    assert model.head.out_channels == 5 and model.head.in_channels == 4
    assert len(param_groups(model, 0.1, 0.1)) == 1  # no param_groups method: one group, full LR


@pytest.mark.parametrize(
    "factory, message",
    [
        ("tests.toy_model:build_wrong_shape", r"gave \(2, 21, 33, 33\); expected logits of shape \(2, 21, 65, 65\)"),
        ("tests.toy_model:build_broken", r"failed to build \(RuntimeError: my factory is broken\)"),
        ("tests.no_such_module:build", r"cannot import 'tests.no_such_module'"),
        ("tests.toy_model:missing", r"'tests.toy_model' has no callable 'missing'"),
    ],
)
def test_bad_factory_is_named_by_the_cli_before_ray(factory, message, synth_voc_root, workdir, capsys):
    import ray

    from deeplab_sweep.cli import main

    ray_before = ray.is_initialized()
    rc = main(["train", str(CONF / "train" / "demo.yaml"), f"data.root={synth_voc_root}", f"model.factory={factory}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"model.factory = {factory!r}" in err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert ray.is_initialized() == ray_before, "checked before any cluster work"


def test_check_model_accepts_every_builtin_variant():
    from tests.test_models import PARAMS  # the reference implementation's counts

    # GroupNorm has a weight and bias per channel, as BatchNorm: the same parameter count.
    for backbone in registered_backbones():
        assert check_model(ModelConfig(backbone=backbone, norm="gn"), 21) == PARAMS[backbone]


@pytest.mark.parametrize("backbone", registered_backbones())
def test_group_norm_head_and_backbone(backbone):
    model = build_model(backbone, 21, 16, norm="gn")
    assert _norms(model) == {nn.GroupNorm}
    assert all(m.num_channels % m.num_groups == 0 for m in model.modules() if isinstance(m, nn.GroupNorm))
    assert model.eval()(torch.randn(1, 3, 65, 97)).shape == (1, 21, 65, 97)
    # GroupNorm does not depend on the batch: one image alone gives what it gives in a batch.
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        model.train()
        model.classifier.aspp.project[-1].eval()  # dropout off; the norms stay in training mode
        torch.testing.assert_close(model(x)[:1], model(x[:1]), rtol=1e-4, atol=1e-4)


def test_pretrained_backbone_keeps_batch_norm(tmp_path, monkeypatch):
    from torchvision.models import mobilenet_v2

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(mobilenet_v2().state_dict(), tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth")
    model = build_model("mobilenet_v2", 21, 16, pretrained_backbone=True, norm="gn")
    assert _norms(model.backbone) == {nn.BatchNorm2d}, "ImageNet BN statistics are loaded, not replaced"
    assert _norms(model.classifier) == {nn.GroupNorm}


def test_syncbn_builds_batch_norm_and_is_searchable(tmp_path):
    assert _norms(build_model("mobilenet_v2", 21, 16, norm="syncbn")) == {nn.BatchNorm2d}
    (tmp_path / "s.yaml").write_text(
        "defaults: [train/demo]\nspace:\n  model.norm: {type: choice, values: [bn, syncbn, gn]}\n"
        "  model.options.width: {type: choice, values: [4, 8]}\n"
    )
    from deeplab_sweep.search.checks import check_space

    check_space(load_job(tmp_path / "s.yaml", ["data.root=/x"], conf_root=CONF))
    (tmp_path / "bad.yaml").write_text("defaults: [train/demo]\nspace:\n  model.norm: {type: choice, values: [ln]}\n")
    with pytest.raises(ConfigError, match=r"space.model.norm: value 'ln' is invalid: model.norm = 'ln'"):
        check_space(load_job(tmp_path / "bad.yaml", ["data.root=/x"], conf_root=CONF))


def test_sweep_values_are_checked_before_ray(tmp_path, synth_voc_root, workdir):
    """A searched value that breaks the model (6 channels in 4 groups) is named up front."""
    import ray

    from deeplab_sweep.search.sweep import run_sweep

    (tmp_path / "s.yaml").write_text(
        f"defaults: [train/demo]\nmodel: {{factory: '{TOY}', norm: gn}}\n"
        "space:\n  model.options.width: {type: choice, values: [8, 6]}\n"
    )
    ray_before = ray.is_initialized()
    with pytest.raises(
        ConfigError,
        match=r"model.factory = 'tests.toy_model:build' failed to build "
        r"\(ValueError: num_channels \(6\) must be divisible by num_groups \(4\)\) "
        r"\(with space model.options.width=6\)",
    ):
        run_sweep(load_job(tmp_path / "s.yaml", [f"data.root={synth_voc_root}"], conf_root=CONF))
    assert ray.is_initialized() == ray_before


@pytest.mark.parametrize("val_crop", [None, 48])
def test_validation_whole_images_or_centre_crops(val_crop, synth_voc_root):
    """Whole images: every labelled pixel of every val mask is counted once, at its own size.
    Centre crops: val_crop x val_crop per image."""
    cfg = load_job(
        CONF / "train" / "demo.yaml",
        [f"data.root={synth_voc_root}", "data.max_val_images=5", f"data.val_crop={val_crop if val_crop else 'null'}"],
    ).run
    loader = val_loader(cfg)
    ds = loader.dataset
    raw = [read_mask(mask_path) for _, mask_path in ds.samples]
    sizes = [tuple(m.shape[-2:]) for _, m in (ds[i] for i in range(len(ds)))]
    if val_crop is None:
        assert sizes == [tuple(r.shape[-2:]) for r in raw]
        assert len(set(sizes)) > 1, "the generated val images differ in size"
        labelled = sum(int((r != 255).sum()) for r in raw)
    else:
        assert set(sizes) == {(val_crop, val_crop)}
        labelled = sum(int((m != 255).sum()) for _, m in (ds[i] for i in range(len(ds))))
    model = build_model("mobilenet_v2", 21, 16).eval()
    cm = evaluate(model, loader, 21, torch.device("cpu"), cfg)
    assert int(cm.mat.sum()) == labelled


@pytest.mark.slow
def test_user_model_trains_sweeps_evaluates_and_predicts(ray_cluster, synth_voc_root, workdir, tmp_path):
    """The tests' own model, with a searched norm and width, through the whole product."""
    from deeplab_sweep.search.best import fetch_best
    from deeplab_sweep.search.sweep import run_sweep
    from deeplab_sweep.trainable.inference import evaluate_checkpoint, load_model, predict_files

    (tmp_path / "toy.yaml").write_text(f"""\
defaults: [train/demo]
model: {{factory: "{TOY}"}}
data: {{max_train_images: 8, max_val_images: 4, crop_size: 48}}
train: {{epochs: 2, lr: 0.05, cpus_per_worker: 0.95, visuals: 2}}
sweep: {{search: grid, num_samples: 1, asha: {{enabled: false}}, name: toy}}
space:
  model.norm: {{type: grid, values: [bn, gn]}}
  model.options.width: {{type: grid, values: [8]}}
""")
    summary = run_sweep(load_job(tmp_path / "toy.yaml", [f"data.root={synth_voc_root}"], conf_root=CONF))
    assert sorted(t.params["model.norm"] for t in summary.trials) == ["bn", "gn"]
    assert all(t.epochs == 2 and not t.error for t in summary.trials), summary.trials

    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    runs = [
        r
        for r in c.search_runs([c.get_experiment_by_name("deeplab").experiment_id])
        if r.data.tags.get("deeplab.kind") == "trial"
    ]
    assert {r.data.params["model.factory"] for r in runs} == {TOY}
    for r in runs:
        assert sorted(a.path for a in c.list_artifacts(r.info.run_id, "visuals")) == [
            f"visuals/{kind}_epoch_{e:04d}.png" for kind in ("confusion", "val_images") for e in (1, 2)
        ]
        png = c.download_artifacts(r.info.run_id, "visuals/val_images_epoch_0002.png", str(tmp_path / r.info.run_id))
        grid = read_image(png)
        assert grid.shape[1] == 2 * 160 + 4  # two fixed images, one row each

    # Your own model's checkpoint loads once you name its factory (a checkpoint is untrusted input).
    best = fetch_best(
        f"sqlite:///{workdir}/runs/mlflow.db", "deeplab", workdir / "best", sweep="toy", model_factory=TOY
    )
    model, cfg, _ = load_model(best["local_path"], model_factory=TOY)
    assert cfg.model.factory == TOY and type(model).__name__ == "TinyFCN"
    assert evaluate_checkpoint(best["local_path"], model_factory=TOY)["val/mIoU"] == best["value"]
    image = sorted((synth_voc_root / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))[0]
    written = predict_files(best["local_path"], [image], tmp_path / "pred", model_factory=TOY)
    assert {p.name for p in written} == {f"{image.stem}_{s}.png" for s in ("mask", "overlay", "ids")}
