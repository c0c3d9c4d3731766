"""Benchmark entry point: `python -m benchmarks.run SUITE [--smoke] [--devices N] [--mesh d,f,t]`.

Suites: train (step time, tokens/s/device, MFU; FLOPs by formula cross-checked with XLA's cost
analysis), data (input-pipeline tokens/s vs the tiny model's consumption), checkpoint (save,
restore, async-save slowdown), posttrain (DPO/GRPO/PPO steps, chunked log-prob head vs plain
logits: time and temporary memory), peer (jaxllm vs nanoGPT-style PyTorch eager and torch.compile on
the same model, data, batch and machine, in one run), table (rewrite benchmarks/README.md).
Each suite writes a JSON record to benchmarks/results/ (not with --smoke, which CI runs).
"""

from __future__ import annotations

import argparse
import os
import sys


def _early_devices(argv):
    if "--devices" in argv:
        n = argv[argv.index("--devices") + 1]
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    if "plan" in argv[1:2]:  # compiles for compile-only TPU devices: JAX itself stays on the CPU
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


_early_devices(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import load_records, median, timed, write_record  # noqa: E402
from jaxllm.config import MeshConfig, ModelConfig, ObjectiveConfig, OptimizerConfig  # noqa: E402

PEER_MODEL = dict(vocab_size=32000, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64,
                  mlp_dim=1024, max_seq_len=256, tie_embeddings=False)
TINY_MODEL = dict(vocab_size=1024, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=384,
                  max_seq_len=256)


class Harness:
    """A jaxllm train step for a model config on a mesh, fed with fixed batches. The step is the
    trainer's own (jaxllm.train.step.build_step), for the objective `loss`."""

    def __init__(self, model_kw: dict, mesh: MeshConfig, opt: OptimizerConfig, total_steps: int = 1000,
                 loss: str = "causal_lm", extras: dict | None = None):
        from flax import nnx

        from jaxllm.config import RunConfig, TrainConfig
        from jaxllm.core.sharding import make_mesh, make_rules
        from jaxllm.objectives import REGISTRY, model_class
        self.model_cfg = ModelConfig(**model_kw)
        self.mesh, self.rules = make_mesh(mesh), make_rules()
        self.loss, self.extras = loss, extras or {}
        self.cfg = RunConfig(model=self.model_cfg, mesh=mesh, optimizer=opt, objective=ObjectiveConfig(name=loss),
                             train=TrainConfig(steps=total_steps))
        cls = model_class(loss)
        self.make_model = lambda r: cls(self.model_cfg, r)
        self.loss_fn = REGISTRY.pick(loss).loss
        parts = self.build(self.cfg.objective)
        self.state = parts.init(self.make_model, nnx.Param, seed=0)
        self.graphdef, self.step_fn, self.eval_fn = parts.graphdef, parts.train_step, parts.eval_step

    def build(self, objective):
        from jaxllm.train.step import build_step
        return build_step(self.cfg, self.make_model, self.loss_fn, self.mesh, self.rules, extras=self.extras,
                          objective_cfg=objective)

    def put(self, batch, accum=1):
        from jaxllm.core.arrays import to_global
        return to_global(batch, self.mesh, self.rules, accum)

    def step(self, batch):
        self.state, m = self.step_fn(self.state, batch, None)
        return m

    def xla_flops(self, batch) -> float:
        """XLA's cost analysis of this step, lowered with the fused LM head as one chunk: cost
        analysis counts a loop body once (jaxllm.app.plan.one_chunk_head)."""
        from jaxllm.app.plan import one_chunk_head
        step_fn = self.build(one_chunk_head(self.cfg.objective)).train_step
        compiled = step_fn.lower(self.state, batch, None).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        # SPMD programs report per-device FLOPs
        return float(cost.get("flops", 0.0)) * jax.device_count() if cost else 0.0

    def eval_loss(self, batches) -> float:
        from jaxllm.train.step import evaluate
        return evaluate(self.eval_fn, self.state, batches)["eval_loss"]


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)), "loss_mask": np.ones((batch, seq), np.int32)}


def corpus_batches(seq: int, batch: int, n_train: int, n_eval: int):
    from jaxllm.config import DataConfig, SourceConfig
    from jaxllm.data.pipeline import build_pipeline
    from jaxllm.data.tokenizer import Tokenizer
    p = build_pipeline(DataConfig(sources=[SourceConfig(kind="default")], eval_fraction=0.1), Tokenizer(),
                       seq, batch, seed=0, eval_batches=n_eval)
    it = p.iterator()
    return [next(it) for _ in range(n_train)], p.eval_batches


def _mesh_from(args) -> MeshConfig:
    d, f, t = (int(x) for x in args.mesh.split(","))
    return MeshConfig(data=d, fsdp=f, tensor=t)


# ---- suites -----------------------------------------------------------------------------------
def suite_train(args):
    from jaxllm.core.model import flops_per_token, param_count
    from jaxllm.core.monitor import peak_flops_per_device
    shapes = {"tiny": (TINY_MODEL, 16, 128), "peer-20m": (PEER_MODEL, 8, 256)}
    if args.model:
        import yaml
        with open(args.model) as f:
            shapes = {os.path.basename(args.model): (yaml.safe_load(f), args.batch, args.seq)}
    if args.smoke:
        shapes = {"tiny": (dict(TINY_MODEL, n_layers=1), 8, 32)}
    rows = []
    for name, (model_kw, batch, seq) in shapes.items():
        h = Harness(model_kw, _mesh_from(args), OptimizerConfig(lr=1e-3))
        b = h.put(random_batch(batch, seq, h.model_cfg.vocab_size), args.accum)
        xla = h.xla_flops(b)
        times = timed(lambda: jax.block_until_ready(h.step(b)["loss"]), args.repeats, args.warmup)
        dt = median(times)
        tokens = batch * seq
        fpt = flops_per_token(h.model_cfg, seq)
        peak = peak_flops_per_device()
        n = jax.device_count()
        res = {"step_time_s": dt, "tokens_per_s": tokens / dt, "tokens_per_s_per_device": tokens / dt / n,
               "params": param_count(h.model_cfg), "flops_per_step_formula": fpt * tokens,
               "flops_per_step_xla": xla, "formula_over_xla": (fpt * tokens / xla) if xla else None,
               "mfu": (fpt * tokens / dt / (peak * n)) if peak else None, "times": times}
        rows.append((name, res))
        write_record("train", name, {"model": model_kw, "batch": batch, "seq": seq, "mesh": args.mesh,
                                     "accum": args.accum}, res, args.smoke)
        print(f"train {name}: {dt * 1e3:.1f} ms/step, {tokens / dt:,.0f} tok/s, formula/xla flops "
              f"{res['formula_over_xla'] or 0:.3f}, mfu {res['mfu']}")
    return rows


def suite_data(args):
    """--smoke: the pipeline alone on the embedded corpus. Full: corpora of ~200 MB and ~2 GB
    (generated into --workdir, not committed), raw JSONL and prepared ArrayRecord shards: peak RSS
    of `jaxllm train`, time to the first step, pipeline tokens/s with 1 and 2 workers vs the
    model's consumption (benchmarks/data_train.py); then `data prepare` vs datatrove
    (benchmarks/data_suite.py)."""
    import time
    from jaxllm.config import DataConfig, SourceConfig
    from jaxllm.data.pipeline import build_pipeline
    from jaxllm.data.tokenizer import Tokenizer
    if args.smoke:
        batch, seq, n = 8, 32, 5
        t0 = time.perf_counter()
        p = build_pipeline(DataConfig(sources=[SourceConfig(kind="default")], eval_fraction=0.1), Tokenizer(),
                           seq, batch, seed=0, eval_batches=1)
        it = p.iterator()
        next(it)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        res = {"build_s": build_s, "tokens_per_s": n * batch * seq / (time.perf_counter() - t0)}
        it.close()
        write_record("data", "default-corpus", {"batch": batch, "seq": seq}, res, args.smoke)
        print(f"data: pipeline {res['tokens_per_s']:,.0f} tok/s (build {build_s:.2f}s)")
        return
    import subprocess
    from benchmarks import data_suite, data_train
    sizes = {"200MB": 200 << 20, "2GB": 2 << 30}
    workdir = args.workdir
    os.makedirs(workdir, exist_ok=True)
    corpora = {}
    for label, n in sizes.items():
        jsonl = data_train.generate_jsonl(os.path.join(workdir, f"train-{label}.jsonl"), n, seed=0)
        prepared = os.path.join(workdir, f"prepared-{label}")
        if not os.path.exists(os.path.join(prepared, "prepared.json")):
            subprocess.run([sys.executable, "-m", "jaxllm.app.cli", "data", "prepare", "configs/runs/pretrain_tiny.yaml",
                            f"data.sources=[{{kind: jsonl, path: '{jsonl}'}}]", "--out", prepared, "--workers", "2",
                            "--shards", "16"], check=True)
        corpora[f"jsonl-{label}"] = f"{{kind: jsonl, path: '{jsonl}'}}"
        corpora[f"arrayrecord-{label}"] = f"{{kind: arrayrecord, path: '{prepared}'}}"
    rows = data_train.train_suite(corpora, [1, 2], steps=args.steps or 30)
    res = {"train": rows}
    if not args.skip_prepare:
        res["prepare"] = data_suite.prepare_suite(list(sizes.values()), [1, 2], workdir)
    write_record("data_scale", "train-input", {"sizes": sizes, "model": "tiny (pretrain_tiny.yaml)",
                                                      "batch": 16, "seq": 128}, res, False)


def suite_checkpoint(args):
    import shutil
    import tempfile
    import time
    from jaxllm.core.checkpoint import Checkpointer
    model_kw = dict(TINY_MODEL, n_layers=1) if args.smoke else PEER_MODEL
    batch, seq = (8, 32) if args.smoke else (8, 256)
    h = Harness(model_kw, _mesh_from(args), OptimizerConfig(lr=1e-3))
    b = h.put(random_batch(batch, seq, h.model_cfg.vocab_size))
    jax.block_until_ready(h.step(b)["loss"])
    tmp = tempfile.mkdtemp()
    n_steps = 3 if args.smoke else 10
    try:
        def state_parts():
            s = h.state
            return s.params, {"step": s.step, "rest": s.rest, "opt_state": s.opt_state, "skipped": s.skipped}
        sync = Checkpointer(os.path.join(tmp, "sync"), keep=100, async_save=False)
        save_times = []
        for i in range(3):
            t0 = time.perf_counter()
            sync.save(i + 1, *state_parts(), {"next_index": 0}, {})
            sync.wait()
            save_times.append(time.perf_counter() - t0)
        p, ts = state_parts()
        target_p = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), p)
        target_t = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), ts)
        restore_times = timed(lambda: jax.block_until_ready(sync.restore(3, target_p, target_t)["params"]), 3, 0)
        sync.close()

        def run_steps(save_first: bool, ck):
            t0 = time.perf_counter()
            if save_first:
                ck.save(100, *state_parts(), {"next_index": 0}, {})
            for _ in range(n_steps):
                m = h.step(b)
            jax.block_until_ready(m["loss"])
            out = time.perf_counter() - t0
            ck.wait()
            return out
        ck = Checkpointer(os.path.join(tmp, "async"), keep=100, async_save=True)
        base = median([run_steps(False, ck) for _ in range(3)])
        with_save = run_steps(True, ck)
        ck.close()
        size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(tmp, "sync", "3")) for f in fs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"save_s": median(save_times), "restore_s": median(restore_times), "checkpoint_bytes": size,
           "steps": n_steps, "loop_s_without_save": base, "loop_s_with_async_save": with_save,
           "async_save_slowdown": with_save / base - 1.0}
    write_record("checkpoint", "peer-20m" if not args.smoke else "smoke", {"model": model_kw}, res, args.smoke)
    print(f"checkpoint: save {res['save_s']:.3f}s restore {res['restore_s']:.3f}s ({size / 1e6:.1f} MB), "
          f"async save slows {n_steps} steps by {res['async_save_slowdown'] * 100:.1f}%")


def suite_peer(args):
    """jaxllm vs PyTorch (eager, torch.compile): same model, data, batch, optimizer, machine."""
    import time
    import torch
    from benchmarks.peer_torch import Llama, make_optimizer
    model_kw = dict(PEER_MODEL, n_layers=1, vocab_size=2048) if args.smoke else PEER_MODEL
    batch, seq = (4, 64) if args.smoke else (8, 256)
    warmup, timed_steps = (1, 2) if args.smoke else (3, args.repeats)
    opt = OptimizerConfig(lr=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.1, grad_clip=1.0)
    train_b, eval_b = corpus_batches(seq, batch, warmup + timed_steps, 2 if args.smoke else 8)
    results = {}

    h = Harness(model_kw, _mesh_from(args), opt)
    jb = [h.put(b) for b in train_b]
    jeval = [h.put(b) for b in eval_b]
    ts = []
    for i, b in enumerate(jb):
        t0 = time.perf_counter()
        jax.block_until_ready(h.step(b)["loss"])
        ts.append(time.perf_counter() - t0)
    results["jaxllm"] = {"tokens_per_s": batch * seq / median(ts[warmup:]), "eval_loss": h.eval_loss(jeval),
                         "times": ts}

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    for mode in ("eager", "compile"):
        model = Llama(ModelConfig(**model_kw))
        optim = make_optimizer(model, opt)
        fwd = torch.compile(model) if mode == "compile" else model
        ts = []
        for b in train_b:
            x, y = torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long()
            t0 = time.perf_counter()
            loss = fwd(x, y)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
            optim.step()
            ts.append(time.perf_counter() - t0)
        with torch.no_grad():
            losses = []
            for b in eval_b:
                logits = model(torch.from_numpy(b["inputs"]).long())
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                        torch.from_numpy(b["targets"]).long().reshape(-1), reduction="none")
                m = torch.from_numpy(b["loss_mask"]).reshape(-1).float()
                losses.append(((nll * m).sum() / m.sum()).item())
        results[f"torch_{mode}"] = {"tokens_per_s": batch * seq / median(ts[warmup:]),
                                    "eval_loss": float(np.mean(losses)), "times": ts}
    results["ratio_vs_eager"] = results["jaxllm"]["tokens_per_s"] / results["torch_eager"]["tokens_per_s"]
    results["ratio_vs_compile"] = results["jaxllm"]["tokens_per_s"] / results["torch_compile"]["tokens_per_s"]
    results["torch_version"] = torch.__version__
    results["steps"] = len(train_b)
    write_record("peer", "llama-20m", {"model": model_kw, "batch": batch, "seq": seq, "mesh": args.mesh,
                                       "optimizer": vars(opt)}, results, args.smoke)
    for k in ("jaxllm", "torch_eager", "torch_compile"):
        print(f"peer {k}: {results[k]['tokens_per_s']:,.0f} tok/s, eval loss after {len(train_b)} steps "
              f"{results[k]['eval_loss']:.3f}")
    print(f"peer ratio: {results['ratio_vs_eager']:.2f}x eager, {results['ratio_vs_compile']:.2f}x torch.compile")


def posttrain_batch(loss: str, batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """A DPO batch ([batch, 2, seq], reference log-probs precomputed into it, as with
    objective.precompute_ref) or a GRPO/PPO rollout batch ([batch, seq], 3/4 of each row completion)."""
    rng = np.random.default_rng(seed)
    lead = (batch, 2) if loss == "dpo" else (batch,)
    toks = rng.integers(0, vocab, (*lead, seq + 1), dtype=np.int32)
    mask = np.zeros((*lead, seq), np.int32)
    mask[..., seq // 4:] = 1
    out = {"inputs": toks[..., :-1], "targets": toks[..., 1:], "segment_ids": np.ones((*lead, seq), np.int32),
           "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (*lead, seq)).copy(), "loss_mask": mask}
    if loss == "dpo":
        out["ref_logps"] = (rng.standard_normal(lead) - 2000.0).astype(np.float32)
    else:
        noise = lambda: (rng.standard_normal((batch, seq)) * 0.1).astype(np.float32)
        out.update(old_logps=noise() - 10.4, ref_logps=noise() - 10.4, advantages=noise() * 10 * mask,
                   old_values=noise(), returns=noise())
    return out


def suite_posttrain(args):
    """DPO / GRPO / PPO train steps with the chunked log-prob head (objective.xent_chunk_tokens=512)
    vs the plain [B, T, V] logits path (0): step time and XLA's temporary memory of the compiled step."""
    import dataclasses
    from jaxllm.config import RLConfig
    model_kw = dict(PEER_MODEL, n_layers=1, vocab_size=2048) if args.smoke else PEER_MODEL
    seq = 64 if args.smoke else 256
    losses = {"dpo": 4, "grpo": 8, "ppo": 8}  # batch rows: DPO 4 pairs = 8 sequences, like the others
    for loss, batch in losses.items():
        h = Harness(model_kw, _mesh_from(args), OptimizerConfig(lr=1e-6), loss=loss, extras={"rl": RLConfig()})
        b = h.put(posttrain_batch(loss, batch, seq, h.model_cfg.vocab_size))
        res = {}
        for chunk in (512, 0):
            compiled = h.build(dataclasses.replace(ObjectiveConfig(name=loss), xent_chunk_tokens=chunk)).train_step \
                .lower(h.state, b, None).compile()
            h.step_fn, mem = compiled, compiled.memory_analysis()  # timed: this same executable
            times = timed(lambda: jax.block_until_ready(h.step(b)["loss"]), args.repeats, args.warmup)
            res[f"chunk_{chunk}"] = {"step_time_s": median(times), "times": times,
                                     "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)) if mem else None}
        res["speedup"] = res["chunk_0"]["step_time_s"] / res["chunk_512"]["step_time_s"]
        t0, t1 = res["chunk_0"]["temp_bytes"], res["chunk_512"]["temp_bytes"]
        res["temp_ratio"] = t1 / t0 if t0 and t1 else None
        write_record("posttrain", f"{loss}-{'smoke' if args.smoke else 'peer-20m'}",
                     {"model": model_kw, "loss": loss, "batch": batch, "seq": seq, "mesh": args.mesh}, res, args.smoke)
        print(f"posttrain {loss}: chunked {res['chunk_512']['step_time_s'] * 1e3:.0f} ms/step, "
              f"{(t1 or 0) / 2**20:.0f} MiB temporaries; plain {res['chunk_0']['step_time_s'] * 1e3:.0f} ms/step, "
              f"{(t0 or 0) / 2**20:.0f} MiB")


def _host_copy_bandwidth() -> float:
    """Bytes/s of a large host memory copy (read + write): the CPU's practical bandwidth roof."""
    import numpy as np
    a = np.ones(64 * 2 ** 20 // 8 * 4)  # 256 MB
    b = np.empty_like(a)
    times = timed(lambda: np.copyto(b, a), 5, 1)
    return 2 * a.nbytes / median(times)


PEAK_HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "TPU v5p": 2.76e12, "TPU v5 lite": 8.19e11}


def suite_rollout(args):
    """KV-cache sampler: prefill and decode tokens/s by batch size, vs full recomputation, and the
    fraction of the memory-bandwidth roofline reached in decode (weights + KV cache read per step)."""
    import numpy as np
    from flax import nnx
    from jaxllm.config import ModelConfig
    from jaxllm.app.inference import _sample
    from jaxllm.core.model import Transformer, param_count
    from jaxllm.core.sampler import generate_ids
    shapes = {"tiny": TINY_MODEL, "peer-20m": PEER_MODEL}
    prompt_len, new, batches = (64, 64, (1, 8, 32))
    if args.smoke:
        shapes, prompt_len, new, batches = {"tiny": dict(TINY_MODEL, n_layers=1)}, 8, 4, (2,)
    if jax.device_count() > 1:  # --devices N: the sampler's own layout vs the training layout instead
        return _rollout_layout(args, shapes["tiny"], prompt_len, new)
    dev = jax.devices()[0]
    peak_bw = next((v for k, v in PEAK_HBM_BYTES_PER_S.items() if k.lower() in dev.device_kind.lower()), None)
    bw_source = "spec sheet"
    if peak_bw is None:
        peak_bw, bw_source = _host_copy_bandwidth(), "measured host copy"
    for name, kw in shapes.items():
        cfg = ModelConfig(**{**kw, "max_seq_len": max(kw.get("max_seq_len", 256), prompt_len + new)})
        model = Transformer(cfg, nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        rows = []
        for b in batches:
            prompts = np.random.default_rng(b).integers(4, cfg.vocab_size, (b, prompt_len)).astype(np.int32)

            def run(n):
                out = generate_ids(graphdef, state, prompts, n, eos_id=())  # never stop
                return jax.block_until_ready(out.tokens)

            t_prefill = median(timed(lambda: run(1), args.repeats, args.warmup))
            t_full = median(timed(lambda: run(new), args.repeats, args.warmup))
            decode_step = (t_full - t_prefill) / (new - 1)
            buf = jnp.asarray(np.concatenate([prompts, np.zeros((b, new), np.int32)], 1))
            naive = lambda: jax.block_until_ready(_sample(graphdef, state, buf, jax.random.key(0), jnp.float32(0), new))
            t_naive = median(timed(naive, max(2, args.repeats // 3), 1))
            kv_bytes = 2 * cfg.n_layers * b * (prompt_len + new / 2) * cfg.n_kv_heads * cfg.head_dim * 4
            step_bytes = param_count(cfg) * 4 + kv_bytes  # every weight and the (average) cache, read once
            res = {"batch": b, "prefill_tokens_per_s": b * prompt_len / t_prefill,
                   "decode_tokens_per_s": b / decode_step, "decode_step_ms": decode_step * 1e3,
                   "generate_tokens_per_s": b * new / t_full, "naive_recompute_tokens_per_s": b * new / t_naive,
                   "speedup_vs_naive": t_naive / t_full, "decode_bytes_per_step": step_bytes,
                   "decode_bandwidth_fraction": step_bytes / decode_step / peak_bw}
            rows.append(res)
            print(f"rollout {name} batch {b}: prefill {res['prefill_tokens_per_s']:,.0f} tok/s, decode "
                  f"{res['decode_tokens_per_s']:,.0f} tok/s ({res['decode_bandwidth_fraction']:.1%} of roofline), "
                  f"{res['speedup_vs_naive']:.1f}x vs recompute")
        write_record("rollout", name, {"model": kw, "prompt_len": prompt_len, "new_tokens": new,
                                       "peak_bytes_per_s": peak_bw, "peak_source": bw_source}, {"rows": rows},
                     args.smoke)


def _rollout_layout(args, model: dict, prompt_len: int, new: int):
    """Sampling on the training layout (fsdp) vs rl.sampler_mesh's; a GRPO step's time split."""
    from benchmarks import rl_suite
    batches = (2 * jax.device_count(),) if args.smoke else (8, 32, 64)
    rows = rl_suite.layout_rows(model, batches, prompt_len, new, args.repeats, args.warmup)
    split = {} if args.smoke else {
        layout: rl_suite.grpo_split(ov) for layout, ov in
        (("fsdp", ()), ("sampler", ("rl.sampler_mesh={data: -1, fsdp: 1}",)))}
    for layout, r in split.items():
        print(f"grpo step ({layout} sampling): sampling {r['sampling_s']:.2f} s, scoring {r['scoring_s']:.2f} s, "
              f"training {r['training_s']:.2f} s per rollout")
    write_record("rollout_layout", f"tiny-{jax.device_count()}dev",
                 {"model": model, "prompt_len": prompt_len, "new_tokens": new, "train_mesh": "fsdp",
                  "sampler_mesh": "data (replicated weights)"}, {"rows": rows, "grpo_split": split}, args.smoke)


def suite_table(args):
    from benchmarks.table import write_readme
    print(write_readme(load_records()))


def suite_plan(args):
    from benchmarks.plan_suite import suite_plan as run
    run(args, write_record)


SUITES = {"train": suite_train, "data": suite_data, "checkpoint": suite_checkpoint, "peer": suite_peer,
          "rollout": suite_rollout, "posttrain": suite_posttrain, "table": suite_table, "plan": suite_plan}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run")
    p.add_argument("suite", choices=sorted(SUITES) + ["all"])
    p.add_argument("--smoke", action="store_true", help="seconds-long version for CI; records nothing")
    p.add_argument("--devices", type=int, help="simulated CPU devices")
    p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--model", help="model YAML for the train suite (with --batch/--seq)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--models", default="8b,70b", help="plan suite: which of 8b,70b to compile")
    p.add_argument("--workdir", default="/tmp/jaxllm-bench-data", help="data suite: where generated corpora and shards go")
    p.add_argument("--steps", type=int, default=0, help="data suite: training steps per run (0 = 30)")
    p.add_argument("--skip-prepare", action="store_true", help="data suite: only the training-input half")
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats, args.warmup = 2, 1
    for name in (["train", "data", "checkpoint", "rollout", "posttrain", "peer"] if args.suite == "all"
                 else [args.suite]):
        SUITES[name](args)


if __name__ == "__main__":
    main()
