"""On a real local Ray cluster: DDP over 2 CPU workers (gloo), `deeplab train` logged to
a real sqlite MLflow store, and `deeplab eval` reproducing the logged metric."""

from __future__ import annotations

import json
import os

import pytest
import torch
from mlflow.tracking import MlflowClient

from deeplab_sweep.cli import main
from deeplab_sweep.search.compose import load_job
from deeplab_sweep.trainable.engine import LocalWorker, evaluate, fit, val_loader
from deeplab_sweep.trainable.inference import load_model
from deeplab_sweep.trainable.metrics import metrics_from_confusion
from deeplab_sweep.trainable.ray_train import InProcessWorker, evaluate_distributed
from tests.conftest import CONF

pytestmark = pytest.mark.slow


def test_two_workers_aggregate_metrics_like_one(ray_cluster, synth_voc_root, tmp_path):
    cfg = load_job(
        CONF / "train" / "demo.yaml",
        [f"data.root={synth_voc_root}", "train.epochs=1", "data.max_train_images=8", "data.val_batch_size=3"],
    ).run
    fit(cfg, LocalWorker(checkpoint_root=tmp_path))
    ckpt = tmp_path / "epoch_0001"
    model, cfg, _ = load_model(ckpt)
    local = evaluate(model, val_loader(cfg), cfg.data.num_classes, torch.device("cpu"), cfg).mat
    one = torch.tensor(evaluate_distributed(str(ckpt), 1))
    two = torch.tensor(evaluate_distributed(str(ckpt), 2))
    assert int(local.sum()) > 0
    assert torch.equal(one, local) and torch.equal(two, local)  # 8 val images, 3 per batch, split over 2 ranks
    assert metrics_from_confusion(two)["mIoU"] == metrics_from_confusion(local)["mIoU"]


def test_train_command_ddp_logs_one_mlflow_run(ray_cluster, synth_voc_root, workdir, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")  # never logged
    rc = main(
        [
            "train",
            str(CONF / "train" / "demo.yaml"),
            f"data.root={synth_voc_root}",
            "train.epochs=2",
            "train.num_workers=2",
            "data.batch_size=4",
            "data.max_train_images=16",
            "storage.name=ddp-run",
        ]
    )
    assert rc == 0
    capsys.readouterr()
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    exp = c.get_experiment_by_name("deeplab")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1, "one run per training, never one per DDP rank"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["deeplab.status"] == "completed"
    assert run.data.params["train.num_workers"] == "2" and run.data.params["model.backbone"] == "mobilenet_v2"
    assert not any("env-secret-value" in v for v in [*run.data.params.values(), *run.data.tags.values()])
    history = c.get_metric_history(run.info.run_id, "val/mIoU")
    assert [m.step for m in history] == [1, 2]
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert arts == {"checkpoint", "config.yaml", "visuals"}
    # each eval's image grid and confusion matrix, named by epoch, from rank 0 only.
    visuals = sorted(a.path for a in c.list_artifacts(run.info.run_id, "visuals"))
    assert visuals == [f"visuals/{kind}_epoch_{e:04d}.png" for kind in ("confusion", "val_images") for e in (1, 2)]
    assert run.info.artifact_uri.startswith(f"file://{workdir}/runs/mlartifacts")
    assert (workdir / "runs" / "ray" / "ddp-run").is_dir()

    # The logged checkpoint is the best one; eval reproduces its logged mIoU exactly.
    local = c.download_artifacts(run.info.run_id, "checkpoint", str(workdir / "dl"))
    ckpt = torch.load(f"{local}/checkpoint.pt", weights_only=True)
    best = max(m.value for m in history)
    assert ckpt["metrics"]["val/mIoU"] == best
    assert main(["eval", "--checkpoint", local]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["val/mIoU"] == best


def test_predict_writes_colour_masks(ray_cluster, synth_voc_root, tmp_path):
    from PIL import Image

    cfg = load_job(
        CONF / "train" / "demo.yaml",
        [f"data.root={synth_voc_root}", "train.epochs=1", "data.max_train_images=8", "data.max_val_images=2"],
    ).run
    fit(cfg, LocalWorker(checkpoint_root=tmp_path))
    images = sorted((synth_voc_root / "VOCdevkit/VOC2012/JPEGImages").glob("2008_*.jpg"))[:2]
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tmp_path / "epoch_0001"),
                *map(str, images),
                "--out",
                str(tmp_path / "pred"),
            ]
        )
        == 0
    )
    for img in images:
        mask = Image.open(tmp_path / "pred" / f"{img.stem}_mask.png")
        overlay = Image.open(tmp_path / "pred" / f"{img.stem}_overlay.png")
        assert mask.size == overlay.size == Image.open(img).size and mask.mode == "RGB"


def test_eval_rejects_foreign_checkpoint(tmp_path, capsys):
    p = tmp_path / "x.pt"
    torch.save({"model_state": {}, "cur_itrs": 3}, p)
    assert main(["eval", "--checkpoint", str(p)]) == 2
    assert "not a deeplab checkpoint" in capsys.readouterr().err


class _InodeProbe(InProcessWorker):
    """Notes the inode of each checkpoint.pt as the engine wrote it, before it is stored."""

    written: list[int]

    def report(self, metrics, checkpoint_dir):
        if checkpoint_dir:
            self.written.append(os.stat(f"{checkpoint_dir}/checkpoint.pt").st_ino)
        super().report(metrics, checkpoint_dir)


def test_in_process_run_writes_each_checkpoint_once_and_resumes_past_a_torn_one(synth_voc_root, tmp_path):
    """A one-worker run on local storage writes its checkpoint in its own folder and stores it
    by renaming (the file is not copied); what a process killed mid-write left there is cleared
    on resume, which continues from the last whole checkpoint."""
    run = tmp_path / "storage" / "trial_1"
    job = load_job(
        CONF / "train" / "demo.yaml",
        [
            f"data.root={synth_voc_root}",
            "data.max_train_images=8",
            "data.max_val_images=2",
            "train.keep_checkpoints=10",
        ],
    )
    reports: list[dict] = []

    def worker(epochs: int) -> _InodeProbe:
        cfg = job.run.model_copy(update={"train": job.run.train.model_copy(update={"epochs": epochs})})
        probe = _InodeProbe(cfg, str(run), "val/mIoU", "max", reports.append)
        probe.written = []
        return probe

    first = worker(2)
    fit(first.cfg, first)
    stored = [os.stat(run / f"checkpoint_epoch_{e:04d}" / "checkpoint.pt").st_ino for e in (1, 2)]
    assert stored == first.written

    torn = run / ".deeplab-ckpt-killed"
    torn.mkdir()
    (torn / "checkpoint.pt").write_bytes(b"cut short")
    second = worker(3)
    fit(second.cfg, second)
    assert [r["epoch"] for r in reports] == [1, 2, 2, 3] and reports[2].get("replayed")
    assert sorted(p.name for p in run.iterdir()) == [
        *(f"checkpoint_epoch_{e:04d}" for e in (1, 2, 3)),
        "epochs",
        "visuals",
    ]


def test_a_torn_checkpoint_is_never_ranked_kept_nor_resumed_from(synth_voc_root, tmp_path):
    """A `checkpoint_epoch_NNNN` a killed copy left short (its checkpoint.pt not the size its
    checkpoint.json records), with a better metric than any whole one: not a stored checkpoint,
    so pruning ranks, keeps and deletes only the whole ones, and a resume starts from the latest
    whole one."""
    import json

    from deeplab_sweep.trainable.run_folder import best_report, prune_checkpoints, stored_checkpoints
    from deeplab_sweep.trainable.storage import Storage

    run = tmp_path / "trial_1"
    job = load_job(
        CONF / "train" / "demo.yaml",
        [
            f"data.root={synth_voc_root}",
            "data.max_train_images=8",
            "data.max_val_images=2",
            "train.keep_checkpoints=10",
            "train.visuals=0",
            "train.epochs=3",
        ],
    )
    reports: list[dict] = []
    fit(job.run, InProcessWorker(job.run, str(run), "val/mIoU", "max", reports.append))
    torn = run / "checkpoint_epoch_0009"
    torn.mkdir()
    (torn / "checkpoint.pt").write_bytes(b"cut short")
    (torn / "checkpoint.json").write_text(json.dumps({"epoch": 9, "metrics": {"val/mIoU": 1.0}, "bytes": 10**9}))

    storage = Storage(str(run))
    assert sorted(r["epoch"] for r in stored_checkpoints(storage, str(run))) == [1, 2, 3]
    best = max(reports, key=lambda r: r["val/mIoU"])
    assert best_report(stored_checkpoints(storage, str(run)), "val/mIoU", "max")["epoch"] == best["epoch"]
    prune_checkpoints(storage, str(run), 1, "val/mIoU", "max")
    kept = {best["epoch"], 3}  # the best whole one and the latest whole one
    assert sorted(p.name for p in run.glob("checkpoint_epoch_*")) == sorted(
        [*(f"checkpoint_epoch_{e:04d}" for e in kept), "checkpoint_epoch_0009"]
    )
    resumed: list[dict] = []
    cfg = job.run.model_copy(update={"train": job.run.train.model_copy(update={"epochs": 4})})
    fit(cfg, InProcessWorker(cfg, str(run), "val/mIoU", "max", resumed.append))
    assert [(r["epoch"], bool(r.get("replayed"))) for r in resumed] == [(3, True), (4, False)]
