"""Rewrites benchmarks/README.md: the methods text below plus one table per suite from results/."""

from __future__ import annotations

import os

HEADER = """# jaxllm benchmarks

All numbers below were measured by `python -m benchmarks.run SUITE` and are generated from the JSON
records in `results/` by `python -m benchmarks.run table`. Each record names the device, the JAX
versions and the date; times are medians over repeated steps after warm-up (compilation excluded).

- **FLOPs** per step use the formula in `jaxllm.core.model.flops_per_token`: 6 x (all parameters except
  the embedding lookup) + 12 x layers x heads x head_dim x seq_len per token (PaLM accounting, no
  causal discount). The `formula/XLA` column divides it by XLA's own cost analysis of the compiled
  step (summed over devices); values near 1 mean the formula counts what the compiler runs.
- **MFU** = formula FLOPs x tokens/s / (peak bf16 FLOP/s x devices); CPUs have no listed peak, so no MFU.
- **peer**: jaxllm and a nanoGPT-style PyTorch Llama of the same shape (vocab 32000, d_model 256,
  4 layers, 4 heads, head_dim 64, SwiGLU 1024, untied, 20.6M params), trained on the same batches of
  the embedded corpus (batch 8, seq 256, float32, AdamW lr 1e-3, clip 1.0) in one process, one
  after the other; tokens/s is the median step after 3 warm-up steps, and the held-out loss is
  measured on the same held-out batches after the same number of steps.
- **rollout**: the KV-cache sampler (`jaxllm.core.sampler.generate_ids`, greedy, no early stop) on a
  randomly initialised model, prompts of 64 tokens and 64 new tokens. Prefill tok/s = batch x 64 /
  time of a 1-token generation; decode ms/step = (time for 64 tokens - time for 1) / 63. Roofline
  fraction = bytes a decode step must read (every fp32 weight once + the average KV cache) / step
  time / peak memory bandwidth (the spec sheet on GPU/TPU; on CPU a measured large host copy).
  On CPU the "roof" is a DRAM copy, while small models' weights partly stay in the L2/L3 caches, so
  the fraction can exceed 100% there; it is a meaningful roofline only on GPU/TPU (spec-sheet HBM).
  "Full recompute" is the no-cache reference sampler (`jaxllm.app.inference._sample`) on the same job.
- **rollout layout**: `python -m benchmarks.run rollout --devices 8` (`benchmarks/rl_suite.py`):
  the tiny model trained fsdp over 8 CPU devices; sampling tok/s (64 + 64 tokens, greedy, no early
  stop) with the weights in that layout (all-gathered inside every decode step) vs resharded once to
  `rl.sampler_mesh={data: -1, fsdp: 1}` (the reshard timed with each rollout). GRPO rows: the tiny
  GRPO config from random weights, 4 rollouts (the first, compiling, dropped); sampling = generation
  + rewards, scoring = teacher-forced old/reference log-probs + advantages, training = the rest of
  the wall time of the rollout's optimizer steps. 8 simulated devices on a 2-core CPU share the
  cores: the ratio shows the gathers removed, not what a TPU/GPU slice gains.
- **posttrain**: one DPO / GRPO / PPO train step of the 20.6M peer model (DPO: 4 pairs, reference
  log-probs precomputed into the batch; GRPO/PPO: 8 rollout rows, PPO with its critic) with the
  chunked log-prob head (`objective.xent_chunk_tokens=512`, `jaxllm.core.xent.token_logps`) and with the
  plain [B, T, V] logits path (`0`). "temp" is XLA's temporary memory of the compiled step
  (`compiled.memory_analysis().temp_size_in_bytes`, XLA:CPU's buffer assignment; other backends
  assign buffers differently, but the [B, T, V] float32 logits and their gradient are what the
  chunked head removes, and that saving grows with vocabulary x tokens).
- **plan**: `python -m benchmarks.run plan` (`benchmarks/plan_suite.py`) compiles the real train step
  ahead of time for compile-only TPU devices (libtpu) on the CPU machine named in the record and
  reads XLA's memory analysis (`jaxllm plan`): Llama-3-8B on v5p-8 (4 chips, fsdp 4) and Llama-3-70B
  on v5p-256 (128 chips, fsdp 128), seq 8192, bf16 compute, fp32 params + AdamW, one micro-batch.
  "pinned host" is XLA's host memory for offloaded activations. The XLA/model FLOP ratio (remat
  recomputation) is counted once per policy at 1 sequence per chip; the roofline step time uses
  XLA's FLOPs in those rows and the model FLOPs elsewhere, and ignores communication. MaxText rows
  are quoted from issue 19 (MaxText 0.2.5 `train_compile`, same shapes and sharding), not re-run.
- **GPU**: no GPU was available to the sessions that produced these records; GPU rows will appear
  here when measured.
- **peer, day to day**: machines of this kind ("AMD EPYC", 2 cores, AVX-512) differ from day to
  day, and not equally for XLA and PyTorch: the same jaxllm commit ran ~1.07 s/step on 2026-11-22
  and ~1.47 s/step on 2026-11-23, while PyTorch eager measured 1,364, 1,440 and 1,574 tok/s on three
  machines. Only the ratios within one run compare. The third row (commit a0ab491) adds the fused
  chunked LM head + cross-entropy (`jaxllm/core/xent.py`) and a SwiGLU with its own backward: on the
  same machine the jaxllm step went from 1.47 s to 1.22 s. It is 1.07x PyTorch eager and 0.86x
  `torch.compile` on that machine: the CPU target (1.5x eager, ahead of torch.compile) is not met.
  Where the step goes on CPU (XLA profile, 2026-11-23): the LM head's three 33.5 GFLOP matmuls
  ~560 ms at ~180 GFLOP/s (near this machine's ~200 GFLOP/s fp32 matmul rate), the 4 layers
  ~480 ms (their matmuls ~300 ms at that rate; the rest is small elementwise and attention ops),
  AdamW over 20.6M parameters ~40 ms.
"""


def _fmt(v, digits=0):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _mib(n):
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _device(r: dict) -> str:
    return f"{r['device_count']}x {r['device_kind']} ({r['cpu_count']} cores)"


def _section(title: str, columns: list[str], rows: list[list]) -> list[str]:
    """One markdown table: a heading, the header row, one line per row of cells."""
    return [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _train(r):
    c, res = r["config"], r["results"]
    return [[r["name"], f"{res['params'] / 1e6:.1f}M", f"{c['batch']}x{c['seq']}", c["mesh"], _device(r),
             f"{res['step_time_s'] * 1e3:.1f}", _fmt(res["tokens_per_s"]), _fmt(res["tokens_per_s_per_device"]),
             _fmt(res["formula_over_xla"], 3), _fmt(res["mfu"], 3), r["date"]]]


def _peer(r):
    res = r["results"]
    losses = " / ".join(f"{res[k]['eval_loss']:.3f}" for k in ("jaxllm", "torch_eager", "torch_compile"))
    return [[f"{_device(r)}, mesh {r['config']['mesh']}", _fmt(res["jaxllm"]["tokens_per_s"]),
             _fmt(res["torch_eager"]["tokens_per_s"]), _fmt(res["torch_compile"]["tokens_per_s"]),
             f"{res['ratio_vs_eager']:.2f}x", f"{res['ratio_vs_compile']:.2f}x", f"{losses} ({res['steps']})",
             res["torch_version"], r.get("git_commit", "-"), r["date"]]]


def _posttrain(r):
    res, c = r["results"], r["config"]
    rows = f"{c['batch']}x2" if c["loss"] == "dpo" else str(c["batch"])
    chunked, plain = res["chunk_512"], res["chunk_0"]
    return [[c["loss"], f"{rows}x{c['seq']}", _device(r), f"{chunked['step_time_s'] * 1e3:.0f}",
             f"{plain['step_time_s'] * 1e3:.0f}", f"{res['speedup']:.2f}x", _mib(chunked["temp_bytes"]),
             _mib(plain["temp_bytes"]), _fmt(res["temp_ratio"], 2), r.get("git_commit", "-"), r["date"]]]


def _data(r):
    res, c = r["results"], r["config"]
    return [[r["name"], f"{c['batch']}x{c['seq']}", _fmt(res["tokens_per_s"]), _fmt(res.get("tiny_model_tokens_per_s")),
             f"{_fmt(res.get('headroom'), 1)}x", f"{res['build_s']:.2f}", f"{r['device_kind']} ({r['cpu_count']} cores)",
             r["date"]]]


def _data_scale(r):
    return [[row["corpus"], row["workers"], f"{row['peak_rss_tree_mb']:.0f} ({row['peak_rss_main_mb']:.0f})",
             f"{row['first_step_s']:.1f}", _fmt(row["pipeline_tokens_per_s"]), _fmt(row["model_tokens_per_s"]),
             f"{r['device_kind']} ({r['cpu_count']} cores)", r["date"]] for row in r["results"]["train"]]


def _data_prepare(r):
    return [[row["tool"], f"{row['size_bytes'] / 2**20:.0f} MiB", row["workers"], f"{row['wall_s']:.1f}",
             _fmt(row["docs_per_s"]), f"{row['mb_per_s']:.2f}", f"{row['peak_rss_sum_mb']:.0f}", _fmt(row["kept"]),
             f"{r['device_kind']} ({r['cpu_count']} cores)", r["date"]] for row in r["results"]["runs"]]


def _rollout(r):
    c = r["config"]
    return [[r["name"], row["batch"], f"{c['prompt_len']} + {c['new_tokens']}", _fmt(row["prefill_tokens_per_s"]),
             _fmt(row["decode_tokens_per_s"]), f"{row['decode_step_ms']:.2f}",
             f"{row['decode_bandwidth_fraction']:.1%} of {c['peak_bytes_per_s'] / 1e9:.0f} GB/s ({c['peak_source']})",
             _fmt(row["naive_recompute_tokens_per_s"]), f"{row['speedup_vs_naive']:.1f}x",
             f"{r['device_kind']} ({r['cpu_count']} cores)", r["date"]] for row in r["results"]["rows"]]


def _rollout_layout(r):
    split = r["results"].get("grpo_split", {})
    rows = [[f"sampling, batch {row['batch']}", _fmt(row["fsdp_tokens_per_s"]), _fmt(row["sampler_tokens_per_s"]),
             f"{row['speedup']:.2f}x", f"{r['device_count']} {r['device_kind']} devices ({r['cpu_count']} cores)",
             r["date"]] for row in r["results"]["rows"]]
    for layout, x in split.items():
        rows.append([f"GRPO step, sampling on the {layout} layout: sampling / scoring / training s per rollout",
                     f"{x['sampling_s']:.2f} / {x['scoring_s']:.2f} / {x['training_s']:.2f}",
                     f"{x['sampling_share']:.0%} / {x['scoring_share']:.0%} / {x['training_share']:.0%}", "",
                     f"{r['device_count']} {r['device_kind']} devices ({r['cpu_count']} cores)", r["date"]])
    return rows


def _checkpoint(r):
    res = r["results"]
    return [[f"{r['name']} params + AdamW state", f"{res['checkpoint_bytes'] / 1e6:.0f} MB", f"{res['save_s']:.3f}",
             f"{res['restore_s']:.3f}", f"{res['async_save_slowdown'] * 100:+.1f}% over {res['steps']} steps",
             f"{r['device_kind']} ({r['cpu_count']} cores)", r["date"]]]


def _plan(r):
    rows = []
    for row in r["results"]["rows"]:
        host = f"{row['host_gib']:.1f}" if row["host_gib"] else "-"
        flops = f"{row['xla_flops'] / row['model_flops']:.2f}" if row.get("xla_flops") else "-"
        rows.append([f"jaxllm {r.get('git_commit', '')}", row["model"], row["topology"], row["remat"], row["attention"],
                     row["per_chip"], f"{row['total_gib']:.1f}", f"{row['temp_gib']:.1f}", host,
                     "yes" if row["fits"] else "no", flops, f"{row['step_time_s']:.2f}" if row["step_time_s"] else "-",
                     f"jax {r['jax']}, libtpu {r['config']['libtpu']}", r["date"]])
    for m in r["config"].get("maxtext_8b_v5p8", []):
        rows.append([f"MaxText {r['config']['maxtext_version']}", "8b", "v5p-8", m["remat"], m["attention"],
                     f"max {m['max_per_chip']}", f"{m['gib_at_1']} (1/chip)" + (f", {m['gib_at_2']} (2/chip)" if m["gib_at_2"] else ""),
                     "-", "-", "-", "-", "-", "quoted (issue 19)", "-"])
    return rows


# suite -> (title, columns, record -> rows), in README order
SECTIONS = {
    "train": ("train", ["model", "params", "batch x seq", "mesh (d,f,t)", "device", "ms/step", "tokens/s",
                        "tokens/s/device", "formula/XLA FLOPs", "MFU", "date"], _train),
    "peer": ("peer (same model, data and machine, one run)",
             ["device", "jaxllm tok/s", "PyTorch eager tok/s", "torch.compile tok/s", "vs eager", "vs compile",
              "held-out loss jaxllm / eager / compile (same steps)", "torch", "jaxllm commit", "date"], _peer),
    "posttrain": ("posttrain (chunked log-prob head vs plain [B, T, V] logits)",
                  ["loss", "batch x seq", "device", "chunked ms/step", "plain ms/step", "speedup", "chunked temp MiB",
                   "plain temp MiB", "temp ratio", "commit", "date"], _posttrain),
    "data": ("data (input pipeline)", ["source", "batch x seq", "pipeline tokens/s", "tiny model consumes tokens/s",
                                       "headroom", "build s", "device", "date"], _data),
    "data_scale": ("data at scale (`jaxllm train` on large corpora: peak RSS of trainer + grain workers, trainer alone in brackets)",
                   ["corpus", "workers", "peak RSS MB", "first step s", "pipeline tok/s", "model tok/s", "device",
                    "date"], _data_scale),
    "data_prepare": ("data prepare (`jaxllm data prepare` on Apache Beam vs HF datatrove, same corpus, filters, MinHash and tokenizer)",
                     ["tool", "corpus", "workers", "wall s", "docs/s", "MB/s", "peak RSS MB (process tree)", "kept docs",
                      "device", "date"], _data_prepare),
    "rollout": ("rollout (KV-cache sampler, greedy, no early stop)",
                ["model", "batch", "prompt + new", "prefill tok/s", "decode tok/s", "decode ms/step",
                 "roofline fraction (decode)", "full recompute tok/s", "sampler speedup", "device", "date"], _rollout),
    "rollout_layout": ("rollout layout (`rl.sampler_mesh`: policy trained fsdp over every device, sampled fsdp vs replicated + batch over data; the reshard is timed with each rollout)",
                       ["what", "fsdp layout (tok/s)", "sampler layout (tok/s)", "speedup", "device", "date"],
                       _rollout_layout),
    "plan": ("plan (TPU ahead-of-time compiles of the real step: per-chip HBM, seq 8192, no grad accumulation)",
             ["system", "model", "topology", "remat", "attention", "seqs/chip", "total GiB/chip", "temp GiB",
              "pinned host GiB", "fits", "XLA/model FLOPs", "roofline s/step", "versions", "date"], _plan),
    "checkpoint": ("checkpoint (orbax)", ["state", "size", "save s (sync)", "restore s", "async save: loop slowdown",
                                          "device", "date"], _checkpoint),
}


def write_readme(records: list[dict]) -> str:
    lines = [HEADER]
    by_suite: dict = {}
    for r in records:
        by_suite.setdefault(r["suite"], []).append(r)
    for suite, (title, columns, rows_of) in SECTIONS.items():
        if suite in by_suite:
            lines += _section(title, columns, [row for r in by_suite[suite] for row in rows_of(r)])
    text = "\n".join(lines)
    with open(os.path.join(os.path.dirname(__file__), "README.md"), "w") as f:
        f.write(text)
    return text
