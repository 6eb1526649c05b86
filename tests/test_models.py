"""DeepLabv3+ shapes and the reference's exact parameter counts, per registered backbone."""

from __future__ import annotations

import pytest
import torch

from deeplab_sweep.trainable.models import PretrainedWeightsMissing, build_model, registered_backbones

# With 21 classes, equal to the widely used PyTorch reference implementation's models.
PARAMS = {
    "resnet50": 39_761_845,
    "resnet101": 58_753_973,
    "mobilenet_v2": 5_225_717,
    "mobilenet_v2_reference": 5_225_717,
}


def test_registry_is_the_matrix():
    assert registered_backbones() == sorted(PARAMS)


@pytest.mark.parametrize("backbone", registered_backbones())
@pytest.mark.parametrize("os_", [8, 16])
def test_shapes_and_param_counts(backbone, os_):
    model = build_model(backbone, 21, os_).eval()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[backbone]
    with torch.no_grad():
        feats = model.backbone(torch.randn(2, 3, 64, 64))
        out = model(torch.randn(2, 3, 65, 97))
    assert out.shape == (2, 21, 65, 97)
    assert feats["low_level"].shape[-1] == 16  # decoder input at stride 4
    assert feats["out"].shape[-1] == 64 // os_  # dilated: stride = output stride


def test_aspp_rates_follow_output_stride():
    rates = lambda m: [b[0].dilation[0] for b in m.classifier.aspp.convs[1:4]]  # noqa: E731
    assert rates(build_model("mobilenet_v2", 21, 16)) == [6, 12, 18]
    assert rates(build_model("mobilenet_v2", 21, 8)) == [12, 24, 36]


def test_reference_key_names():
    keys = build_model("mobilenet_v2", 21, 16).state_dict().keys()
    for k in (
        "backbone.low_level_features.0.0.weight",
        "backbone.high_level_features.13.conv.0.0.weight",
        "classifier.aspp.convs.4.1.weight",
        "classifier.project.0.weight",
        "classifier.classifier.3.bias",
    ):
        assert k in keys
    assert "backbone.layer4.2.conv3.weight" in build_model("resnet50", 21, 16).state_dict()


def test_separable_head_is_smaller_and_runs():
    dense, sep = build_model("mobilenet_v2", 21, 16), build_model("mobilenet_v2", 21, 16, separable=True)
    assert sum(p.numel() for p in sep.parameters()) < sum(p.numel() for p in dense.parameters())
    assert sep.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 21, 64, 64)


def test_pretrained_missing_names_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsMissing, match=r"place mobilenet_v2-b0353104.pth .* at .*hub/checkpoints"):
        build_model("mobilenet_v2", 21, 16, pretrained_backbone=True)


def test_pretrained_from_torch_cache(tmp_path, monkeypatch):
    """The offline path: weights in the torch hub cache layout are loaded."""
    from torchvision.models import mobilenet_v2

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = mobilenet_v2()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth")
    model = build_model("mobilenet_v2", 21, 16, pretrained_backbone=True)
    assert torch.equal(model.backbone.low_level_features[0][0].weight, ref.features[0][0].weight)


def test_missing_pretrained_weights_stop_the_cli_before_ray(tmp_path, monkeypatch, capsys, synth_voc_root):
    import ray

    from deeplab_sweep.cli import main
    from tests.conftest import CONF

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    ray_before = ray.is_initialized()  # the session's test cluster may already be up
    rc = main(
        ["train", str(CONF / "train" / "demo.yaml"), f"data.root={synth_voc_root}", "model.pretrained_backbone=true"]
    )
    err = capsys.readouterr().err
    assert (
        rc == 2
        and "model.pretrained_backbone: pretrained backbone weights not found: place mobilenet_v2-b0353104.pth" in err
    )
    assert ray.is_initialized() == ray_before, "the command must fail before starting Ray"


@pytest.fixture
def tiny_backbone():
    """A user's own backbone, registered without ImageNet weights; unregistered afterwards."""
    from torch import nn

    from deeplab_sweep.trainable.models import BACKBONES, Backbone, register_backbone

    class TinyBody(nn.Module):
        def __init__(self):
            super().__init__()
            self.low, self.out = nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.Conv2d(8, 16, 1)

        def forward(self, x):
            low = self.low(x)
            return {"low_level": low, "out": self.out(low)}

    class Tiny(Backbone):
        low_level_channels, out_channels = 8, 16

        def __init__(self):
            super().__init__()
            self.body = TinyBody()

    register_backbone("tiny")(lambda output_stride=16, norm=None, state=None: Tiny())
    yield "tiny"
    BACKBONES.unregister("tiny")


def test_user_backbone_builds_and_without_weights_says_so(tiny_backbone):
    from deeplab_sweep.errors import ConfigError

    assert build_model(tiny_backbone, 5, 16).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 5, 64, 64)
    with pytest.raises(ConfigError, match=r"backbone 'tiny' has no ImageNet weights registered"):
        build_model(tiny_backbone, 5, 16, pretrained_backbone=True)


@pytest.mark.slow
def test_sweep_over_two_pretrained_backbones_reads_weights_staged_in_storage(
    ray_cluster, synth_voc_root, workdir, tmp_path, monkeypatch
):
    """Only the driver has the ImageNet weights (in its torch hub cache); the cluster's workers
    have none, and no network: the sweep stages both backbones' files into its storage before
    Ray starts, and every trial reads its own from there."""
    from mlflow.tracking import MlflowClient
    from torchvision.models import ResNet50_Weights, mobilenet_v2, resnet50

    from deeplab_sweep.search.compose import load_job
    from deeplab_sweep.search.sweep import run_sweep
    from deeplab_sweep.trainable.models import backbone_weights_of
    from deeplab_sweep.trainable.weights import file_name
    from tests.conftest import CONF

    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(mobilenet_v2().state_dict(), hub / file_name(backbone_weights_of("mobilenet_v2")))
    torch.save(resnet50().state_dict(), hub / file_name(ResNet50_Weights.IMAGENET1K_V1))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # this process only: the workers started before
    cfg = tmp_path / "pre.yaml"
    cfg.write_text(
        "defaults: [train/demo]\ndata: {max_train_images: 8, max_val_images: 2, crop_size: 48, batch_size: 4}\n"
        "model: {pretrained_backbone: true}\ntrain: {epochs: 1, cpus_per_worker: 1, visuals: 0}\n"
        "sweep: {search: grid, num_samples: 1, asha: {enabled: false}, name: pre}\n"
        "space:\n  model.backbone: {type: grid, values: [mobilenet_v2, resnet50]}\n"
    )
    summary = run_sweep(load_job(cfg, [f"data.root={synth_voc_root}"], conf_root=CONF))
    assert not any(t.error for t in summary.trials), summary.trials
    staged = workdir / "runs" / "ray" / "weights"
    assert sorted(p.name for p in staged.iterdir()) == sorted(p.name for p in hub.iterdir())
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("deeplab").experiment_id], "tags.`deeplab.kind` = 'trial'")
    assert sorted(r.data.params["model.backbone"] for r in runs) == ["mobilenet_v2", "resnet50"]
    assert {r.data.params["model.backbone_weights"] for r in runs} == {str(staged)}


@pytest.mark.slow
def test_trials_reading_staged_weights_on_a_cold_node_do_not_trip_over_each_other(s3_server, tmp_path, monkeypatch):
    """Weights staged in S3 (a real S3-compatible server), a node's torch cache empty: four trials
    starting at once each copy them into the cache; every one gets the whole file (a shared
    `.part` name was truncated and renamed under the others)."""
    import threading

    import pyarrow.fs as pafs
    from torchvision.models import mobilenet_v2

    from deeplab_sweep.trainable.models import backbone_weights_of
    from deeplab_sweep.trainable.weights import file_name, imagenet_state

    for var, value in s3_server.env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = backbone_weights_of("mobilenet_v2")
    ref = mobilenet_v2().state_dict()
    torch.save(ref, tmp_path / "w.pth")
    folder = f"s3://{s3_server.bucket}/weights"
    fs, root = pafs.FileSystem.from_uri(folder)
    pafs.copy_files(str(tmp_path / "w.pth"), f"{root}/{file_name(weights)}", destination_filesystem=fs)

    start, results = threading.Barrier(4), []

    def trial():
        start.wait()
        try:
            results.append(imagenet_state(weights, folder))
        except Exception as e:  # noqa: BLE001 - what the race raised, reported below
            results.append(e)

    threads = [threading.Thread(target=trial) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 4 and not [r for r in results if isinstance(r, Exception)], results
    assert all(torch.equal(r["features.0.0.weight"], ref["features.0.0.weight"]) for r in results)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert [p.name for p in cache.iterdir()] == [file_name(weights)]  # no temporary file left
