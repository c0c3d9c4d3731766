"""On-policy RL (PPO, GRPO) as a data source for the one train loop.

The loop asks its batch source, here `ExperienceIterator.next(state)`, for each batch. At a rollout boundary it
samples completions with the current policy (KV-cache sampler, same mesh), scores them (rewards,
reference and old log-probs, PPO values), computes advantages and cuts the rollout into
`rl.minibatches` shuffled mini-batches for each of `rl.epochs` epochs. The train step itself is
the generic one with the `ppo` or `grpo` loss. Checkpoints fall on rollout boundaries, so the
iterator state is just the prompt iterator's state plus the KL controller's coefficient.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import MeshConfig, RLConfig, RunConfig
from jaxllm.core.arrays import host_to_global, positions_from_segments
from jaxllm.core.model import ActorCritic
from jaxllm.core.sampler import generate_ids
from jaxllm.core.sharding import make_mesh, state_shardings, use_mesh_rules
from jaxllm.core.xent import lm_token_logps
from jaxllm.data.pipeline import packing_on
from jaxllm.errors import ConfigError
from jaxllm.rl.algorithms import ADVANTAGES, Scored, kl_penalty, live_groups, rollout_options, tis_weights
from jaxllm.rl.packing import pack_rollout, padding_fraction
from jaxllm.rl.rewards import Rewards


def policy_of(graphdef, state, actor_critic: bool):
    """(graphdef, merged state) of the LM that samples: the whole model or its `actor`."""
    model = nnx.merge(graphdef, state)
    return nnx.split(model.actor if actor_critic else model)


class KLController:
    """Fixed, or adaptive (Ziegler et al. 2019): coef *= 1 + clip(KL/target - 1, ±0.2) * n/horizon."""

    def __init__(self, rl: RLConfig, coef: Optional[float] = None):
        self.rl, self.coef = rl, rl.kl_coef if coef is None else coef

    def update(self, measured_kl: float, n_sequences: int) -> None:
        if self.rl.target_kl > 0:
            err = float(np.clip(measured_kl / self.rl.target_kl - 1.0, -0.2, 0.2))
            self.coef *= 1.0 + err * n_sequences / self.rl.kl_horizon


# ---- building a training batch from prompts + completions -----------------------------------
def layout(prompts: np.ndarray, prompt_mask: np.ndarray, tokens: np.ndarray, mask: np.ndarray,
           pad_id: int) -> dict:
    """Left-padded prompts [N, P] (prompt_mask 1 on real tokens) + completions [N, M] (mask 1 on
    generated tokens) -> the teacher-forcing arrays [N, P+M-1]; loss_mask is 1 where the target is a
    generated token. The masks alone decide what is real: pad_id only fills the other slots."""
    full = np.concatenate([prompts, np.where(mask > 0, tokens, pad_id)], axis=1)
    real = np.concatenate([prompt_mask > 0, mask > 0], axis=1)
    seg = real.astype(np.int32)
    pos = positions_from_segments(seg)
    P = prompts.shape[1]
    loss_mask = np.zeros_like(seg)
    loss_mask[:, P:] = mask
    return {"inputs": full[:, :-1].astype(np.int32), "targets": full[:, 1:].astype(np.int32),
            "positions": pos[:, :-1], "segment_ids": seg[:, :-1], "loss_mask": loss_mask[:, 1:]}


def _global(x: np.ndarray, ctx: "RLContext", leading: int = 0, mesh=None):
    """Identical host array on every process -> global array sharded over the batch axis (of the
    training mesh, or `mesh`)."""
    return host_to_global(x, ctx.mesh if mesh is None else mesh, ctx.rules, leading, process_local=False)


def sampling_policy(ctx: "RLContext", graphdef, params) -> tuple:
    """(graphdef, state, mesh) the sampler runs with: the policy in rl.sampler_mesh's layout (one
    reshard per rollout: no weight all-gathers inside the decode loop), or the training layout."""
    pol_graphdef, pol_state = policy_of(graphdef, params, ctx.actor_critic)
    if ctx.sampler_mesh is None:
        return pol_graphdef, pol_state, ctx.mesh
    return pol_graphdef, jax.device_put(pol_state, state_shardings(pol_state, ctx.sampler_mesh, ctx.rules)), ctx.sampler_mesh


def _host(x) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


@partial(jax.jit, static_argnames=("temperature", "chunk_tokens"))
def _teacher_forced(graphdef, state, batch, temperature: float = 1.0, chunk_tokens: int = 512):
    """Token log-probs at the sampling temperature (+ values for an actor-critic) at every target."""
    model = nnx.merge(graphdef, state)
    values = None
    if isinstance(model, ActorCritic):
        model, values = model.actor, model.critic.scores(batch["inputs"], batch["positions"], batch["segment_ids"])
    logps, _ = lm_token_logps(model, batch, temperature, chunk_tokens)
    return logps, values


def _score_rollout(ctx: "RLContext", params, reference, dev: dict, scores, sampler_logps, kl_coef) -> tuple[dict, dict]:
    """A rollout's math, compiled as one function per run (`jax.jit(partial(_score_rollout, ctx))`;
    rewards are computed before, on the host): trainer and reference log-probs (and values), the
    per-token KL, TIS weights and the advantage estimator's outputs -> (arrays for the train step,
    scalar metrics)."""
    rl, chunk = ctx.cfg.rl, ctx.cfg.objective.xent_chunk_tokens
    old_logps, values = _teacher_forced(ctx.graphdef, params, dev, rl.temperature, chunk)
    ref_logps, _ = _teacher_forced(ctx.ref_graphdef, reference, dev, rl.temperature, chunk)
    m = dev["loss_mask"].astype(jnp.float32)
    tok_kl = kl_penalty(old_logps, ref_logps, rl.kl_estimator) * m
    if rl.kl_clamp:
        tok_kl = jnp.clip(tok_kl, -rl.kl_clamp, rl.kl_clamp)
    out = {"old_logps": old_logps.astype(jnp.float32), "ref_logps": ref_logps.astype(jnp.float32)}
    metrics = {"kl": (kl_penalty(old_logps, ref_logps, "k1") * m).sum(1).mean()}
    if rl.tis_cap:  # trainer vs sampler log-probs of the sampled tokens, weight capped
        out["tis_weight"] = w = tis_weights(old_logps, sampler_logps, m, rl.tis_cap)
        n = jnp.maximum(m.sum(), 1.0)
        metrics.update(tis_weight=w.sum() / n, sampler_logp_gap=(jnp.abs(old_logps - sampler_logps) * m).sum() / n,
                       tis_capped_fraction=((w >= rl.tis_cap) * m).sum() / n)  # gap ~1e-6 on-policy: numerics only
    estimator = ADVANTAGES.pick(ctx.advantage)
    updates, adv_metrics = estimator(Scored(scores=scores, loss_mask=dev["loss_mask"], token_kl=tok_kl, kl_coef=kl_coef,
                                            group_size=rl.group_size, values=values), rl)
    return {**out, **updates}, {**metrics, **adv_metrics}


def stop_ids(tok) -> set:
    """Ids that end a completion (prompts come from the chat format, so its end-of-turn ids)."""
    return set(tok.chat.stop_ids)


@dataclasses.dataclass
class RLContext:
    """What rollouts need besides the train state; built by `experience_source`."""
    cfg: RunConfig
    graphdef: nnx.GraphDef  # the trained model's (Transformer, or ActorCritic for PPO)
    reference: nnx.State  # frozen policy weights
    ref_graphdef: nnx.GraphDef
    mesh: object
    rules: dict
    tokenizer: object
    rewards: object  # rewards.Rewards
    actor_critic: bool
    advantage: str  # a key of algorithms.ADVANTAGES
    sampler_mesh: object = None  # rl.sampler_mesh's Mesh (same devices), None = sample on `mesh`
    packed: bool = False  # data.packing=first_fit: mini-batches packed (jaxllm.rl.packing)


class ExperienceIterator:
    """The batch source of RL objectives: rollouts of the policy, scored, cut into mini-batches.
    State for checkpoints: the prompt iterator's, the rollout count, the KL coef.

    rl.off_policy_steps=1: at each rollout boundary the next rollout starts sampling (a background
    thread, with a copy of the current weights) while this one trains, so rollout k+1 comes from
    the weights of before rollout k's updates; it is scored (old log-probs) with the weights it
    trains on, and rl.tis_cap weighs each token by min(pi_trainer / pi_sampler, cap). The sample in
    flight is not checkpointed: the saved prompt state is the one before it, so a resumed run
    samples that rollout again with the restored weights (one on-policy rollout)."""

    def __init__(self, ctx: RLContext, prompt_iter, data_state: Optional[dict]):
        self.ctx, self.prompts = ctx, prompt_iter
        rl = ctx.cfg.rl
        self._score = jax.jit(partial(_score_rollout, ctx))  # the rollout's math: one compiled function
        self.rollouts = 0
        coef = None
        if data_state is not None:
            self.prompts.set_state(data_state["prompts"])
            self.rollouts, coef = data_state["rollouts"], data_state["kl_coef"]
        self.kl = KLController(rl, coef)
        self.queue: list = []
        self.metrics: dict = {}
        self.pending, self.prompts_before_pending, self._pool = None, None, None

    def get_state(self) -> dict:
        prompts = self.prompts_before_pending if self.pending is not None else self.prompts.get_state()
        return {"prompts": prompts, "rollouts": self.rollouts, "kl_coef": self.kl.coef}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self.pending = None, None

    def _key(self, rollout: int):
        return jax.random.fold_in(jax.random.key(self.ctx.cfg.seed + 7), rollout)

    def _sampled(self, params) -> tuple[dict, int, int]:
        """(sequences, sampling rounds, policy lag in rollouts) of the rollout to train on now."""
        ctx = self.ctx
        if not ctx.cfg.rl.off_policy_steps:
            return (*self._sample_groups(sampling_policy(ctx, ctx.graphdef, params), self._key(self.rollouts)), 0)
        if self.pending is None:  # the first rollout (of this process): nothing in flight yet
            roll, rounds, lag = *self._sample_groups(sampling_policy(ctx, ctx.graphdef, params), self._key(self.rollouts)), 0
        else:
            (roll, rounds), lag = self.pending.result(), 1
        graphdef, state, mesh = sampling_policy(ctx, ctx.graphdef, params)
        state = jax.tree.map(jnp.copy, state)  # its own buffers: the train step donates the live ones
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxllm-rollout")
        self.prompts_before_pending = self.prompts.get_state()
        self.pending = self._pool.submit(self._sample_groups, (graphdef, state, mesh), self._key(self.rollouts + 1))
        return roll, rounds, lag

    def pop_metrics(self) -> dict:
        m, self.metrics = self.metrics, {}
        return m

    def next(self, state) -> dict:
        if not self.queue:
            self._rollout(state)
        return self.queue.pop(0)

    # -- one rollout --
    def _sample(self, policy: tuple, key) -> dict:
        """One sampling round: the next prompts x G -> {key: [N, ...]} host arrays per sequence:
        the teacher-forcing layout, rewards (`scores`, raw terms), lengths, sampler log-probs."""
        ctx, rl = self.ctx, self.ctx.cfg.rl
        raw, G, tok = next(self.prompts), rl.group_size, ctx.tokenizer  # every process reads the same prompts
        prompts = np.repeat(raw["prompt"], G, axis=0)  # [N, P], consecutive G = one prompt
        prompt_mask = np.repeat(raw["prompt_mask"], G, axis=0)
        pol_graphdef, pol_state, mesh = policy
        out = generate_ids(pol_graphdef, pol_state, _global(prompts, ctx, mesh=mesh), rl.max_new_tokens,
                           rng=key, temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
                           eos_id=tok.chat.stop_ids, pad_id=tok.pad_id,
                           prompt_mask=_global(prompt_mask, ctx, mesh=mesh), mesh=mesh, rules=ctx.rules)
        tokens, mask, finished = _host(out.tokens), _host(out.mask), _host(out.finished)
        batch = layout(prompts, prompt_mask, tokens, mask, tok.pad_id)
        completions = [tok.decode([t for t, m in zip(row, mrow) if m and t not in self._stops])
                       for row, mrow in zip(tokens, mask)]
        lengths = mask.sum(1)
        scores, terms = ctx.rewards(np.repeat(raw["prompt_text"], G).tolist(), completions,
                                    np.repeat(raw["answer"], G).tolist(), {k: _global(v, ctx) for k, v in batch.items()},
                                    lengths, finished)
        sampler = np.zeros(batch["targets"].shape, np.float32)  # aligned with targets, like old_logps
        sampler[:, prompts.shape[1] - 1:] = _host(out.logps) * mask
        return {**batch, **terms, "scores": scores, "lengths": lengths, "finished": finished, "sampler_logps": sampler}

    def _sample_groups(self, policy: tuple, key) -> tuple[dict, int]:
        """The rollout's sequences and how many sampling rounds they took. Dynamic sampling (DAPO):
        groups whose rewards are all equal train nothing, so further prompts are sampled, up to
        rl.max_sampling_rounds, until live groups fill the rollout (all-equal ones fill what is left)."""
        rl = self.ctx.cfg.rl
        first = self._sample(policy, key)
        if not rollout_options(rl)[0]:
            return first, 1
        G, n = rl.group_size, len(first["scores"])
        live, dead, rounds, got = [], [], 1, first
        while True:
            alive = np.repeat(live_groups(got["scores"], G), G)
            live.append({k: v[alive] for k, v in got.items()})
            dead.append({k: v[~alive] for k, v in got.items()})
            if sum(len(p["scores"]) for p in live) >= n or rounds >= rl.max_sampling_rounds:
                break
            got = self._sample(policy, jax.random.fold_in(key, rounds))
            rounds += 1
        return {k: np.concatenate([p[k] for p in live + dead])[:n] for k in first}, rounds

    def _rollout(self, state) -> None:
        ctx, rl = self.ctx, self.ctx.cfg.rl
        t0 = time.perf_counter()
        params = nnx.merge_state(state.params, state.rest)
        roll, rounds, lag = self._sampled(params)
        t_sample = time.perf_counter() - t0  # off-policy: the wait for the sample in flight

        batch = {k: roll[k] for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
        dev = {k: _global(v, ctx) for k, v in batch.items()}
        scores, lengths, finished = roll["scores"], roll["lengths"], roll["finished"]
        with use_mesh_rules(ctx.mesh, ctx.rules):
            scored, dev_metrics = self._score(params, ctx.reference, dev, _global(scores, ctx),
                                              _global(roll["sampler_logps"], ctx), jnp.float32(self.kl.coef))
        batch.update({k: _host(v) for k, v in scored.items()})  # one transfer: the rollout's math ran on device
        if self.rollouts < rl.critic_warmup:  # a fresh critic's advantages are noise: let it fit first
            batch["advantages"] = np.zeros_like(batch["advantages"])
        metrics = {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()),
                   "response_length": float(lengths.mean()),
                   "finished_fraction": float(finished.mean()), "kl_coef": self.kl.coef,
                   **{k: float(roll[k].mean()) for k in roll if k.startswith("reward_")},
                   **{k: float(v.addressable_data(0)) for k, v in dev_metrics.items()}}  # replicated scalars
        if rounds > 1 or rollout_options(rl)[0]:
            metrics["sampling_rounds"] = rounds
        if rl.off_policy_steps:
            metrics["policy_lag"] = lag
        self.kl.update(metrics["kl"], len(scores))
        metrics["padding_fraction"] = self._enqueue(batch)
        if ctx.packed:  # what the padded layout would have had
            metrics["padding_fraction_unpacked"] = padding_fraction(batch)
        self.rollouts += 1
        metrics.update(rollout_time_s=time.perf_counter() - t0, sample_time_s=t_sample)
        self.metrics = metrics

    @property
    def _stops(self):
        return stop_ids(self.ctx.tokenizer)

    def _enqueue(self, batch: dict) -> float:
        """Mini-batches of each epoch onto the queue -> their mean padding fraction."""
        rl, cfg, ctx = self.ctx.cfg.rl, self.ctx.cfg, self.ctx
        n, b = len(batch["inputs"]), cfg.train.batch_size
        pads = []
        for epoch in range(rl.epochs):
            order = np.random.default_rng([cfg.seed, self.rollouts, epoch]).permutation(n)
            for i in range(rl.minibatches):
                mini = {k: v[order[i * b:(i + 1) * b]] for k, v in batch.items()}
                if ctx.packed:  # first-fit rows of train.seq_len; sequence-level math via sequence_ids
                    mini = pack_rollout(mini, cfg.train.seq_len, ctx.mesh.shape["data"] * ctx.mesh.shape["fsdp"])
                pads.append(padding_fraction(mini))
                self.queue.append({k: _global(v[None], ctx, 1) for k, v in mini.items()})
        return float(np.mean(pads))


def rl_evals(ctx: RLContext, graphdef, state, records: list) -> dict:
    """Held-out metrics at rl.eval_temperature (eval_*) and, with rl.eval_sampled, at the rollouts'
    temperature too (eval_sampled_*): greedy accuracy and the accuracy of what training samples."""
    rl = ctx.cfg.rl
    out = rl_eval(ctx, graphdef, state, records, rl.eval_temperature, ctx.cfg.seed + 11)
    if rl.eval_sampled and rl.temperature != rl.eval_temperature:
        sampled = rl_eval(ctx, graphdef, state, records, rl.temperature, ctx.cfg.seed + 12)
        out.update({"eval_sampled_" + k[len("eval_"):]: v for k, v in sampled.items()})
    return out


def rl_eval(ctx: RLContext, graphdef, state, records: list, temperature: float, seed: int) -> dict:
    """Held-out prompts: mean reward of completions at `temperature` and their KL to the
    reference (sum over tokens of log pi - log ref, mean over prompts)."""
    if not records:
        return {}
    rl = ctx.cfg.rl
    tok = ctx.tokenizer
    params = nnx.merge_state(state.params, state.rest)
    pol_graphdef, pol_state, mesh = sampling_policy(ctx, graphdef, params)
    n_dp = math.lcm(*(m.shape["data"] * m.shape["fsdp"] for m in (ctx.mesh, mesh)))  # rows split on both
    pad = (-len(records)) % n_dp
    prompts, prompt_mask = (np.stack([r[k] for r in records] + [records[-1][k]] * pad)
                            for k in ("prompt", "prompt_mask"))
    out = generate_ids(pol_graphdef, pol_state, _global(prompts, ctx, mesh=mesh), rl.max_new_tokens,
                       rng=jax.random.key(seed), temperature=temperature, top_k=rl.top_k,
                       top_p=rl.top_p, eos_id=tok.chat.stop_ids, pad_id=tok.pad_id,
                       prompt_mask=_global(prompt_mask, ctx, mesh=mesh), mesh=mesh, rules=ctx.rules)
    tokens, mask, finished = _host(out.tokens), _host(out.mask), _host(out.finished)
    batch = layout(prompts, prompt_mask, tokens, mask, tok.pad_id)
    dev = {k: _global(v, ctx) for k, v in batch.items()}
    stops = stop_ids(ctx.tokenizer)
    completions = [ctx.tokenizer.decode([t for t, m in zip(row, mr) if m and t not in stops])
                   for row, mr in zip(tokens, mask)]
    n = len(records)
    scores, terms = ctx.rewards([str(r["prompt_text"]) for r in records] + [""] * pad,
                                completions, [str(r["answer"]) for r in records] + [""] * pad,
                                dev, mask.sum(1), finished, train=False)
    with use_mesh_rules(ctx.mesh, ctx.rules):
        chunk = ctx.cfg.objective.xent_chunk_tokens
        logps, _ = _teacher_forced(*policy_of(graphdef, params, ctx.actor_critic), dev, 1.0, chunk)
        ref_logps, _ = _teacher_forced(ctx.ref_graphdef, ctx.reference, dev, 1.0, chunk)
    m = batch["loss_mask"]
    kl = ((_host(logps) - _host(ref_logps)) * m).sum(1)[:n]
    return {"eval_reward": float(scores[:n].mean()), "eval_kl": float(kl.mean()),
            "eval_response_length": float(mask.sum(1)[:n].mean()),
            **{f"eval_{k}": float(v[:n].mean()) for k, v in terms.items()}}


def experience_source(trainer, data_state: Optional[dict], frozen, default_advantage: str):
    """Objective.batch_source of on-policy RL: rollouts instead of the input pipeline, the frozen
    reference serving the rollouts (not the step), held-out reward as the stage's extra eval."""
    stage, cfg = trainer.stage, trainer.cfg
    objective = stage.objective
    abstract = nnx.eval_shape(lambda: stage.make_model(nnx.Rngs(0)))
    policy = getattr(abstract, objective.reference_prefix) if objective.reference_prefix else abstract
    sampler = None
    if cfg.rl.sampler_mesh:
        sampler = make_mesh(MeshConfig(**cfg.rl.sampler_mesh), devices=list(trainer.mesh.devices.flat))
        split = sampler.shape["data"] * sampler.shape["fsdp"]
        if (cfg.train.batch_size * cfg.rl.minibatches) % split:
            raise ConfigError(f"rl.sampler_mesh splits a rollout's {cfg.train.batch_size * cfg.rl.minibatches} "
                              f"sequences {split} ways: make train.batch_size * rl.minibatches a multiple of {split}")
    ctx = RLContext(cfg=cfg, graphdef=nnx.graphdef(abstract), reference=frozen["reference"],
                    ref_graphdef=nnx.graphdef(policy), mesh=trainer.mesh, rules=trainer.rules,
                    tokenizer=stage.tokenizer, rewards=Rewards(cfg.rl, trainer.mesh, trainer.rules, stage.tokenizer),
                    actor_critic=isinstance(abstract, ActorCritic), advantage=cfg.rl.advantage or default_advantage,
                    packed=packing_on(cfg.data), sampler_mesh=sampler)
    stage.extra_eval = lambda graphdef, state: rl_evals(ctx, ctx.graphdef, state, stage.eval_records)
    prompts = stage.pipeline.iterator(None, cfg.data.num_threads, cfg.data.prefetch)
    return ExperienceIterator(ctx, prompts, data_state), None
