"""`deeplab sync`: write into MLflow what a sweep's Ray results hold and MLflow misses."""

from __future__ import annotations

from deeplab_sweep.cli.common import command
from deeplab_sweep.trainable.run_config import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI

NAME = "sync"


def add(sub) -> None:
    sy = command(
        sub,
        NAME,
        "write into MLflow what a sweep's Ray results hold and MLflow misses",
        """\
        After the tracking server was down during a sweep: reconcile the sweep's MLflow runs
        with Ray's results in the sweep folder (missing epochs, runs, end status, best
        checkpoint). Safe to run any number of times.""",
        """
        deeplab sync runs/ray/lr-study
        deeplab sync /mnt/shared/ray/voc-sweep --tracking-uri http://127.0.0.1:5000 --experiment deeplab
        deeplab sync s3://bucket/deeplab/ray/voc-sweep --tracking-uri http://127.0.0.1:5000""",
    )
    sy.add_argument("sweep_path", help="the sweep's folder or URI (storage.path/sweep.name)")
    sy.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    sy.add_argument("--experiment", default=DEFAULT_EXPERIMENT)


def run(args) -> int:
    from deeplab_sweep.search.sync import sync_sweep

    stats = sync_sweep(args.sweep_path, args.tracking_uri, args.experiment)
    print(
        f"{stats['trials']} trials: {stats['epochs_logged']} epochs logged, {stats['runs_created']} runs created, "
        f"{stats['runs_finished']} runs finished"
    )
    return 0
