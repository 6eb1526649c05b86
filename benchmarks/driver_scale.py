"""The sweep's driver at scale: `run_sweep`'s real path (Tuner, searcher, ASHA, callbacks,
storage, summary) with stand-in trials that train nothing (`search/standin.py`: a learning-curve
table's rows, one every --epoch-s, each with a small checkpoint), MLflow on a real `mlflow
server` on 127.0.0.1, Ray given a logical CPU per trial (the stand-ins mostly sleep). Prints:

- results per second the driver took in, the driver's CPU time per result, its RSS before and
  after the sweep;
- the lag from a trial's report to its metric being in MLflow (the metric's MLflow timestamp,
  which the writer sets when it writes, less the stand-in's clock at its report): median, p99;
  and the part of it before the result reached the sweep's MLflow callback (Tune's delivery);
- each save of Tune's experiment state (on the driver's loop);
- how long the sweep's end took (MLflow's catch-up and the summary), `deeplab best` and
  `deeplab sync` over the runs, and (`--shot`) MLflow's runs page in headless Chromium
  (`apt install chromium`) until its table shows rows;
- whether every report is in MLflow once.

    python benchmarks/driver_scale.py [--trials 1000] [--at-once 64] [--epoch-s 0.25] [--nodes 4] [--writers 4]
    python benchmarks/driver_scale.py --shot ui.png  # and MLflow's runs page, in headless Chromium
    python benchmarks/driver_scale.py --server-rate
    python benchmarks/driver_scale.py --bare          # Ray Tune alone: the floor under the rate
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.standin import REPORTED_AT, StandIn
from deeplab_sweep.search.sweep import run_sweep

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import DEMO_TABLE, DEMO_TABLE_SPACE, MlflowServer, free_port  # noqa: E402

TABLE_EPOCHS = 12


def timed_summary(timings: dict):
    """The sweep's end (`_finish`: MLflow's catch-up and the summary), timed as the sweep runs
    it; the sweep itself runs as a user's does (not verbose: Tune prints a box per result then)."""
    from deeplab_sweep.search import sweep

    finish = sweep._finish

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return finish(*args, **kwargs)
        finally:
            timings["summary"] = time.perf_counter() - start

    sweep._finish = timed


TRIALS = "Ray workers (trials)"


class CpuByKind:
    """CPU seconds of this process's descendants by kind (MLflow's server, Ray's daemons, Ray's
    workers: the trials), the last value seen of each process, polled every few seconds."""

    KINDS = (("mlflow", "MLflow server"), ("ray::", TRIALS), ("default_worker", TRIALS))

    def __init__(self, every_s: float = 3.0, nice_trials: bool = False):
        self.seen: dict[int, tuple[str, float]] = {}
        self.nice_trials = nice_trials
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(every_s,), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _poll(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    cpu = proc.cpu_times()
                    kind = self.seen[proc.pid][0] if proc.pid in self.seen else self._kind(proc)
                    self.seen[proc.pid] = (kind, cpu.user + cpu.system)
                    # The raylet too: the trials' workers it starts are born at its priority.
                    if self.nice_trials and (kind == TRIALS or proc.name() == "raylet") and proc.nice() < 19:
                        proc.nice(19)

    def _kind(self, proc) -> str:
        """By its own command line, else its parents' (MLflow's server workers are spawned)."""
        for p in (proc, *proc.parents()):
            text = " ".join(p.cmdline())
            kind = next((kind for needle, kind in self.KINDS if needle in text), None)
            if kind is not None:
                return kind
        return "Ray daemons and other"

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, seconds in self.seen.values():
            out[kind] = out.get(kind, 0.0) + seconds
        return out


def timed_state_saves(durations: list) -> None:
    """Each save of Tune's experiment state (its trials, the searcher, the callbacks) on the
    driver's loop, timed (Tune's own method, wrapped here)."""
    from ray.tune.execution.tune_controller import TuneController

    save = TuneController.save_to_dir

    def timed(self):
        start = time.perf_counter()
        try:
            return save(self)
        finally:
            durations.append(time.perf_counter() - start)

    TuneController.save_to_dir = timed


def timed_delivery(lags: list) -> None:
    """When each result reached the sweep's MLflow callback on Tune's loop, less the stand-in's
    clock at its report: the part of the MLflow lag that is Tune's (Ray Train's report, the trial's
    actor, the controller), before any write is queued."""
    from deeplab_sweep.search.mlflow_callback import MlflowTrialCallback

    on_result = MlflowTrialCallback.on_trial_result

    def timed(self, iteration, trials, trial, result, **info):
        if REPORTED_AT in result:
            lags.append(time.time() - result[REPORTED_AT])
        return on_result(self, iteration, trials, trial, result, **info)

    MlflowTrialCallback.on_trial_result = timed


@contextlib.contextmanager
def mlflow_server(folder: Path):
    """The tracking server as `deeplab ui` starts it, as the suite's is: one worker (`mlflow
    server --workers 2` on sqlite took 52 ms a `log_batch` from one thread, one worker 9 ms)."""
    server = MlflowServer(folder)
    server.start(timeout_s=120)
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def loopback_nodes(nodes: int, at_once: int):
    """A CPU-less head and `nodes` worker nodes sharing the trials' logical CPUs, on loopback;
    its address (None with no nodes: the sweep starts its own local Ray)."""
    if not nodes:
        yield None
        return
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100_000_000})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=-(-at_once // nodes), object_store_memory=100_000_000)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


def synth_data(folder: Path) -> Path:
    from deeplab_sweep.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["data", "synth", "voc", "--out", str(folder)]) == 0
    return folder


def overrides(args, data: Path, work: Path, tracking_uri: str) -> list[str]:
    return [
        f"data.root={data}",
        f"train.epochs={TABLE_EPOCHS}",
        "train.cpus_per_worker=1",
        "train.keep_checkpoints=1",
        f"sweep.num_samples={args.trials}",
        f"sweep.max_concurrent={args.at_once}",
        f"sweep.name=scale-{args.trials}x{args.at_once}",
        "sweep.budget.epochs=null",  # every trial runs: the demo's budget would end the sweep first
        "sweep.hand_over.at=null",
        f"cluster.num_cpus={args.at_once + 1}",
        "cluster.object_store_memory=200000000",
        f"storage.path={work / 'ray'}",
        f"mlflow.tracking_uri={tracking_uri}",
        "mlflow.system_metrics_interval_s=null",
        *(f"space.{k}={v}" for k, v in DEMO_TABLE_SPACE.items()),
        *args.overrides,
    ]


def mlflow_figures(tracking_uri: str, experiment: str, sweep: str) -> dict:
    """Each trial run's epochs (steps of val/mIoU) and each report's lag into MLflow."""
    from mlflow import MlflowClient

    from deeplab_sweep.search import tracking

    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name(experiment).experiment_id
    runs = tracking.all_runs(c, [exp], tracking.sweep_filter(sweep, tracking.KIND_TRIAL))
    lags, duplicates, reports, times = [], 0, 0, []
    for r in runs:
        history = c.get_metric_history(r.info.run_id, REPORTED_AT)
        steps = [m.step for m in history]
        duplicates += len(steps) - len(set(steps))
        reports += len(set(steps))
        lags += [m.timestamp / 1000 - m.value for m in history]
        times += [m.value for m in history]
    span = max(times) - min(times) if times else float("nan")
    return {"runs": len(runs), "reports": reports, "duplicates": duplicates, "lags": sorted(lags), "span_s": span}


def timed_best(tracking_uri: str, experiment: str, sweep: str, out: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).with_name("deeplab")), "best", "--experiment", experiment]
        + ["--sweep", sweep, "--tracking-uri", tracking_uri, "--out", str(out), "--json"],
        capture_output=True,
        text=True,
    )
    took = time.perf_counter() - start
    # A stand-in's checkpoint is not a model: `best` finds and downloads it, then refuses to load it.
    return took if "not a loadable checkpoint" in done.stderr or done.returncode == 0 else float("nan")


def timed_sync(tracking_uri: str, experiment: str, sweep_folder: Path) -> float:
    """`deeplab sync` over the sweep's runs, all already in MLflow (a new process)."""
    start = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).with_name("deeplab")), "sync", str(sweep_folder)]
        + ["--tracking-uri", tracking_uri, "--experiment", experiment],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def timed_runs_page(tracking_uri: str, experiment: str, shot: Path, timeout_s: float = 120.0) -> tuple[float, int]:
    """MLflow's runs page of the experiment in headless Chromium, driven over the DevTools
    protocol: seconds from navigating to the first rows of its runs table on screen, and how
    many rows it shows then (a screenshot is saved to `shot`)."""
    import asyncio
    import base64
    import json
    import shutil

    import aiohttp
    from mlflow import MlflowClient

    exp = MlflowClient(tracking_uri).get_experiment_by_name(experiment).experiment_id
    url = f"{tracking_uri}/#/experiments/{exp}/runs"
    rows = "document.querySelectorAll('.ag-center-cols-container .ag-row').length"

    async def drive(port: int) -> tuple[float, int]:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):  # the browser's debugging endpoint comes up
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                        pages = [t for t in await r.json() if t["type"] == "page"]
                        if pages:
                            break
                await asyncio.sleep(0.1)
            async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 1_000_000))

                async def call(method: str, **params) -> dict:
                    n = next(ids)
                    await ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
                    while True:
                        msg = json.loads((await ws.receive()).data)
                        if msg.get("id") == n:
                            return msg.get("result", {})

                start = time.perf_counter()
                await call("Page.navigate", url=url)
                shown = 0
                while time.perf_counter() - start < timeout_s and not shown:
                    await asyncio.sleep(0.05)
                    shown = (await call("Runtime.evaluate", expression=rows))["result"].get("value") or 0
                took = time.perf_counter() - start
                png = await call("Page.captureScreenshot", format="png")
                shot.write_bytes(base64.b64decode(png["data"]))
                return (took if shown else float("nan")), shown

    port = free_port()
    # Chromium's helper processes outlive its main one and write into the profile as they go.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        browser = subprocess.Popen(
            [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu"]
            + [f"--user-data-dir={profile}", "--window-size=1600,1000", f"--remote-debugging-port={port}"]
            + ["about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return asyncio.run(drive(port))
        finally:
            os.killpg(browser.pid, signal.SIGTERM)
            browser.wait(timeout=30)


def _bare_trial(config: dict, epochs: int, epoch_s: float) -> None:
    from ray import tune

    for epoch in range(1, epochs + 1):
        time.sleep(epoch_s)
        tune.report({"epoch": epoch, "val/mIoU": config["x"] * epoch, REPORTED_AT: time.time()})


def bare_tune(args) -> None:
    """Ray Tune alone, as the floor under the product's figures: as many trials as many at once,
    each reporting the table's 12 epochs one every --epoch-s, on a Ray started as the sweep
    starts it, with Tune's default searcher and scheduler and no callback of ours, no
    checkpoint, no MLflow. Prints the results per second its driver took in and its CPU time
    per result."""
    from ray import tune

    from deeplab_sweep.search.cluster import RaySession
    from deeplab_sweep.search.job_config import ClusterConfig

    class Received(tune.Callback):
        def __init__(self):
            self.at: list[float] = []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.at.append(time.time())

    me = psutil.Process()
    received = Received()
    cluster = ClusterConfig(num_cpus=args.at_once + 1, object_store_memory=200_000_000)
    with tempfile.TemporaryDirectory(prefix="driver-scale-") as tmp, RaySession(cluster, None, dashboard=False):
        cpu_start, wall_start = me.cpu_times(), time.perf_counter()
        tune.Tuner(
            tune.with_resources(
                tune.with_parameters(_bare_trial, epochs=TABLE_EPOCHS, epoch_s=args.epoch_s), {"CPU": 1}
            ),
            param_space={"x": tune.uniform(0, 1)},
            tune_config=tune.TuneConfig(num_samples=args.trials, max_concurrent_trials=args.at_once, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=tmp, name="bare", callbacks=[received], verbose=0),
        ).fit()
        wall = time.perf_counter() - wall_start
        cpu = me.cpu_times()
    cpu_s = (cpu.user - cpu_start.user) + (cpu.system - cpu_start.system)
    n, span = len(received.at), max(received.at) - min(received.at)
    print(f"\nRay Tune alone: {args.trials} trials, {args.at_once} at once, an epoch every {args.epoch_s} s")
    print(f"  results:                {n} over {span:.1f} s from the first to the last: {n / span:.1f}/s")
    print(f"  driver CPU:             {cpu_s:.1f} s over {wall:.1f} s; {1000 * cpu_s / n:.2f} ms per result")


def server_rate(seconds: float = 15.0) -> None:
    """What the benchmark's tracking server takes alone: `log_batch` requests of 20 metrics a
    second, from 1 and from 4 threads (each to a run of its own)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    with tempfile.TemporaryDirectory(prefix="driver-scale-") as tmp, mlflow_server(Path(tmp)) as url:
        c = MlflowClient(url)
        exp = c.create_experiment("rate")
        runs = [c.create_run(exp).info.run_id for _ in range(4)]

        def work(i: int, done: list[int], stop: float) -> None:
            while time.monotonic() < stop:
                now = int(time.time() * 1000)
                c.log_batch(runs[i], metrics=[Metric(f"m{j}", 0.5, now, done[i]) for j in range(20)])
                done[i] += 1

        for threads in (1, 4):
            done, stop = [0] * threads, time.monotonic() + seconds
            pool = [threading.Thread(target=work, args=(i, done, stop)) for i in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            print(f"mlflow server alone, {threads} thread(s): {sum(done) / seconds:.1f} log_batch requests/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--at-once", type=int, default=64)
    p.add_argument("--epoch-s", type=float, default=0.25)
    p.add_argument("--nodes", type=int, default=0, help="simulated nodes on loopback (ray.cluster_utils.Cluster)")
    p.add_argument("--server-rate", action="store_true", help="only the tracking server's write rate, alone")
    p.add_argument("--bare", action="store_true", help="only Ray Tune, the same trials without the product")
    p.add_argument("--writers", type=int, default=None, help="MLflow writer threads (the callback's WRITERS)")
    p.add_argument(
        "--nice-trials",
        action="store_true",
        help="the trials' processes at the lowest CPU priority: the driver and the tracking server as "
        "they are when the trials run on nodes of their own",
    )
    p.add_argument("--shot", type=Path, help="time MLflow's runs page in headless Chromium; its screenshot here")
    p.add_argument("overrides", nargs="*", help="more key=value for the sweep")
    args = p.parse_args()
    if args.server_rate:
        server_rate()
        return
    if args.bare:
        bare_tune(args)
        return
    if args.writers:
        from deeplab_sweep.search import mlflow_callback

        mlflow_callback.WRITERS = args.writers

    me = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="driver-scale-") as tmp, mlflow_server(Path(tmp)) as url:
        work = Path(tmp)
        data = synth_data(work / "voc")
        job = load_job(REPO / "conf" / "sweep" / "demo.yaml", overrides(args, data, work, url))
        standin = StandIn(str(DEMO_TABLE), tuple(DEMO_TABLE_SPACE), args.epoch_s)
        rss_start = me.memory_info().rss
        cpu_start, wall_start = me.cpu_times(), time.perf_counter()
        timings: dict = {}
        timed_summary(timings)
        saves: list[float] = []
        timed_state_saves(saves)
        delivered: list[float] = []
        timed_delivery(delivered)
        with CpuByKind(nice_trials=args.nice_trials) as others, loopback_nodes(args.nodes, args.at_once) as address:
            summary = run_sweep(job, address=address, standin=standin)
        wall = time.perf_counter() - wall_start
        cpu = me.cpu_times()
        cpu_s = (cpu.user - cpu_start.user) + (cpu.system - cpu_start.system)
        rss_end = me.memory_info().rss
        figures = mlflow_figures(url, job.mlflow.experiment, job.sweep.name)
        best_s = timed_best(url, job.mlflow.experiment, job.sweep.name, work / "best")
        sync_s = timed_sync(url, job.mlflow.experiment, work / "ray" / job.sweep.name)
        page_s, page_rows = timed_runs_page(url, job.mlflow.experiment, args.shot) if args.shot else (None, 0)

    results = sum(t.epochs for t in summary.trials)
    summary_s = timings["summary"]
    lags = figures["lags"]
    from deeplab_sweep.search.mlflow_callback import WRITERS

    print(
        f"\n{args.trials} stand-in trials, {args.at_once} at once, an epoch every {args.epoch_s} s, {WRITERS} writers"
    )
    print(f"  trials finished:        {sum(1 for t in summary.trials if not t.error)} of {len(summary.trials)}")
    span = figures["span_s"]
    print(f"  results:                {results} over {span:.1f} s from the first to the last: {results / span:.1f}/s")
    print(f"  offered at most:        {args.at_once / args.epoch_s:.0f} results/s (trials x 1/epoch-s)")
    print(f"  driver CPU:             {cpu_s:.1f} s over {wall:.1f} s; {1000 * cpu_s / results:.2f} ms per result")
    print("  other CPU:              " + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(others.totals().items())))
    print(f"  driver RSS:             {rss_start / 2**20:.0f} MiB before, {rss_end / 2**20:.0f} MiB after")
    print(
        f"  MLflow lag:             median {statistics.median(lags):.2f} s, "
        f"p99 {lags[int(0.99 * (len(lags) - 1))]:.2f} s, max {lags[-1]:.2f} s"
    )
    delivered.sort()
    print(
        f"  of which Tune's:        median {statistics.median(delivered):.2f} s, "
        f"p99 {delivered[int(0.99 * (len(delivered) - 1))]:.2f} s (the report to our callback, on Tune's loop)"
    )
    print(
        f"  in MLflow:              {figures['runs']} runs, {figures['reports']} reports "
        f"({results} made), {figures['duplicates']} twice"
    )
    print(
        f"  Tune's state saves:     {len(saves)}, median {1000 * statistics.median(saves):.0f} ms, "
        f"max {1000 * max(saves):.0f} ms, {sum(saves):.1f} s in all"
    )
    print(f"  summary:                {summary_s:.1f} s")
    print(f"  deeplab best:           {best_s:.1f} s (a process, over {figures['runs']} runs)")
    print(f"  deeplab sync:           {sync_s:.1f} s (a process, every run already in MLflow)")
    if page_s is not None:
        print(f"  MLflow's runs page:     {page_s:.1f} s to {page_rows} rows in headless Chromium ({args.shot})")
    print(f"  driver peak RSS:        {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
