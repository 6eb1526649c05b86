"""Where a sweep's first trial waits once Ray is up: a plain actor, the same actor with the
runtime env Tune gives its trial actors, that actor again once a task with the same runtime env
has run (a worker warmed for it?), and Tune's trial actor itself, in a new local Ray (2 CPUs,
no dashboard), each once per round, after Ray's prestarted workers are idle. For each: seconds
from the request to the actor's code running, and whether it ran in one of the workers Ray
prestarted. Those were started with no runtime env, so they cannot serve an actor that has
one: it waits for a new worker process (a Python start and `import ray`). Nor can a worker that
has run a task (the raylet marks it a task worker), even one idle with the same runtime env.

    python benchmarks/actor_start.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import psutil
import ray
from ray import tune

# Tune's newer console output prints its experiment table even at verbose=0: the figures alone.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def idle_workers() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "ray::IDLE"}


@ray.remote(num_cpus=1)
class Plain:
    def entered(self) -> tuple[float, int]:
        return time.time(), os.getpid()


# What Tune gives each trial actor, at least (ray/tune/execution/class_cache.py, Ray 2.60).
TUNES_RUNTIME_ENV = {"env_vars": {"PL_DISABLE_FORK": "1"}}


def plain_actor(runtime_env: dict | None = None) -> tuple[float, int]:
    start = time.time()
    actor = Plain.options(runtime_env=runtime_env).remote()
    entered, pid = ray.get(actor.entered.remote())
    ray.kill(actor)
    return entered - start, pid


@ray.remote(num_cpus=1)
def warm() -> int:
    return os.getpid()


def warmed_actor() -> tuple[float, int, bool]:
    """The actor with Tune's runtime env, requested once a task with that env has run and left
    its worker idle; and whether the actor ran in that worker."""
    task_worker = ray.get(warm.options(runtime_env=TUNES_RUNTIME_ENV).remote())
    seconds, pid = plain_actor(TUNES_RUNTIME_ENV)
    return seconds, pid, pid == task_worker


def tune_actor(storage: str) -> tuple[float, int]:
    """The trial function's entry, against the moment Tune's run starts (Tune's own set-up, a
    few tenths of a second, included)."""

    def trial(config):
        tune.report({"entered": time.time(), "pid": os.getpid()})

    start = time.time()
    result = tune.Tuner(trial, run_config=tune.RunConfig(storage_path=storage, verbose=0)).fit()[0]
    return result.metrics["entered"] - start, result.metrics["pid"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    for i in range(args.repeat):
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, logging_level="ERROR")
        try:
            time.sleep(3)  # the prestarted workers idle
            with tempfile.TemporaryDirectory() as storage:
                arms = {
                    "plain": plain_actor,
                    "plain, Tune's runtime env": lambda: plain_actor(TUNES_RUNTIME_ENV),
                    "plain, Tune's runtime env, after a task with it": warmed_actor,
                    "Tune's trial": lambda: tune_actor(storage),
                }
                for name, start in arms.items():
                    prestarted = idle_workers()
                    seconds, pid, *task_worker = start()
                    row = {"run": i, "actor": name, "start_s": round(seconds, 2), "prestarted": pid in prestarted}
                    if task_worker:
                        row["in_the_task_worker"] = task_worker[0]
                    print(json.dumps(row), flush=True)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
