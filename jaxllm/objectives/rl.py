"""On-policy RL objectives: grpo (group-relative advantages, KL term in the loss) and ppo
(actor-critic, GAE, KL penalty in the reward). Batches are rollouts (jaxllm.rl.rollout); the
pieces that vary inside (policy loss, advantage estimator, KL estimator) are registry entries in
jaxllm.rl.algorithms, picked by rl.loss_type / rl.advantage / rl.kl_estimator."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from jaxllm.config import MeshConfig, RunConfig
from jaxllm.core.xent import lm_token_logps
from jaxllm.data.pipeline import build_pipeline
from jaxllm.errors import ConfigError
from jaxllm.rl.algorithms import (ADVANTAGES, KL_ESTIMATORS, POLICY_LOSSES, aggregate, kl_penalty, sequences_of,
                                  value_terms)
from jaxllm.rl.rewards import load_function
from jaxllm.rl.rollout import experience_source
from jaxllm.train.objective import LossContext, LossOut, Objective


def _rl_metrics(batch, logps, entropy, was_clipped, m):
    n = m.sum()
    return {"entropy": ((entropy * m).sum(), n), "clip_fraction": ((was_clipped * m).sum(), n),
            "policy_kl": ((kl_penalty(logps, batch["ref_logps"], "k3") * m).sum(), n),
            "ratio": ((jnp.exp(logps - batch["old_logps"]) * m).sum(), n)}


def _policy_terms(rl, logps, batch, m, seqs):
    """(per-token policy loss, was clipped, how to aggregate) of the rl.loss_type entry."""
    loss = POLICY_LOSSES[rl.loss_type]
    pg, was_clipped = loss(logps, batch["old_logps"], batch["advantages"], m, rl, seqs)
    if "tis_weight" in batch:  # rl.tis_cap: truncated importance weight of trainer vs sampler
        pg = pg * batch["tis_weight"]
    return pg, was_clipped, getattr(loss, "aggregation", rl.loss_agg)


def grpo_loss(model, batch, ctx: LossContext) -> LossOut:
    """Policy loss (rl.loss_type) with the rollout's advantages + kl_coef * KL(policy || reference)."""
    rl = ctx.extras["rl"]
    logps, entropy = lm_token_logps(model, batch, rl.temperature, ctx.cfg.xent_chunk_tokens)
    m = batch["loss_mask"].astype(jnp.float32)
    seqs = sequences_of(batch, ctx.extras.get("sequences", 0))  # rows, or packed sequences
    pg, was_clipped, how = _policy_terms(rl, logps, batch, m, seqs)
    kl = kl_penalty(logps, batch["ref_logps"], rl.kl_estimator)
    per_tok = pg + rl.kl_coef * kl if rl.kl_coef else pg
    total, denom = aggregate(per_tok, m, how, rl.max_new_tokens, seqs)
    return LossOut(total, denom, _rl_metrics(batch, logps, entropy, was_clipped, m))


def ppo_loss(model, batch, ctx: LossContext) -> LossOut:
    """Actor-critic: policy loss (rl.loss_type) + vf_coef * clipped value loss (model = ActorCritic)."""
    rl = ctx.extras["rl"]
    logps, entropy = lm_token_logps(model.actor, batch, rl.temperature, ctx.cfg.xent_chunk_tokens)
    values = model.critic.scores(batch["inputs"], batch["positions"], batch["segment_ids"])
    m = batch["loss_mask"].astype(jnp.float32)
    seqs = sequences_of(batch, ctx.extras.get("sequences", 0))
    pg, was_clipped, how = _policy_terms(rl, logps, batch, m, seqs)
    vl = value_terms(values, batch["old_values"], batch["returns"], rl.value_clip)
    total, denom = aggregate(pg + rl.vf_coef * vl, m, how, rl.max_new_tokens, seqs)
    metrics = _rl_metrics(batch, logps, entropy, was_clipped, m)
    metrics["value_loss"] = ((vl * m).sum(), m.sum())
    return LossOut(total, denom, metrics)


def check_rl(cfg: RunConfig, name: str, min_group: int, has_critic: bool) -> None:
    rl = cfg.rl
    if not rl.rewards:
        raise ConfigError(f"objective.name={name} needs at least one reward: set rl.rewards")
    for r in rl.rewards:
        if r.kind == "function":
            load_function(r.fn)  # importable now, not after the first rollout
    POLICY_LOSSES.pick(rl.loss_type)
    if rl.loss_type == "dr_grpo" and rl.advantage_norm != "mean":
        raise ConfigError("rl.loss_type=dr_grpo trains on unnormalised group advantages: set rl.advantage_norm=mean")
    KL_ESTIMATORS.pick(rl.kl_estimator)
    needs_values = rl.advantage and getattr(ADVANTAGES.pick(rl.advantage), "needs_values", False)
    if needs_values and not has_critic:
        raise ConfigError(f"rl.advantage={rl.advantage} needs a critic's values: use objective.name=ppo, "
                          f"or an advantage without one ({', '.join(sorted(ADVANTAGES))})")
    if has_critic and rl.advantage and not needs_values:
        raise ConfigError(f"objective.name={name} trains its critic on GAE returns: leave rl.advantage empty "
                          f"or set it to gae (got {rl.advantage})")
    if rl.critic_warmup and not has_critic:
        raise ConfigError(f"rl.critic_warmup={rl.critic_warmup} needs a critic (objective.name=ppo); set it to 0")
    if cfg.data.max_prompt_len + rl.max_new_tokens > cfg.train.seq_len:
        raise ConfigError(f"data.max_prompt_len + rl.max_new_tokens = {cfg.data.max_prompt_len} + "
                          f"{rl.max_new_tokens} exceeds train.seq_len={cfg.train.seq_len}")
    rollout = cfg.train.batch_size * rl.minibatches
    if rollout % rl.group_size:
        raise ConfigError(f"train.batch_size*rl.minibatches = {rollout} sequences per rollout is not "
                          f"divisible by rl.group_size={rl.group_size}")
    estimator = ADVANTAGES.pick(rl.advantage) if rl.advantage else None
    if getattr(estimator, "needs_groups", False):
        min_group = max(min_group, 2)
    if rl.group_size < min_group:
        raise ConfigError(f"objective.name={name} needs rl.group_size >= {min_group} (advantages are "
                          f"relative to the group)")
    per_rollout = rl.epochs * rl.minibatches
    for key, v in (("train.steps", cfg.train.steps), ("checkpoint.every", cfg.checkpoint.every),
                   ("train.stop_at", cfg.train.stop_at)):
        if v % per_rollout:
            raise ConfigError(f"{key}={v} must be a multiple of rl.epochs*rl.minibatches = {per_rollout} "
                              f"(checkpoints and stops fall on rollout boundaries)")
    if rl.sampler_mesh:
        try:
            MeshConfig(**rl.sampler_mesh).validate()
        except TypeError:
            raise ConfigError(f"rl.sampler_mesh={rl.sampler_mesh}: keys are mesh axis sizes "
                              f"(data, fsdp, tensor, dcn_data, dcn_fsdp, dcn_tensor)") from None
        except ConfigError as e:
            raise ConfigError(f"rl.sampler_{e}") from None
    if rl.off_policy_steps and not rl.tis_cap:
        raise ConfigError("rl.off_policy_steps=1 trains on samples of the previous weights: set rl.tis_cap "
                          "(e.g. 2) so truncated importance sampling corrects them")
    if cfg.train.grad_accum != 1:
        raise ConfigError("train.grad_accum must be 1 for RL: use rl.minibatches to split a rollout")


def prompt_pipeline(cfg: RunConfig, tok):
    """Prompt pipeline sized to one rollout's prompts. Every process reads the same prompts (a few
    KB per rollout): rollouts are global arrays, so per-process slicing would buy nothing."""
    n_prompts = cfg.train.batch_size * cfg.rl.minibatches // cfg.rl.group_size
    return build_pipeline(cfg.data, tok, cfg.train.seq_len, n_prompts, cfg.seed,
                          max(1, -(-cfg.rl.eval_prompts // n_prompts)), 0, 1)


def _rl_setup(cfg: RunConfig, stage) -> None:
    """Held-out prompts are scored by rollouts (rl_eval, the batch source's extra eval), not the loss."""
    pipeline = stage.pipeline
    records = [{k: v[i] for k, v in b.items()} for b in pipeline.eval_batches for i in range(len(b["prompt"]))]
    pipeline.eval_batches = []
    stage.eval_records = records[: cfg.rl.eval_prompts]
    stage.extras["rl"] = cfg.rl
    stage.extras["sequences"] = cfg.train.batch_size  # per mini-batch (packed rows index them)


_COMMON = dict(data_kinds=("prompt",), needs_reference=True, make_pipeline=prompt_pipeline, setup=_rl_setup,
               headline=("eval_reward", True, "held-out reward"), curves=("reward_mean", "kl"))
GRPO = Objective("grpo", grpo_loss, check=lambda cfg: check_rl(cfg, "grpo", 2, False),
                 batch_source=functools.partial(experience_source, default_advantage="group"), **_COMMON)
PPO = Objective("ppo", ppo_loss, model="actor_critic", new_params=("critic/score",), reference_prefix="actor",
                init_sources=(("actor/", "init_from"), ("critic/", "critic_init")),
                check=lambda cfg: check_rl(cfg, "ppo", 1, True),
                batch_source=functools.partial(experience_source, default_advantage="gae"), **_COMMON)
OBJECTIVES = (GRPO, PPO)
