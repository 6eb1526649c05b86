"""`deeplab sweep`: Ray Tune + Optuna TPE + ASHA over Ray Train trials, logged to MLflow."""

from __future__ import annotations

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


def run(args) -> int:
    if args.cluster_config:
        args.overrides += [f"cluster.autoscaler_config={args.cluster_config}"]
    if args.tracking_uri:
        # A server keeps artifacts where it is configured to, not in a local folder of ours.
        args.overrides += [f"mlflow.tracking_uri={args.tracking_uri}", "mlflow.artifact_location="]
    job = load_job(args)
    if job is None:
        return 0
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
        conf = ["--conf-dir", str(args.conf_dir)] if args.conf_dir else []
        again = " ".join([str(args.config), *conf, *args.overrides, f"sweep.name={summary.sweep}", "--resume"])
        print(f"\ninterrupted; continue it with: deeplab sweep {again}\nMLflow: {summary.runs_link}")
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
