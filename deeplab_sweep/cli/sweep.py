"""`deeplab sweep`: Ray Tune + Optuna TPE + ASHA over Ray Train trials, logged to MLflow."""

from __future__ import annotations

import os
import sys

from deeplab_sweep.cli.common import add_job_args, command, load_job

NAME = "sweep"
EXIT_INTERRUPTED = 130


def add(sub) -> None:
    sw = command(
        sub,
        NAME,
        "hyperparameter sweep: Ray Tune + Optuna TPE + ASHA, logged to MLflow",
        """\
        Run a sweep. Each trial trains with Ray Train (N workers) and is one MLflow child run
        under the sweep's parent run; the best checkpoint is reported at the end.""",
        """
        deeplab sweep conf/sweep/demo.yaml
        deeplab sweep conf/sweep/demo.yaml sweep.num_samples=12 sweep.name=lr-study
        deeplab sweep conf/sweep/demo.yaml sweep.name=lr-study --resume     # after Ctrl-C
        deeplab sweep conf/sweep/voc.yaml data.root=/data/voc --address auto
        deeplab sweep conf/sweep/demo.yaml --tracking-uri http://127.0.0.1:5000
        deeplab sweep conf/sweep/voc.yaml --plan --cluster-config conf/cluster/launcher/aws-gpu.yaml""",
    )
    add_job_args(sw)
    sw.add_argument("--resume", action="store_true", help="continue the sweep named by sweep.name")
    sw.add_argument("--tracking-uri", default=None, help="MLflow tracking server (default: mlflow.tracking_uri)")
    sw.add_argument(
        "--plan",
        action="store_true",
        help="print where the trials go and the expected GPU-hours, start nothing; exit 2 if it cannot fit",
    )
    sw.add_argument(
        "--cluster-config",
        default=None,
        metavar="LAUNCHER_YAML",
        help="the Ray cluster launcher YAML to plan on (sets cluster.autoscaler_config)",
    )


def options_as_overrides(args) -> None:
    """--cluster-config and --tracking-uri as the overrides they stand for."""
    if args.cluster_config:
        args.overrides += [f"cluster.autoscaler_config={args.cluster_config}"]
    if args.tracking_uri:
        # A server keeps artifacts where it is configured to, not in a local folder of ours.
        args.overrides += [f"mlflow.tracking_uri={args.tracking_uri}", "mlflow.artifact_location="]


def run(args) -> int:
    options_as_overrides(args)
    job = load_job(args)
    if job is None:
        return 0
    _warn_of_a_kept_command_line(args.address or job.cluster.address or os.environ.get("RAY_ADDRESS"))
    if args.plan:
        from deeplab_sweep.search.placement import plan_text

        print(plan_text(job, args.address))
        return 0
    from deeplab_sweep.search.summary import summary_table
    from deeplab_sweep.search.sweep import run_sweep
    from deeplab_sweep.search.timing import Timeline

    summary = run_sweep(job, args.address, resume=args.resume, verbose=args.verbose)
    metric = job.sweep.metric
    print(summary_table(summary, metric))
    if summary.interrupted:
        print(f"\n{resume_hint(args, summary.sweep)}\nMLflow: {summary.runs_link}")
        return EXIT_INTERRUPTED
    best = summary.best
    print(f"\nMLflow: {summary.runs_link}")
    if not best:
        print("no trial produced a metric")
        return 0
    print(f"best trial {best.trial_id}: {metric} = {best.values[metric]:.4f}")
    print(f"  checkpoint: {best.checkpoint}")
    print(f"  MLflow run: {best.run_id} (experiment {summary.experiment!r}, {summary.tracking_uri})")
    print(f"  fetch it:   deeplab best --experiment {summary.experiment} --out best/")
    Timeline(args.verbose).mark("the command's end")
    return 0


def resume_hint(args, sweep: str) -> str:
    """The command that continues an interrupted sweep, its credentials left out (under `ray job
    stop` this line lands in `ray job logs`)."""
    from deeplab_sweep.trainable.credentials import holds_credentials, redacted_command

    conf = ["--conf-dir", str(args.conf_dir)] if args.conf_dir else []
    words = ["deeplab", "sweep", str(args.config), *conf, *args.overrides, f"sweep.name={sweep}", "--resume"]
    hint = f"interrupted; continue it with: {redacted_command(words)}"
    if holds_credentials(words):
        hint += "\n(*** marks a credential left out: give it again, or through the environment; README: Security)"
    return hint


def _warn_of_a_kept_command_line(address: str | None) -> None:
    """Ray keeps a driver's command line in its job table, in clear: a `ray job submit`
    entrypoint (also written at the top of the job's log), and any driver that joins a cluster.
    One line where that command line holds a credential."""
    from deeplab_sweep.search.internals import in_ray_job, job_entrypoint_words
    from deeplab_sweep.trainable.credentials import holds_credentials

    job = in_ray_job()
    words = job_entrypoint_words() if job else (sys.argv if address else [])
    if holds_credentials(words):
        where = "this Ray job's entrypoint" if job else "this command line, which Ray keeps as the job's"
        print(
            f"warning: {where} holds a credential, which Ray keeps in clear in its job table (`ray job list`, the "
            "dashboard): give it through the cluster's environment instead (MLFLOW_TRACKING_USERNAME/_PASSWORD "
            "or _TOKEN, AWS_*, DEEPLAB_OPTUNA_STORAGE_PASSWORD; README: Security)",
            file=sys.stderr,
        )
