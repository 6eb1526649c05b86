"""The `deeplab` command: one module per subcommand (`add` builds its arguments, `run` runs it).
Arguments are turned into typed configs at once; nothing below this package sees an argparse
namespace. Errors become exit codes here only: bad input 2, a failed run 1, Ctrl-C 130."""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import textwrap

from deeplab_sweep.cli import best, data, evaluate, export, import_checkpoint, predict, sweep, sync, train, ui
from deeplab_sweep.cli.common import FORMATTER
from deeplab_sweep.errors import RunFailed, UserInputError

EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130
COMMANDS = {m.NAME: m for m in (data, train, sweep, best, sync, ui, import_checkpoint, evaluate, predict, export)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deeplab",
        formatter_class=FORMATTER,
        description=textwrap.dedent("""\
        DeepLabv3+ training and hyperparameter sweeps on Ray, tracked in MLflow.

        Configs are YAML files under conf/, composed from parts (data, model, train, sweep,
        cluster) and overridden with key=value, e.g. train.lr=0.007 model=resnet101_os16."""),
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        module.add(sub)
    return p


def entry() -> None:
    """The `deeplab` command: `main`, then out at once (`exit_now`)."""
    exit_now(main())


def exit_now(code: int) -> None:
    """Out of the process once what buffers is written: the exit handlers a normal exit runs
    first (MLflow's asynchronous logging queues register theirs: with MLFLOW_ENABLE_ASYNC_LOGGING
    a write after a run's `set_terminated` is only queued; the logging handlers' flush), then
    stdout and stderr, and no more. The interpreter's own teardown of torch, torchvision, MLflow
    and Ray's modules after that took 3-4 s after every command on the 2-core build machine
    (the handlers take milliseconds); a local Ray is already shut down by then."""
    atexit._run_exitfuncs()  # the one way to run them; Python has no public name for it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    p = parser()
    # key=value overrides may stand anywhere among the options: argparse only collects the
    # ones before the first option, so pick up the rest here.
    args, extra = p.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or not all("=" in x and not x.startswith("-") for x in extra):
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return COMMANDS[args.command].run(args)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
