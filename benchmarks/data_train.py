"""Training input at scale: peak host memory, time to the first step and pipeline throughput of
`jaxllm train` on large corpora (raw JSONL and prepared ArrayRecord shards), with 1 and 2 grain
worker processes, against the model's own consumption.

Each measurement is a fresh subprocess. Memory is sampled every 50 ms with psutil over the whole
process tree (the trainer plus its grain workers; `tree` = the sum, `main` = the trainer alone),
so it counts what a host would have to hold. Time to first step: launch -> metrics.jsonl holds
step 1 (imports, pipeline build, the held-out batches, compile and one step included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["configs/runs/pretrain_tiny.yaml", "train.progress=false", "train.log_every=1", "eval.every=0",
        "eval.batches=1", "checkpoint.every=0", "checkpoint.async_save=false"]


def generate_jsonl(path: str, target_bytes: int, seed: int = 0) -> str:
    """A deterministic English-like JSONL corpus of about `target_bytes` (Zipf word frequencies,
    documents of 200-5000 characters); reused when it already exists at that size."""
    import numpy as np
    if os.path.exists(path) and abs(os.path.getsize(path) - target_bytes) < target_bytes * 0.05:
        return path
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocab = np.array(["".join(rng.choice(letters, int(n), p=None)) for n in rng.integers(1, 10, 20000)])
    tmp, written, doc = path + ".tmp", 0, 0
    with open(tmp, "w") as f:
        while written < target_bytes:
            words = vocab[np.minimum(rng.zipf(1.3, 200_000) - 1, len(vocab) - 1)]
            lengths = rng.integers(30, 800, 1000)
            cuts = np.cumsum(lengths)
            for a, b in zip(np.r_[0, cuts[:-1]], cuts):
                if b > len(words):
                    break
                line = json.dumps({"id": doc, "text": " ".join(words[a:b]) + "."}) + "\n"
                f.write(line)
                written += len(line)
                doc += 1
    os.replace(tmp, path)
    return path


def _sample_tree(proc, until) -> dict:
    """Polls the process tree's RSS until `until()` is true or the process ends."""
    import psutil
    root = psutil.Process(proc.pid)
    peak_tree = peak_main = 0
    while proc.poll() is None and not until():
        try:
            procs = [root] + root.children(recursive=True)
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    rss.append(0)
            peak_tree, peak_main = max(peak_tree, sum(rss)), max(peak_main, rss[0])
        except psutil.Error:
            pass
        time.sleep(0.05)
    return {"peak_rss_tree_mb": peak_tree / 2**20, "peak_rss_main_mb": peak_main / 2**20}


def _steps_logged(path: str) -> list:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return [m for m in out if "loss" in m]


def train_bench(source: str, workers: int, steps: int = 30, extra: tuple = ()) -> dict:
    """`jaxllm train` (tiny model) on `source` (a YAML flow mapping for data.sources[0])."""
    out = tempfile.mkdtemp(prefix="jaxllm-bench-train-")
    metrics = os.path.join(out, "metrics.jsonl")
    cmd = [sys.executable, "-m", "jaxllm.app.cli", "train", *BASE, f"output_dir={out}", f"data.sources=[{source}]",
           f"train.steps={steps}", f"data.workers={workers}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = {}

    def first_step_seen():
        if not first and _steps_logged(metrics):
            first["s"] = time.perf_counter() - t0
        return False  # keep sampling to the end: the peak may come later
    mem = _sample_tree(proc, first_step_seen)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"train failed: {err[-2000:]}")
    logged = _steps_logged(metrics)
    if not first:
        first["s"] = float("nan")
    rates = sorted(m["tokens_per_s"] for m in logged[5:]) or [0.0]
    return {**mem, "first_step_s": first["s"], "wall_s": time.perf_counter() - t0, "steps": len(logged),
            "model_tokens_per_s": rates[len(rates) // 2]}


_PIPE = """
import json, sys, time
from jaxllm.config import load_config
from jaxllm.data.pipeline import build_pipeline
from jaxllm.data.tokenizer import Tokenizer
if __name__ == "__main__":
    cfg = load_config(sys.argv[1], sys.argv[3:])
    n = int(sys.argv[2])
    t0 = time.perf_counter()
    p = build_pipeline(cfg.data, Tokenizer(cfg.data.tokenizer), cfg.train.seq_len, cfg.train.batch_size, 0, 1)
    it = p.iterator()
    next(it)
    t1 = time.perf_counter()
    for _ in range(n):
        next(it)
    dt = time.perf_counter() - t1
    it.close()
    print("RESULT", json.dumps({"build_and_first_batch_s": t1 - t0, "pipeline_tokens_per_s":
                                n * cfg.train.batch_size * cfg.train.seq_len / dt}))
"""


def pipeline_bench(source: str, workers: int, batches: int = 300, extra: tuple = ()) -> dict:
    """The input pipeline alone (no model): build + first batch, then batches/s as tokens/s."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_PIPE)
    cmd = [sys.executable, f.name, "configs/runs/pretrain_tiny.yaml", str(batches), f"data.sources=[{source}]",
           f"data.workers={workers}", *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    os.unlink(f.name)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode != 0 or not line:
        raise RuntimeError(f"pipeline bench failed: {r.stderr[-2000:]}")
    return json.loads(line[0][len("RESULT "):])


def train_suite(corpora: dict, workers: list[int], steps: int = 30, extra: tuple = ()) -> list:
    """corpora: name -> data.sources[0] YAML mapping; extra: config overrides for every run (e.g. the
    tokenizer the shards were prepared with). -> one row per (corpus, workers)."""
    rows = []
    for name, source in corpora.items():
        for w in workers:
            row = {"corpus": name, "workers": w, **train_bench(source, w, steps, extra),
                   **pipeline_bench(source, w, extra=extra)}
            row["headroom"] = row["pipeline_tokens_per_s"] / max(row["model_tokens_per_s"], 1e-9)
            print(f"data train {name} workers={w}: peak RSS tree {row['peak_rss_tree_mb']:.0f} MB "
                  f"(main {row['peak_rss_main_mb']:.0f}), first step {row['first_step_s']:.1f} s, pipeline "
                  f"{row['pipeline_tokens_per_s']:,.0f} tok/s vs model {row['model_tokens_per_s']:,.0f} tok/s", flush=True)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    """Rows for shards prepared elsewhere (e.g. `benchmarks/data_suite.py --keep-output`), recorded
    as a data_scale record: --source NAME=YAML_MAPPING (repeatable), overrides after `--`."""
    import argparse
    from benchmarks.common import write_record
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    ap.add_argument("--source", action="append", required=True)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--name", required=True)
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    corpora = dict(s.split("=", 1) for s in a.source)
    rows = train_suite(corpora, [int(w) for w in a.workers.split(",")], a.steps, tuple(extra))
    print(write_record("data_scale", a.name, {"sources": corpora, "overrides": extra, "model": "tiny (pretrain_tiny.yaml)",
                                              "batch": 16, "seq": 128}, {"train": rows}, False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
