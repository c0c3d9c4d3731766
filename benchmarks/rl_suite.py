"""RL rollouts on several devices: sampling tokens/s with the policy in its training layout (fsdp:
every decode step all-gathers the weights) vs the sampler's own layout (`rl.sampler_mesh`:
weights replicated, batch split over data; one reshard per rollout, timed with it), and where a
GRPO step's time goes: sampling (generation + rewards), scoring (teacher-forced old/reference
log-probs, advantages) and training (the optimizer steps on the rollout).

Run through `python -m benchmarks.run rollout --devices 8` (the layouts need several devices).
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
from flax import nnx

from benchmarks.common import median, timed
from jaxllm.config import MeshConfig, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def layout_rows(model_kw: dict, batches, prompt_len: int, new: int, repeats: int, warmup: int) -> list:
    """Sampling tokens/s for each batch: fsdp over every device vs replicated + data-split."""
    from types import SimpleNamespace
    from jaxllm.core.arrays import host_to_global
    from jaxllm.core.model import Transformer
    from jaxllm.core.sampler import generate_ids
    from jaxllm.core.sharding import make_mesh, make_rules, state_shardings
    from jaxllm.rl.rollout import sampling_policy
    n = jax.device_count()
    cfg = ModelConfig(**{**model_kw, "max_seq_len": max(model_kw.get("max_seq_len", 256), prompt_len + new)})
    graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    rules = make_rules()
    train = make_mesh(MeshConfig(data=1, fsdp=n, tensor=1))
    params = jax.device_put(state, state_shardings(state, train, rules))
    ctx = SimpleNamespace(actor_critic=False, mesh=train, rules=rules,
                          sampler_mesh=make_mesh(MeshConfig(data=n, fsdp=1, tensor=1)))
    rows = []
    for b in batches:
        prompts = np.random.default_rng(b).integers(4, cfg.vocab_size, (b, prompt_len)).astype(np.int32)

        def fsdp():
            p = host_to_global(prompts, train, rules, process_local=False)
            return jax.block_until_ready(generate_ids(graphdef, params, p, new, eos_id=(), mesh=train, rules=rules).tokens)

        def sampler():  # the reshard is part of every rollout, so it is timed too
            g, st, mesh = sampling_policy(ctx, graphdef, params)
            p = host_to_global(prompts, mesh, rules, process_local=False)
            return jax.block_until_ready(generate_ids(g, st, p, new, eos_id=(), mesh=mesh, rules=rules).tokens)

        t_fsdp, t_sampler = (median(timed(f, repeats, warmup)) for f in (fsdp, sampler))
        rows.append({"batch": b, "fsdp_tokens_per_s": b * new / t_fsdp, "sampler_tokens_per_s": b * new / t_sampler,
                     "speedup": t_fsdp / t_sampler})
        print(f"rollout layout batch {b}: fsdp-{n} {rows[-1]['fsdp_tokens_per_s']:,.0f} tok/s, sampler "
              f"(replicated, data-{n}) {rows[-1]['sampler_tokens_per_s']:,.0f} tok/s = {rows[-1]['speedup']:.2f}x")
    return rows


def grpo_split(overrides: tuple, rollouts: int = 4) -> dict:
    """A GRPO run of the tiny config from random weights: per rollout after the first (compiles),
    seconds sampling / scoring / training and their shares."""
    from jaxllm.config import load_config
    from jaxllm.core.monitor import read_metrics
    from jaxllm.objectives import make_trainer
    out = tempfile.mkdtemp(prefix="jaxllm-bench-rl-")
    cfg = load_config(os.path.join(ROOT, "configs/runs/grpo_tiny.yaml"),
                      [f"output_dir={out}", "checkpoint.init_from=\"\"", "train.progress=false", "train.log_every=1",
                       "eval.every=0", "checkpoint.every=0", "checkpoint.async_save=false",
                       f"train.steps={2 * rollouts}", *overrides])
    make_trainer(cfg).run()
    metrics = read_metrics(out)
    roll = [m for m in metrics if "rollout_time_s" in m]
    step_s = {m["step"]: m["step_time_s"] for m in metrics if "step_time_s" in m}
    per = cfg.rl.minibatches * cfg.rl.epochs
    # step_time_s is wall time between two steps' metrics: rollout i (i >= 1; rollout 0 compiles)
    # runs in the interval of step i*per, so intervals per .. R*per-1 hold rollouts 1..R-1 and
    # their (R-1)*per optimizer steps.
    window = sum(step_s[s] for s in range(per, rollouts * per))
    sampling = sum(r["sample_time_s"] for r in roll[1:])
    scoring = sum(r["rollout_time_s"] - r["sample_time_s"] for r in roll[1:])
    n = len(roll) - 1
    mean = {"sampling_s": sampling / n, "scoring_s": scoring / n, "training_s": (window - sampling - scoring) / n}
    total = sum(mean.values())
    return {**mean, **{k.replace("_s", "_share"): v / total for k, v in mean.items()},
            "sequences_per_rollout": cfg.train.batch_size * cfg.rl.minibatches, "max_new_tokens": cfg.rl.max_new_tokens,
            "optimizer_steps_per_rollout": per}
