"""Shared benchmark plumbing: environment record, timing, JSON results, the README table."""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import statistics
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    import subprocess
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    import flax
    import jax
    import jaxlib
    dev = jax.devices()[0]
    return {"device_kind": dev.device_kind, "platform": dev.platform, "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "machine": platform.machine(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "git_commit": _git_commit(), "date": datetime.date.today().isoformat()}


def timed(fn, repeats: int, warmup: int) -> list[float]:
    """Seconds per call of fn() (fn must block until its work is done)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs) -> float:
    return float(statistics.median(xs))


def write_record(suite: str, name: str, config: dict, results: dict, smoke: bool) -> str:
    env = environment()
    record = {"suite": suite, "name": name, "smoke": smoke, **env, "config": config, "results": results}
    if smoke:  # smoke runs (CI) prove the suite runs; they are not results
        return ""
    os.makedirs(RESULTS, exist_ok=True)
    tag = env["device_kind"].replace(" ", "_").lower()
    stem = os.path.join(RESULTS, f"{suite}-{name}-{tag}-{env['device_count']}dev-{env['date']}")
    path, n = stem + ".json", 1
    while os.path.exists(path):  # a second run on the same day is a new record, never an overwrite
        n += 1
        path = f"{stem}-run{n}.json"
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path


def load_records() -> list[dict]:
    recs = []
    def order(path):  # same-day runs in run order: x.json, x-run2.json, ...
        return path if "-run" in path else path[:-len(".json")] + "-run1.json"
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json")), key=order):
        with open(path) as f:
            recs.append(json.load(f))
    return recs
