"""The pictures a sweep logs on its parent run, drawn from a sweep's rows (no Ray): a
parallel-coordinates plot a user can read, learning curves marked where ASHA stopped a trial."""

from __future__ import annotations

from types import SimpleNamespace

from deeplab_sweep.search import pictures, tracking
from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.summary import TrialRow
from deeplab_sweep.search.sync import TrialRecord
from tests.conftest import CONF


def _row(i: int, backbone: str, batch: int, status: str, epochs: int) -> TrialRow:
    return TrialRow(
        trial_id=f"t{i}",
        params={
            "train.lr": 0.01 * (i + 1),
            "model.output_stride": 8,
            "data.crop_size": 48,
            "model.backbone": backbone,
            "data.batch_size": batch,
        },
        epochs=epochs,
        values={"val/mIoU": 0.1 * i},
        status=status,
        cost=None,
        error=None,
        run_id=None,
        checkpoint=None,
    )


def test_parallel_coordinates_has_one_readable_axis_per_space_key():
    """The demo space's batch size depends on the backbone: Optuna draws it as two parameters,
    and its own plot showed two axes holding "None"; here it is one axis, labelled by value."""
    job = load_job(CONF / "sweep" / "demo.yaml", ["data.root=unused"])
    rows = [_row(0, "mobilenet_v2", 8, tracking.COMPLETED, 6), _row(1, "resnet50", 4, tracking.PRUNED, 2)]
    fig = pictures.parallel_coordinates(SimpleNamespace(trials=rows), job.space, "val/mIoU", "max")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == [*job.space, "val/mIoU"]
    assert all(t.get_rotation() > 0 for t in ax.get_xticklabels())  # long keys do not overlap
    texts = [t.get_text() for t in ax.texts]
    assert "None" not in texts and {"4", "8", "mobilenet_v2", "resnet50"} <= set(texts)
    assert len(ax.get_lines()) - len(job.space) - 1 == 2  # a line per trial beside the axes


def test_learning_curves_mark_the_trials_asha_stopped():
    rows = [
        _row(i, "mobilenet_v2", 8, st, n) for i, (st, n) in enumerate([(tracking.COMPLETED, 3), (tracking.PRUNED, 1)])
    ]
    records = [
        TrialRecord(r.trial_id, {}, [{"epoch": e, "val/mIoU": 0.1 * e} for e in range(1, r.epochs + 1)]) for r in rows
    ]
    fig = pictures.curves(records, SimpleNamespace(trials=rows), "val/mIoU")
    ends = [(ln.get_marker(), tuple(ln.get_xdata())) for ln in fig.axes[0].get_lines() if ln.get_marker() in "xo"]
    assert (("x", (1,)) in ends) and (("o", (3,)) in ends)
