"""What several commands share: the job arguments (a config file + key=value overrides) and
JSON output."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

FORMATTER = argparse.RawDescriptionHelpFormatter


def command(sub, name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand with its description and an `examples:` epilog."""
    return sub.add_parser(
        name,
        help=help,
        formatter_class=FORMATTER,
        description=textwrap.dedent(description),
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip("\n"), "  "),
    )


def add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config", type=Path, help="YAML config: a file, or a name under the installed conf/ (e.g. conf/sweep/demo.yaml)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=0.01 model=resnet101_os16")
    p.add_argument(
        "--conf-dir",
        type=Path,
        default=None,
        help="folder holding the config groups (default: the nearest above CONFIG with data/ and "
        "model/, else the installed conf/)",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--verbose", action="store_true", help="show the Ray workers' own logs")


def add_model_factory_arg(p) -> None:
    p.add_argument(
        "--model-factory",
        default=None,
        metavar="PKG.MODULE:CALLABLE",
        help="a checkpoint of your own model: the factory it names, which is imported only when named here "
        "(a checkpoint is untrusted input)",
    )


def load_job(args):
    """The job of CONFIG + overrides, or None after --print-config printed it."""
    from deeplab_sweep.search.compose import dump_yaml, load_job

    job = load_job(args.config, args.overrides, args.conf_dir)
    if args.print_config:
        print(dump_yaml(job), end="")
        return None
    return job


def json_safe(x):
    """NaN (a class absent from data and prediction) is not JSON: write null."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
