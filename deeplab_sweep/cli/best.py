"""`deeplab best`: the best run of an experiment (or one sweep) through MLflow, downloaded and loaded."""

from __future__ import annotations

import json
from pathlib import Path

from deeplab_sweep.cli.common import add_model_factory_arg, command, json_safe
from deeplab_sweep.trainable.run_config import DEFAULT_EXPERIMENT, DEFAULT_METRIC, DEFAULT_TRACKING_URI

NAME = "best"
SHOWN_PARAMS = (
    "model.backbone",
    "model.output_stride",
    "train.lr",
    "train.epochs",
    "data.crop_size",
    "data.batch_size",
)


def add(sub) -> None:
    b = command(
        sub,
        NAME,
        "find the best run through MLflow and download its checkpoint",
        "Best checkpoint of an experiment (or one sweep) via MLflow.",
        """
        deeplab best --experiment deeplab
        deeplab best --experiment deeplab --sweep lr-study --out best/ --json
        deeplab best --experiment deeplab --log-model                      # an MLflow Model on the best run
        deeplab best --experiment deeplab --register deeplabv3plus-voc      # logged and registered, alias "best"
        deeplab best --experiment deeplab --tracking-uri http://127.0.0.1:5000
        deeplab best --pareto --sweep pareto-demo                          # a multi-objective sweep's front
        deeplab best --sweep pareto-demo --objective model/latency_ms --constraint "val/mIoU>=0.7"
        """,
    )
    b.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    b.add_argument("--metric", default=DEFAULT_METRIC)
    b.add_argument("--mode", choices=["max", "min"], default="max")
    b.add_argument("--sweep", default=None, help="only the trials of this sweep (its sweep.name)")
    b.add_argument("--out", type=Path, default=Path("best"))
    b.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    b.add_argument(
        "--log-model",
        action="store_true",
        help="log the checkpoint as an MLflow Model (pyfunc: images in, class-id masks out) on its run",
    )
    b.add_argument(
        "--register", default=None, metavar="MODEL", help="log it as an MLflow Model and register it under this name"
    )
    b.add_argument("--alias", default="best")
    b.add_argument("--json", action="store_true")
    b.add_argument(
        "--pareto",
        action="store_true",
        help="list the Pareto front of a multi-objective sweep (the latest, or --sweep)",
    )
    b.add_argument(
        "--objective",
        default=None,
        help="with a multi-objective sweep: the front trial best on this objective that meets every --constraint",
    )
    b.add_argument(
        "--constraint", action="append", default=[], metavar="METRIC<=N|METRIC>=N", help="repeatable; with --objective"
    )
    add_model_factory_arg(b)


def run(args) -> int:
    from deeplab_sweep.errors import ConfigError
    from deeplab_sweep.search.best import fetch_best

    if args.pareto:
        return _front(args)
    if args.constraint and args.objective is None:
        raise ConfigError("--constraint: picks from a Pareto front, so it needs --objective (or use --pareto)")
    info = fetch_best(
        args.tracking_uri,
        args.experiment,
        args.out,
        args.metric,
        args.mode,
        args.sweep,
        args.register,
        args.alias,
        args.objective,
        tuple(args.constraint),
        args.model_factory,
        args.log_model,
    )
    if args.json:
        print(json.dumps(json_safe(info), indent=2))
        return 0
    print(f"best run {info['run_id']} ({info['run_name']}): {info['metric']} = {info['value']:.4f}")
    m = info["model"]
    print(
        f"  model: DeepLabv3+ {m['backbone']} OS {m['output_stride']}, {m['num_classes']} classes "
        f"({m['dataset']}), {m['parameters']:,} parameters, epoch {info['checkpoint_epoch']}"
    )
    print(f"  checkpoint: {info['local_path']}")
    print(f"  artifact:   {info['artifact_uri']}")
    print("  " + " ".join(f"{k}={info['params'][k]}" for k in SHOWN_PARAMS if k in info["params"]))
    if "logged_model" in info:
        print(f"  MLflow Model: {info['logged_model']['uri']}")
    if "registered" in info:
        r = info["registered"]
        print(f"  registered: models:/{r['name']}@{r['alias']} (version {r['version']})")
    print(f"evaluate it: deeplab eval --checkpoint {info['local_path']}")
    if "logged_model" in info:
        uri = f"models:/{r['name']}@{r['alias']}" if "registered" in info else info["logged_model"]["uri"]
        print(f"serve it:    {_serve_command(args.tracking_uri, uri)}")
    return 0


def _serve_command(tracking_uri: str, model_uri: str) -> str:
    """MLflow's server runs `mlflow` and `uvicorn` from PATH: this environment's bin/ goes
    first where PATH lacks it (a venv not activated)."""
    import os
    import sys

    from deeplab_sweep.trainable.credentials import redacted

    bin_dir = str(Path(sys.executable).parent)
    path = "" if bin_dir in os.environ.get("PATH", "").split(os.pathsep) else f"PATH={bin_dir}:$PATH "
    return (
        f"{path}MLFLOW_TRACKING_URI={redacted(tracking_uri)} mlflow models serve -m {model_uri} "
        "--env-manager local -p 5001"
    )


def _front(args) -> int:
    from deeplab_sweep.search.best import list_front

    front = list_front(args.tracking_uri, args.experiment, args.sweep)
    if args.json:
        print(json.dumps(json_safe(front), indent=2))
        return 0
    names = list(front["objectives"])
    print(f"Pareto front of sweep {front['sweep']!r}: {len(front['front'])} trials, best first on {names[0]}")
    print(f"{'trial':<10} " + " ".join(f"{n:>18}" for n in names) + "  run                               params")
    for row in front["front"]:
        values = " ".join(f"{row[n]:>18.4f}" if row[n] is not None else f"{'-':>18}" for n in names)
        params = " ".join(f"{k}={v}" for k, v in row["params"].items())
        print(f"{row['trial_id'] or '?':<10} {values}  {row['run_id']}  {params}")
    print(
        "pick one: deeplab best --sweep " + front["sweep"] + f' --objective {names[-1]} --constraint "{names[0]}>=..."'
    )
    return 0
