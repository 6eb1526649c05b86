"""Where a command's time goes, for `--verbose`: each step's end in seconds since the process
started (its imports included), on stderr. `benchmarks/sweep_overhead.py --launch` reads it."""

from __future__ import annotations

import sys
import time


class Timeline:
    def __init__(self, verbose: bool):
        import psutil

        self.verbose, self.start = verbose, psutil.Process().create_time()

    def mark(self, step: str) -> None:
        if self.verbose:
            print(f"timing: {step} at {time.time() - self.start:.2f} s", file=sys.stderr, flush=True)
