"""`python -m benchmarks.run plan`: per-chip memory, XLA FLOPs and roofline step time of the real
train step, compiled ahead of time for TPU topologies on this CPU machine (`jaxllm plan`; needs
the `libtpu` package), across remat policies and per-chip batches, next to MaxText's figures.

The MaxText figures are quoted, not re-run here (MaxText is not installed in this project's
environment): MaxText 0.2.5 `python -m MaxText.train_compile` for Llama-3-8B, v5p-8 (4 chips),
max_target_length=8192, ici_fsdp_parallelism=4, dtype=bfloat16, weight_dtype=float32, AdamW,
gradient_accumulation_steps=1, with remat_policy and attention as in each row; "max per chip" is the
largest per_device_batch_size that compiled, "GiB at n/chip" XLA's total for that many per chip.
"""

from __future__ import annotations

import os
import time

# (remat, attention, per-chip sequences that fit at most, GiB per chip at 1 and at 2 per chip)
MAXTEXT_8B_V5P8 = [
    ("full", "splash (attention=flash)", 8, 40.5, None),
    ("minimal", "splash (attention=flash)", 2, 63.7, 87.7),
    ("full", "dot_product", 3, 57.5, None),
]

# What to compile: (config, topology, remat, attention_impl, sequences per chip). Each compile of the
# 8B step takes ~80 s on 2 CPU cores; of the 70B/v5p-256 step a few minutes.
CASES_8B = [
    ("full", "xla", 1), ("full", "xla", 2), ("full", "xla", 3),  # the reference path: T x T scores
    ("full", "auto", 1), ("full", "auto", 10), ("full", "auto", 11), ("full", "auto", 12),
    ("minimal", "auto", 1), ("minimal", "auto", 2), ("minimal", "auto", 3),
    ("save_dot_except_mlp", "auto", 4), ("save_qkv_proj", "auto", 6),
    ("minimal_offloaded", "auto", 4), ("minimal_offloaded", "auto", 5),
    ("qkv_proj_offloaded", "auto", 10),
]
CASES_70B = [("full", "auto", 1), ("full", "auto", 2), ("full", "auto", 4), ("minimal_offloaded", "auto", 1)]
SMOKE_CASES = [("full", "auto", 1)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"8b": ("configs/runs/pretrain_8b_v5p8.yaml", "v5p-8", 4),
        "70b": ("configs/runs/pretrain_70b_v5p256.yaml", "v5p-256", 128)}


def _row(model: str, remat: str, impl: str, per_chip: int, xla_flops: bool) -> dict:
    from jaxllm.app.plan import GiB, parse_topology, plan
    from jaxllm.config import load_config
    path, topology, chips = RUNS[model]
    cfg = load_config(os.path.join(ROOT, path), [
        f"model.remat={remat}", f"model.attention_impl={impl}", f"train.batch_size={per_chip * chips}",
        "train.grad_accum=1"])
    t0 = time.perf_counter()
    r = plan(cfg, parse_topology(topology), compile=True, xla_flops=xla_flops)
    return {"model": model, "topology": topology, "remat": remat, "attention": r.attention, "per_chip": per_chip,
            "seq_len": cfg.train.seq_len, "fits": r.fits, "method": r.method, "total_gib": r.total_bytes / GiB,
            "temp_gib": r.temp_bytes / GiB, "params_gib": r.params_bytes / GiB, "opt_gib": r.opt_state_bytes / GiB,
            "host_gib": r.host_bytes / GiB, "model_flops": r.flops_per_step, "xla_flops": r.xla_flops_per_step,
            "step_time_s": r.step_time_s, "mfu_bound": r.mfu, "compile_s": r.compile_s,
            "wall_s": time.perf_counter() - t0}


def suite_plan(args, write_record) -> None:
    from jaxllm.app.plan import libtpu_available
    if not libtpu_available():
        raise SystemExit("the plan suite compiles for TPU: pip install -e '.[tpu]' (libtpu) first")
    import jax
    from importlib.metadata import version
    which = (getattr(args, "models", None) or "8b,70b").split(",")
    cases = [("8b", *c) for c in (SMOKE_CASES if args.smoke else CASES_8B) if "8b" in which]
    if not args.smoke and "70b" in which:
        cases += [("70b", *c) for c in CASES_70B]
    rows = []
    for model, remat, impl, per_chip in cases:
        # XLA's FLOP count (a CPU lowering per layer count) once per model and policy, at 1 per chip
        want_flops = per_chip == 1 and not args.smoke and impl == "auto"
        row = _row(model, remat, impl, per_chip, want_flops)
        rows.append(row)
        print(f"plan {model} {row['topology']} remat={remat:<20} attention={row['attention']:<8} {per_chip:>2}/chip: "
              f"{row['total_gib']:6.1f} GiB{' + %.1f GiB host' % row['host_gib'] if row['host_gib'] else ''}  "
              f"{'fits' if row['fits'] else 'does not fit'}  (compiled in {row['compile_s']:.0f} s)", flush=True)
    config = {"libtpu": version("libtpu"), "jax_backend_for_compile": "TPU (compile-only devices)",
              "maxtext_8b_v5p8": [dict(zip(("remat", "attention", "max_per_chip", "gib_at_1", "gib_at_2"), m))
                                  for m in MAXTEXT_8B_V5P8],
              "maxtext_version": "0.2.5 (train_compile)", "jax": jax.__version__}
    path = write_record("plan", "llama3-tpu-aot", config, {"rows": rows}, args.smoke)
    if path:
        print(f"wrote {path}")


def max_fitting(rows: list, model: str, remat: str, attention: str) -> int:
    """The largest per-chip batch among the compiled rows that fits (0 if none)."""
    fit = [r["per_chip"] for r in rows if r["model"] == model and r["remat"] == remat and
           r["attention"] == attention and r["fits"]]
    return max(fit, default=0)
