"""The `deeplab` command. Arguments are parsed here and turned into typed configs at once;
nothing below this module sees an argparse namespace."""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from search.configs import ConfigError, RunFailed

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="deeplab", formatter_class=fmt, description=textwrap.dedent("""\
        DeepLabv3+ training and hyperparameter sweeps on Ray, tracked in MLflow.

        Configs are YAML files under conf/, composed from parts (data, model, train, sweep,
        cluster) and overridden with key=value, e.g. train.lr=0.007 model=resnet101_os16."""))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("data", help="generate, verify or download datasets", formatter_class=fmt,
                       description="Datasets in their real on-disk layouts.", epilog=textwrap.dedent("""\
        examples:
          deeplab data synth voc --out runs/data/synth_voc
          deeplab data verify voc_aug --root /data/voc
          deeplab data download voc --root /data/voc
          deeplab data download cityscapes --root /data/cityscapes   # after placing the zips"""))
    dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = dsub.add_parser("synth", help="write a small generated dataset in the real layout")
    s.add_argument("dataset", choices=["voc", "cityscapes"])
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--train", type=int, default=None, help="number of train images")
    s.add_argument("--val", type=int, default=None, help="number of val images")
    s.add_argument("--seed", type=int, default=0)
    v = dsub.add_parser("verify", help="check layout, pairs, sizes and label values")
    v.add_argument("dataset", choices=["voc", "voc_aug", "cityscapes"])
    v.add_argument("--root", required=True, type=Path)
    dl = dsub.add_parser("download", help="download (VOC) or unpack placed archives (Cityscapes)")
    dl.add_argument("dataset", choices=["voc", "cityscapes"])
    dl.add_argument("--root", required=True, type=Path)
    t = sub.add_parser("train", help="train one model with N Ray Train workers, logged to MLflow",
                       formatter_class=fmt, description="One training run (Ray Train, DDP), one MLflow run.",
                       epilog=textwrap.dedent("""\
        examples:
          deeplab train conf/train/demo.yaml
          deeplab train conf/train/demo.yaml train.epochs=10 train.num_workers=2
          deeplab train conf/train/deeplabv3plus_resnet101_os16_513x513_46ep_voc_aug.yaml data.root=/data/voc
          deeplab train conf/train/demo.yaml storage.name=my-run   # run again: resumes my-run"""))
    _job_args(t)

    sw = sub.add_parser("sweep", help="hyperparameter sweep: Ray Tune + Optuna TPE + ASHA, logged to MLflow",
                        formatter_class=fmt, description=textwrap.dedent("""\
        Run a sweep. Each trial trains with Ray Train (N workers) and is one MLflow child run
        under the sweep's parent run; the best checkpoint is reported at the end."""),
                        epilog=textwrap.dedent("""\
        examples:
          deeplab sweep conf/sweep/demo.yaml
          deeplab sweep conf/sweep/demo.yaml sweep.num_samples=12 sweep.name=lr-study
          deeplab sweep conf/sweep/demo.yaml sweep.name=lr-study --resume     # after Ctrl-C
          deeplab sweep conf/sweep/voc.yaml data.root=/data/voc --address auto
          deeplab sweep conf/sweep/demo.yaml --tracking-uri http://127.0.0.1:5000"""))
    _job_args(sw)
    sw.add_argument("--resume", action="store_true", help="continue the sweep named by sweep.name")
    sw.add_argument("--tracking-uri", default=None, help="MLflow tracking server (default: mlflow.tracking_uri)")

    b = sub.add_parser("best", help="find the best run through MLflow and download its checkpoint",
                       formatter_class=fmt, description="Best checkpoint of an experiment (or one sweep) via MLflow.",
                       epilog=textwrap.dedent("""\
        examples:
          deeplab best --experiment deeplab
          deeplab best --experiment deeplab --sweep lr-study --out best/ --json
          deeplab best --experiment deeplab --register deeplabv3plus-voc      # alias "best"
          deeplab best --experiment deeplab --tracking-uri http://127.0.0.1:5000"""))
    b.add_argument("--experiment", required=True)
    b.add_argument("--metric", default="val/mIoU")
    b.add_argument("--mode", choices=["max", "min"], default="max")
    b.add_argument("--sweep", default=None, help="only the trials of this sweep (its sweep.name)")
    b.add_argument("--out", type=Path, default=Path("best"))
    b.add_argument("--tracking-uri", default="sqlite:///runs/mlflow.db")
    b.add_argument("--register", default=None, metavar="MODEL", help="register in the MLflow model registry")
    b.add_argument("--alias", default="best")
    b.add_argument("--json", action="store_true")

    sy = sub.add_parser("sync", help="write into MLflow what a sweep's Ray results hold and MLflow misses",
                        formatter_class=fmt, description=textwrap.dedent("""\
        After the tracking server was down during a sweep: reconcile the sweep's MLflow runs
        with Ray's results in the sweep folder (missing epochs, runs, end status, best
        checkpoint). Safe to run any number of times."""),
                        epilog=textwrap.dedent("""\
        examples:
          deeplab sync runs/ray/lr-study
          deeplab sync /mnt/shared/ray/voc-sweep --tracking-uri http://127.0.0.1:5000 --experiment deeplab"""))
    sy.add_argument("sweep_path", type=Path, help="the sweep's folder (storage.path/sweep.name)")
    sy.add_argument("--tracking-uri", default="sqlite:///runs/mlflow.db")
    sy.add_argument("--experiment", default="deeplab")

    u = sub.add_parser("ui", help="serve the MLflow UI and tracking API over the local store (127.0.0.1 by default)",
                       formatter_class=fmt, description=textwrap.dedent("""\
        Start `mlflow server` on the project's store. It binds 127.0.0.1 unless --host says
        otherwise: MLflow's server has no authentication, so anyone who can reach the port can
        read and change every run. Reach it from elsewhere through an SSH tunnel."""),
                       epilog=textwrap.dedent("""\
        examples:
          deeplab ui                                   # http://127.0.0.1:5000
          deeplab ui --port 5001 --store sqlite:///runs/mlflow.db
          ssh -L 5000:127.0.0.1:5000 head-node         # from your laptop"""))
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--store", default="sqlite:///runs/mlflow.db", help="backend store URI")
    u.add_argument("--artifacts", default="runs/mlartifacts", help="artifact folder for runs logged through it")

    im = sub.add_parser("import-checkpoint", help="convert a reference-implementation checkpoint to ours",
                        formatter_class=fmt, description=textwrap.dedent("""\
        Read a checkpoint of the widely used PyTorch DeepLabv3+ reference implementation
        ({"model_state": ..., "cur_itrs": ...}, keys possibly prefixed module.), map every tensor
        onto our model (strict: shapes checked, nothing left over), infer backbone, classes and
        separable head from the tensors, and write our checkpoint format."""),
                        epilog=textwrap.dedent("""\
        examples:
          deeplab import-checkpoint best_deeplabv3plus_resnet101_voc_os16.pth --out imported/r101_voc
          deeplab import-checkpoint model.pth --out imported/m --output-stride 8 --dataset cityscapes
          deeplab eval --checkpoint imported/r101_voc --data-root /data/voc"""))
    im.add_argument("path", type=Path)
    im.add_argument("--out", required=True, type=Path, help="folder for checkpoint.pt")
    im.add_argument("--output-stride", type=int, choices=[8, 16], default=None,
                    help="not stored in the weights: default from the file name (_os8/_os16), else 16")
    im.add_argument("--dataset", choices=["voc", "voc_aug", "cityscapes"], default=None,
                    help="default from the class count (21: voc, 19: cityscapes)")
    im.add_argument("--data-root", default="", help="dataset root to record in the config")

    e = sub.add_parser("eval", help="evaluate a checkpoint on its validation set, print JSON metrics",
                       formatter_class=fmt, description="Evaluate a checkpoint exactly as training did.",
                       epilog=textwrap.dedent("""\
        examples:
          deeplab eval --checkpoint runs/ray/train-.../checkpoint_.../checkpoint.pt
          deeplab eval --checkpoint best/checkpoint.pt --data-root /data/voc"""))
    e.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt or the folder holding it")
    e.add_argument("--data-root", default=None, help="dataset root, if not where the checkpoint's config says")
    e.add_argument("--device", default="cpu", help="cpu or cuda[:N]")

    pr = sub.add_parser("predict", help="write colour masks and overlays for images", formatter_class=fmt,
                        description="Predict segmentation masks with a checkpoint.", epilog=textwrap.dedent("""\
        examples:
          deeplab predict --checkpoint best/checkpoint.pt photo1.jpg photo2.jpg --out preds/
          deeplab predict --checkpoint best/checkpoint.pt data/voc/VOCdevkit/VOC2012/JPEGImages/*.jpg --out preds/"""))
    pr.add_argument("--checkpoint", required=True, type=Path)
    pr.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE")
    pr.add_argument("--out", required=True, type=Path)
    pr.add_argument("--device", default="cpu")
    return p


def cmd_sweep(args) -> int:
    if args.tracking_uri:
        # A server keeps artifacts where it is configured to, not in a local folder of ours.
        args.overrides += [f"mlflow.tracking_uri={args.tracking_uri}", "mlflow.artifact_location="]
    job = _load(args)
    if job is None:
        return 0
    from search.sweep import run_sweep, summary_table

    summary = run_sweep(job, args.address, resume=args.resume, verbose=args.verbose)
    print(summary_table(summary, job.sweep.metric))
    best = summary["best"]
    if best:
        print(f"\nbest trial {best['trial_id']}: {job.sweep.metric} = {best[job.sweep.metric]:.4f}")
        print(f"  checkpoint: {best['checkpoint']}")
        print(f"  MLflow run: {best['run_id']} (experiment {summary['experiment']!r}, {summary['tracking_uri']})")
        print(f"  fetch it:   deeplab best --experiment {summary['experiment']} --out best/")
    else:
        print("\nno trial produced a metric")
    return 0


def cmd_best(args) -> int:
    from search.best import fetch_best

    info = fetch_best(args.tracking_uri, args.experiment, args.out, args.metric, args.mode, args.sweep,
                      args.register, args.alias)
    if args.json:
        print(json.dumps(_json_safe(info), indent=2))
        return 0
    print(f"best run {info['run_id']} ({info['run_name']}): {info['metric']} = {info['value']:.4f}")
    m = info["model"]
    print(f"  model: DeepLabv3+ {m['backbone']} OS {m['output_stride']}, {m['num_classes']} classes "
          f"({m['dataset']}), {m['parameters']:,} parameters, epoch {info['checkpoint_epoch']}")
    print(f"  checkpoint: {info['local_path']}")
    print(f"  artifact:   {info['artifact_uri']}")
    shown = ("model.backbone", "model.output_stride", "train.lr", "train.epochs", "data.crop_size", "data.batch_size")
    print("  " + " ".join(f"{k}={info['params'][k]}" for k in shown if k in info["params"]))
    if "registered" in info:
        r = info["registered"]
        print(f"  registered: models:/{r['name']}@{r['alias']} (version {r['version']})")
    print(f"evaluate it: deeplab eval --checkpoint {info['local_path']}")
    return 0


def cmd_sync(args) -> int:
    from search.sync import sync_sweep

    stats = sync_sweep(args.sweep_path, args.tracking_uri, args.experiment)
    print(f"{stats['trials']} trials: {stats['epochs_logged']} epochs logged, {stats['runs_created']} runs created, "
          f"{stats['runs_finished']} runs finished")
    return 0


def cmd_ui(args) -> int:
    import ipaddress

    from search.tracking import resolve_tracking_uri

    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"warning: binding {args.host}: the MLflow server has no authentication; anyone who reaches "
              f"port {args.port} can read and change every run", file=sys.stderr)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", args.host, "--port", str(args.port),
           "--backend-store-uri", resolve_tracking_uri(args.store),
           "--artifacts-destination", str(Path(args.artifacts).resolve()), "--workers", "1"]
    print(f"MLflow UI: http://{args.host}:{args.port}", flush=True)
    os.execv(sys.executable, cmd)  # the server replaces this process: Ctrl-C and signals reach it directly
    return 0


def cmd_import(args) -> int:
    from trainable.import_ref import import_reference

    out = import_reference(args.path, args.out, args.output_stride, args.dataset, args.data_root)
    print(f"wrote {out}")
    return 0


def cmd_eval(args) -> int:
    from trainable.inference import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.data_root, args.device)
    print(json.dumps(_json_safe(metrics), indent=2))
    return 0


def cmd_predict(args) -> int:
    from trainable.inference import predict_files

    written = predict_files(args.checkpoint, args.inputs, args.out, args.device)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def _json_safe(x):
    """NaN (a class absent from data and prediction) is not JSON: write null."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML config under conf/")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=0.01 model=resnet101_os16")
    p.add_argument("--conf-dir", type=Path, default=None,
                   help="folder holding the config groups (default: the nearest above CONFIG with data/ and model/)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--verbose", action="store_true", help="show the Ray workers' own logs")


def _load(args):
    from search.configs import dump_yaml, load_job

    job = load_job(args.config, args.overrides, args.conf_dir)
    if args.print_config:
        print(dump_yaml(job), end="")
        return None
    return job


def cmd_train(args) -> int:
    job = _load(args)
    if job is None:
        return 0
    from search.run_train import run_training

    summary = run_training(job, args.address, verbose=args.verbose)
    print(json.dumps(_json_safe(summary), indent=2, default=str))
    return 0


def cmd_data(args) -> int:
    from datasets import DatasetError

    try:
        if args.action == "synth":
            from datasets.synth import synth_cityscapes, synth_voc

            counts = {k: v for k, v in (("n_train", args.train), ("n_val", args.val)) if v is not None}
            fn = synth_voc if args.dataset == "voc" else synth_cityscapes
            out = fn(args.out, seed=args.seed, **counts)
            print(f"wrote synthetic {args.dataset} to {out}")
            return 0
        if args.action == "verify":
            from datasets.verify import verify

            report = verify(args.dataset, args.root)
            for split, n in report.counts.items():
                print(f"{split}: {n} image/mask pairs")
            for problem in report.problems:
                print(f"error: {problem}", file=sys.stderr)
            if report.ok:
                print(f"{args.dataset} at {args.root}: OK")
            return 0 if report.ok else 1
        from datasets.download import download_voc, prepare_cityscapes

        out = download_voc(args.root) if args.dataset == "voc" else prepare_cityscapes(args.root)
        print(f"{args.dataset} ready under {out}")
        return 0
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


COMMANDS = {"data": cmd_data, "train": cmd_train, "sweep": cmd_sweep, "best": cmd_best, "sync": cmd_sync, "ui": cmd_ui, "import-checkpoint": cmd_import, "eval": cmd_eval, "predict": cmd_predict}


def _bad_input_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's input, worded for the user: one line, exit 2. Imported only
    when an exception is being matched, so `deeplab --help` does not load torch."""
    from datasets import DatasetError
    from trainable.checkpoint import CheckpointError

    return ConfigError, DatasetError, CheckpointError


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = _parser()
    # key=value overrides may stand anywhere among the options: argparse only collects the
    # ones before the first option, so pick up the rest here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or not all("=" in x and not x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return COMMANDS[args.command](args)
    except _bad_input_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
