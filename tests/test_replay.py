"""A replay runs the sweep's own searcher and Tune scheduler on a learning-curve table: it must
make the decisions a real sweep of the same configurations made (real Ray, real training)."""

from __future__ import annotations

import csv

import optuna
import pytest

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.layout import SweepFolder
from deeplab_sweep.search.overrides import trial_overrides
from deeplab_sweep.search.replay import Table, replay
from deeplab_sweep.search.sync import read_trials
from tests.conftest import CONF

SWEEP = """\
defaults: [train/demo]
data: {max_train_images: 8, max_val_images: 2, crop_size: 48}
train: {epochs: 3, cpus_per_worker: 1, visuals: 0, keep_checkpoints: 1}
sweep: {search: tpe, num_samples: 6, max_concurrent: 1, seed: 1, tpe: {startup_trials: 2},
        asha: {enabled: true, grace_period: 1, reduction_factor: 2}, name: real}
space:
  train.lr: {type: choice, values: [0.01, 0.05, 0.2]}
  model.output_stride: {type: choice, values: [8, 16]}
"""
KEYS = ("train.lr", "model.output_stride")


def _decisions(study: optuna.Study) -> list[tuple]:
    """Per trial, in the order Optuna was asked: what it drew, how it ended, what it was told."""
    return [
        (t.params, t.state.name, t.value, dict(sorted(t.intermediate_values.items())))
        for t in sorted(study.trials, key=lambda t: t.number)
    ]


@pytest.mark.slow
def test_a_replay_makes_the_decisions_the_real_sweep_made(ray_cluster, synth_voc_root, workdir):
    from deeplab_sweep.search.sweep import run_sweep

    (workdir / "s.yaml").write_text(SWEEP)
    job = load_job(workdir / "s.yaml", [f"data.root={synth_voc_root}"], conf_root=CONF)
    summary = run_sweep(job)
    real = optuna.load_study(study_name="real", storage=f"sqlite:///{workdir}/runs/optuna.db")
    assert {"COMPLETE", "PRUNED"} <= {t.state.name for t in real.trials}, "ASHA stopped none: the test proves little"

    # The table: what each real trial reported at each epoch (the longest curve of a config drawn twice).
    trials = [
        (trial_overrides(rec.config), [r for r in rec.rows if not r.get("replayed")])
        for rec in read_trials(SweepFolder(summary.sweep_path))
    ]
    table = Table.from_trials(KEYS, sorted(trials, key=lambda t: len(t[1])))
    replayed = replay(job.model_copy(update={"sweep": job.sweep.model_copy(update={"optuna_storage": None})}), table)
    assert _decisions(replayed.study) == _decisions(real)
    assert replayed.stop_reason == summary.stop_reason


def test_a_table_is_read_as_the_generator_writes_it_and_looked_up_by_the_nearest_value(tmp_path):
    path = tmp_path / "t.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["model.backbone", "train.lr", "train.seed", "epoch", "val/mIoU", "train/epoch_time_s"])
        w.writeheader()
        for backbone in ("mobilenet_v2", "resnet50"):
            for lr in (0.01, 0.1):
                for seed in (0, 1):
                    for epoch in (1, 2):
                        w.writerow(
                            {
                                "model.backbone": backbone,
                                "train.lr": lr,
                                "train.seed": seed,
                                "epoch": epoch,
                                "val/mIoU": lr * epoch + seed,
                                "train/epoch_time_s": 2.5,
                            }
                        )
    table = Table.from_csv(path)
    assert table.keys == ("model.backbone", "train.lr") and len(table.curves) == 4
    config, curve = table.lookup({"model.backbone": "resnet50", "train.lr": 0.04, "data.crop_size": 64})
    assert config == ("resnet50", 0.1)  # 0.04 is nearer 0.1 than 0.01 on a log scale
    assert [r["val/mIoU"] for r in curve] == [0.1, 0.2] and curve[0]["train/epoch_time_s"] == 2.5
    assert (
        Table.from_csv(path, seed=1).lookup({"model.backbone": "resnet50", "train.lr": 0.01})[1][0]["val/mIoU"] == 1.01
    )
    with pytest.raises(KeyError):
        table.lookup({"model.backbone": "vgg", "train.lr": 0.01})


def _synthetic(path, early_predicts: bool) -> Table:
    """8 learning rates x 2 strides, 6 epochs: the last epoch's mIoU rises with lr; the first
    two epochs' rank the configurations the same way, or the reverse way."""
    lrs = [0.001 * 2**i for i in range(8)]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["train.lr", "model.output_stride", "train.seed", "epoch", "val/mIoU"])
        w.writeheader()
        for i, lr in enumerate(lrs):
            for os_ in (8, 16):
                final = 0.1 + 0.1 * i + (0.01 if os_ == 8 else 0)
                early = final if early_predicts else 1 - final
                for e in range(1, 7):
                    value = early / 3 if e <= 2 else final * e / 6
                    w.writerow(
                        {"train.lr": lr, "model.output_stride": os_, "train.seed": 0, "epoch": e, "val/mIoU": value}
                    )
    return Table.from_csv(path)


def _job(*overrides: str):
    return load_job(
        CONF / "sweep" / "demo.yaml",
        [
            "data.root=unused",
            "train.epochs=6",
            "sweep.num_samples=40",
            "sweep.max_concurrent=1",
            "space.train.lr.low=0.001",
            "space.train.lr.high=0.128",
            *(f"space.{k}=null" for k in ("data.crop_size", "model.backbone", "data.batch_size")),
            "sweep.asha.grace_period=1",
            "sweep.asha.reduction_factor=2",
            "sweep.asha.min_rank_corr=null",  # the demo's self-check: on where a test turns it on
            *overrides,
        ],
    )


@pytest.mark.parametrize("early_predicts", [True, False])
def test_the_self_check_turns_off_a_rung_whose_ranking_misleads(tmp_path, early_predicts):
    table = _synthetic(tmp_path / "t.csv", early_predicts)
    out = replay(
        _job("sweep.search=random", "sweep.asha.min_rank_corr=0.5", "sweep.asha.check_trials=6"), table, seed=0
    )
    check = out.asha_check
    assert check["trials_in_full"] >= 6
    first_six = sorted(out.configs)[:6]
    assert all(tid not in out.stopped for tid in first_six), "the first check_trials run in full"
    if early_predicts:
        assert check["rank_corr"]["1"] > 0.9 and check["rungs_off"] == {}
        assert out.stopped, "the rungs that predict keep stopping trials"
    else:
        assert check["rank_corr"]["1"] < -0.9 and set(check["rungs_off"]) == {"1", "2"}
        assert check["rank_corr"]["4"] > 0.9, "epoch 4 ranks as the last epoch does"
        # No trial is stopped at a rung that ranks the reverse of the last epoch; rung 4 still stops.
        assert out.stopped and set(out.stopped.values()) == {4}


def test_start_with_is_tried_first_and_an_epoch_budget_ends_the_sweep(tmp_path):
    table = _synthetic(tmp_path / "t.csv", True)
    out = replay(
        _job(
            "sweep.search=tpe",
            "sweep.asha.enabled=false",
            "sweep.budget.epochs=20",
            "sweep.start_with=[{train.lr: 0.064, model.output_stride: 8}, {train.lr: 0.002}]",
        ),
        table,
    )
    trials = sorted(out.study.trials, key=lambda t: t.number)
    assert trials[0].params == {"train.lr": 0.064, "model.output_stride": 8}
    assert trials[1].params["train.lr"] == 0.002 and "model.output_stride" in trials[1].params
    assert out.stop_reason == "budget.epochs spent: 24 of 20" and len(trials) == 4


@pytest.mark.parametrize("search", ["gp", "random", "tpe"])
def test_every_search_replays_with_hyperband_brackets(tmp_path, search):
    table = _synthetic(tmp_path / "t.csv", True)
    out = replay(_job(f"sweep.search={search}", "sweep.asha.brackets=3", "sweep.num_samples=12"), table, seed=0)
    assert len(out.configs) == 12 and out.stop_reason == "num_samples: all 12 trials ran"
    assert 0 < len(out.stopped) < 12


@pytest.mark.parametrize(
    "asha", [["sweep.asha.min_rank_corr=null"], ["sweep.asha.brackets=3"], []], ids=["asha", "brackets", "self-check"]
)
def test_the_plans_epochs_are_what_replayed_sweeps_train(asha):
    """`--plan` prices a sweep at `expected_epochs`: here voc.yaml's ASHA (46 epochs, grace 6,
    factor 3, 24 trials, the self-check's 8 in full) against its sweep replayed, with Optuna's
    random search and a report every epoch, on 2,000 curves that never cross (every rung ranks
    trials as the last epoch does), over twelve seeds (their mean varies by about 8 %).
    Asynchronous ASHA's first trials are promoted on few results: the nominal budget (13.1
    epochs a trial) is far below it."""
    from statistics import mean

    from deeplab_sweep.search.early_stopping import expected_epochs

    lrs = [0.001 * 128 ** (i / 1999) for i in range(2000)]  # the space's range, log-spaced
    curves = [
        ({"train.lr": lr}, [{"epoch": e, "val/mIoU": (1 + i) * e} for e in range(1, 47)]) for i, lr in enumerate(lrs)
    ]
    table = Table.from_trials(("train.lr",), curves)
    voc = ["train.epochs=46", "sweep.num_samples=24", "sweep.asha.grace_period=6", "sweep.asha.reduction_factor=3"]
    job = _job("sweep.search=random", *voc, "sweep.asha.min_rank_corr=0.5", "sweep.asha.check_trials=8", *asha)
    seeded = (job.model_copy(update={"sweep": job.sweep.model_copy(update={"seed": s})}) for s in range(12))
    trained = mean(sum(replay(j, table, seed=s).epochs().values()) for s, j in enumerate(seeded))
    assert expected_epochs(job) == pytest.approx(trained, rel=0.15)
