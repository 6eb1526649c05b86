"""Where the suite's wall clock goes: runs the README's `python -m pytest -q` (its `-n 2`) with
a timeline of every test on each xdist worker and a sampler of every process's CPU time, then
prints what the two workers did (each chain's modules, when each worker finished, the time
before the first test) and the CPU by kind of process (the tests' own, Ray's workers, Ray's
daemons, MLflow servers, moto, `deeplab` commands). Tells whether the chains in
tests/conftest.py still take about as long, and what work a faster suite must remove.

    python benchmarks/suite_profile.py [pytest args...]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]

# Written next to the run and loaded with `-p`: each worker appends (test, start, end).
PLUGIN = """
import json, os, time
_name = os.environ.get("PYTEST_XDIST_WORKER", "main") + ".jsonl"
_out = open(os.path.join(os.environ["SUITE_PROFILE_DIR"], _name), "a", buffering=1)
def pytest_runtest_logstart(nodeid, location):
    _out.write(json.dumps([nodeid, "start", time.time()]) + "\\n")
def pytest_runtest_logfinish(nodeid, location):
    _out.write(json.dumps([nodeid, "end", time.time()]) + "\\n")
"""

# A process's kind, from its command line (Ray's workers retitle themselves `ray::<what>`).
KINDS = [
    (
        "Ray daemons",
        (
            "gcs_server",
            "raylet/raylet",
            "dashboard/",
            "ray-dashboard-",
            "ray::DashboardAgent",
            "ray::RuntimeEnvAgent",
            "log_monitor",
            "autoscaler/_private/monitor.py",
        ),
    ),
    ("Ray workers (trials, Train, Tune)", ("ray::", "default_worker.py")),
    ("MLflow servers", ("mlflow", "uvicorn", "huey")),
    ("moto (S3)", ("moto",)),
    ("deeplab / ray commands", ("deeplab_sweep.cli", "bin/deeplab", "bin/ray", "ray/scripts")),
    ("pytest (both workers and main)", ("pytest", "import sys;exec", "sys.stdin.readline")),
]


def kind(cmd: str) -> str:
    for name, needles in KINDS:
        if any(n in cmd for n in needles):
            return name
    return "other"


class CpuSampler(threading.Thread):
    """Each process's CPU seconds (user + system), read every second; a process that lived less
    than a second is missed, one that started before the sampler counts from then."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.seen: dict[tuple[int, float], list] = {}  # (pid, create time) -> [kind, cpu, cpu at first sight]

    def run(self) -> None:
        first = True
        while not self.stop.is_set():
            for p in psutil.process_iter(["cmdline", "cpu_times", "create_time"], ad_value=None):
                if p.info["cpu_times"] is None:
                    continue
                cpu = p.info["cpu_times"].user + p.info["cpu_times"].system
                rec = self.seen.setdefault((p.pid, p.info["create_time"]), ["other", cpu, cpu if first else 0.0])
                rec[1] = cpu
                if p.info["cmdline"]:  # the latest: a Ray worker retitles itself once it starts
                    rec[0] = kind(" ".join(p.info["cmdline"]))
            first = False
            self.stop.wait(1.0)

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, cpu, base in self.seen.values():
            out[k] = out.get(k, 0.0) + cpu - base
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def timeline(folder: Path) -> dict[str, list]:
    """Per worker: [(module, first start, last end)] in the order it ran them."""
    out = {}
    for path in sorted(folder.glob("gw*.jsonl")):
        spans: list = []
        for nodeid, _, t in (json.loads(line) for line in path.read_text().splitlines()):
            module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
            if not spans or spans[-1][0] != module:
                spans.append([module, t, t])
            spans[-1][2] = t
        out[path.stem] = spans
    return out


def main(args: list[str]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "suite_profile_plugin.py").write_text(PLUGIN)
        env = {**os.environ, "SUITE_PROFILE_DIR": folder}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [folder, env.get("PYTHONPATH")]))
        sampler = CpuSampler()
        sampler.start()
        t0 = time.time()
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "suite_profile_plugin", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.time() - t0
        sampler.stop.set()
        sampler.join()
        workers = timeline(Path(folder))
    summary = [ln for ln in res.stdout.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    print(f"pytest exit {res.returncode}: {summary[-1] if summary else res.stdout[-2000:]}")
    print(f"wall {wall:.0f} s")
    for name, spans in workers.items():
        if not spans:
            continue
        print(f"{name}: first test at {spans[0][1] - t0:.0f} s, last test ends at {spans[-1][2] - t0:.0f} s")
        for module, start, end in spans:
            if end - start >= 5:  # the unchained tests' short runs between them are left out
                print(f"  {start - t0:5.0f} - {end - t0:5.0f} s  {end - start:4.0f} s  {module}")
    cpu = sampler.by_kind()
    print(f"CPU {sum(cpu.values()):.0f} s in {wall:.0f} s of wall ({os.cpu_count()} cores):")
    for k, seconds in cpu.items():
        print(f"  {seconds:6.0f} s  {k}")
    return res.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
