"""MLflow's system metrics (CPU, memory, disk, network; GPU through nvidia-ml-py) of the node a
trial trains on, as `system/<node>/<name>` with each epoch's report.

MLflow's own collectors take them (the monitors its `SystemMetricsMonitor` runs, their names,
its `system/<node>/` prefix); they travel with the trial's results to the driver, whose writer
logs them into the trial's run, so a trial on a worker node never needs the tracking server or
its credentials."""

from __future__ import annotations

import sys
import threading

from deeplab_sweep.search.internals import InternalsChanged, mlflow_monitors


class SystemSampler:
    """Samples every `interval_s` on a thread from `start()`; `take()` returns the averages
    since the last take. MLflow is imported on that thread: the trial does not wait for it."""

    def __init__(self, node_id: str, interval_s: float):
        self.node_id, self.interval_s = node_id, interval_s
        self._monitors: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SystemSampler:
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            monitors = mlflow_monitors()
        except InternalsChanged as e:  # the trial trains on, without system metrics, and says why
            print(f"warning: no system metrics for this trial: {e}", file=sys.stderr)
            return
        with self._lock:
            self._monitors = monitors
        while not self._stop.is_set():
            with self._lock:
                for m in monitors:
                    m.collect_metrics()
            self._stop.wait(self.interval_s)

    def take(self) -> dict[str, float]:
        values: dict = {}
        with self._lock:
            for m in self._monitors:
                m.collect_metrics()  # an epoch shorter than the interval still gets a sample
                values.update(m.aggregate_metrics())
                m.clear_metrics()
        prefix = f"system/{self.node_id}/"
        return {prefix + k: float(v) for k, v in values.items()}

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
