"""Preference objectives on [B, K, T] batches (K completions per prompt, ranked best first):
reward_bt (Bradley-Terry reward model) and dpo (DPO / IPO against a frozen reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import RunConfig
from jaxllm.core.arrays import last_token_index
from jaxllm.core.sharding import use_mesh_rules
from jaxllm.core.xent import lm_token_logps
from jaxllm.train.objective import LossContext, LossOut, Objective


# ---- public math ------------------------------------------------------------------------------
def sequence_logprobs(logits, tokens, mask):
    """Sum over unmasked positions of log_softmax(logits)[t, tokens[t]].

    logits [B, T, V] are already aligned with the tokens they score; tokens, mask [B, T] -> [B].
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok_logp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return (tok_logp * mask.astype(jnp.float32)).sum(-1)


def reward_pair_loss(chosen_rewards, rejected_rewards, margin=None):
    """Per-pair Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin), no reduction."""
    diff = jnp.asarray(chosen_rewards, jnp.float32) - jnp.asarray(rejected_rewards, jnp.float32)
    if margin is not None:
        diff = diff - margin
    return -jax.nn.log_sigmoid(diff)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """-> (per-example losses, chosen implicit rewards beta*(pi_c - ref_c), rejected beta*(pi_r - ref_r)).

    sigmoid: -[(1-eps) log sigmoid(beta*D) + eps log sigmoid(-beta*D)], D = (pi_c - pi_r) - (ref_c - ref_r);
    ipo: (D - 1/(2*beta))^2."""
    pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in (policy_chosen_logps, policy_rejected_logps,
                                                            ref_chosen_logps, ref_rejected_logps))
    delta = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * delta) - label_smoothing * jax.nn.log_sigmoid(-beta * delta)
    elif loss_type == "ipo":
        losses = jnp.square(delta - 1.0 / (2.0 * beta))
    else:
        raise ValueError(f"loss_type {loss_type!r}: use 'sigmoid' or 'ipo'")
    return losses, beta * (pc - rc), beta * (pr - rr)


# ---- helpers shared by preference losses ------------------------------------------------------------
def flat_k(batch):
    """[B, K, T] preference batch -> ([B*K, T] arrays, B, K)."""
    B, K, T = batch["inputs"].shape
    return {k: v.reshape(B * K, *v.shape[2:]) for k, v in batch.items() if v.ndim >= 3}, B, K


def pair_indices(K: int):
    """All K(K-1)/2 pairs (i, j) with i ranked above j (completions are ranked best first)."""
    i, j = np.triu_indices(K, 1)
    return jnp.asarray(i), jnp.asarray(j)


def policy_logps(model, flat, chunk_tokens: int = 512):
    """[N, T] batch -> [N] summed log-probs of the loss_mask targets."""
    logps, _ = lm_token_logps(model, flat, 1.0, chunk_tokens)
    return (logps * flat["loss_mask"].astype(jnp.float32)).sum(-1)


def preference_batch_shapes(cfg: RunConfig) -> dict:
    """One global step's [A, b, K=2, T] preference batch (planning)."""
    A, T = cfg.train.grad_accum, cfg.train.seq_len
    lead = (A, cfg.train.batch_size // A, 2)
    return {k: ((*lead, T), jnp.int32) for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}


# ---- reward model -------------------------------------------------------------------------------
def reward_bt_loss(model, batch, ctx: LossContext) -> LossOut:
    """Bradley-Terry over all ranked pairs of each prompt, reward read at the last real token."""
    flat, B, K = flat_k(batch)
    scores = model.scores(flat["inputs"], flat["positions"], flat["segment_ids"])  # [B*K, T]
    idx = last_token_index(flat["segment_ids"])
    r = jnp.take_along_axis(scores, idx[:, None], axis=1)[:, 0].reshape(B, K)
    i, j = pair_indices(K)
    better, worse = r[:, i], r[:, j]  # [B, P]
    losses = reward_pair_loss(better, worse, ctx.cfg.margin or None)
    n = jnp.float32(losses.size)
    center = jnp.square(r.mean(-1)).sum() * i.shape[0]  # in pair units, like the main term
    loss_sum = losses.sum() + ctx.cfg.center_coef * center
    diff = better - worse
    return LossOut(loss_sum, n, {"pair_accuracy": ((diff > 0).sum(), n), "margin": (diff.sum(), n),
                                 "reward_mean": (r.sum(), jnp.float32(r.size))})


# ---- DPO ----------------------------------------------------------------------------------------
def dpo_objective(model, batch, ctx: LossContext) -> LossOut:
    """DPO/IPO on (chosen, rejected) = completions 0 and 1 of each example. The reference is the
    frozen SFT model (ctx.frozen["reference"]) or log-probs precomputed into the batch."""
    flat, B, K = flat_k(batch)
    logps = policy_logps(model, flat, ctx.cfg.xent_chunk_tokens).reshape(B, K)
    if "ref_logps" in batch:
        ref = batch["ref_logps"]
    else:
        ref_model = nnx.merge(nnx.graphdef(model), ctx.frozen["reference"])
        ref = jax.lax.stop_gradient(policy_logps(ref_model, flat, ctx.cfg.xent_chunk_tokens).reshape(B, K))
    losses, r_c, r_r = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], ctx.cfg.beta,
                                ctx.cfg.label_smoothing, ctx.cfg.loss_type)
    n = jnp.float32(B)
    return LossOut(losses.sum(), n, {
        "reward_accuracy": ((r_c > r_r).sum(), n), "reward_margin": ((r_c - r_r).sum(), n),
        "chosen_reward": (r_c.sum(), n), "rejected_reward": (r_r.sum(), n),
        "chosen_logp_drift": ((logps[:, 0] - ref[:, 0]).sum(), n),
        "rejected_logp_drift": ((logps[:, 1] - ref[:, 1]).sum(), n)})


def precompute_reference_logps(graphdef, reference, pipeline, mesh, rules, chunk: int = 64,
                               xent_chunk_tokens: int = 512) -> None:
    """DPO speed option: reference log-probs of every (chosen, rejected) pair computed once and
    stored in the examples (`ref_logps` [K]), so the train step runs no reference forward pass."""
    @jax.jit
    def logps(batch):
        with use_mesh_rules(mesh, rules):
            flat, B, K = flat_k(batch)
            return policy_logps(nnx.merge(graphdef, reference), flat, xent_chunk_tokens).reshape(B, K)

    def fill(examples):
        for i in range(0, len(examples), chunk):
            part = examples[i:i + chunk]
            stacked = {k: jnp.asarray(np.stack([e[k] for e in part])) for k in part[0] if k != "ref_logps"}
            for e, r in zip(part, np.asarray(logps(stacked))):
                e["ref_logps"] = r  # the grain sources hold these same dicts
    for examples in pipeline.examples:
        fill(examples)
    for b in pipeline.eval_batches:
        b["ref_logps"] = np.asarray(logps({k: jnp.asarray(v) for k, v in b.items() if k != "ref_logps"}))


def _dpo_prepare(trainer, frozen):
    """objective.precompute_ref: the batches carry ref_logps, so the step holds no reference model."""
    cfg = trainer.cfg
    if frozen is None or not cfg.objective.precompute_ref:
        return frozen
    precompute_reference_logps(trainer.graphdef, frozen["reference"], trainer.stage.pipeline, trainer.mesh,
                               trainer.rules, xent_chunk_tokens=cfg.objective.xent_chunk_tokens)
    return None


def _dpo_batch_shapes(cfg: RunConfig) -> dict:
    out = preference_batch_shapes(cfg)
    if cfg.objective.precompute_ref:
        A = cfg.train.grad_accum
        out["ref_logps"] = ((A, cfg.train.batch_size // A, 2), jnp.float32)
    return out


REWARD_BT = Objective("reward_bt", reward_bt_loss, ("preference",), model="scalar", new_params=("score",),
                      batch_shapes=preference_batch_shapes, sequences_per_example=2,
                      headline=("eval_pair_accuracy", True, "held-out pair accuracy"),
                      curves=("loss", "pair_accuracy"), report_samples="")
DPO = Objective("dpo", dpo_objective, ("preference",), needs_reference=True, batch_shapes=_dpo_batch_shapes,
                sequences_per_example=2, reference_flops=True, prepare=_dpo_prepare,
                headline=("eval_reward_accuracy", True, "implicit reward accuracy"),
                curves=("loss", "reward_accuracy"))
OBJECTIVES = (REWARD_BT, DPO)
