"""Loss functions, picked by name from `LOSSES`.

Every loss has the signature `loss(model, batch, ctx) -> LossOut` and returns a *sum* and the
count it is a sum over (tokens, pairs, examples), never a mean, so gradient accumulation over
micro-batches and packed sequences stay exact: the train step sums both over micro-batches and
divides once. Extra metrics are (sum, count) pairs for the same reason.

The pure math helpers at the bottom are public API (`jaxllm.objectives.sequence_logprobs`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.xent import fused_xent, token_logps


class LossOut(NamedTuple):
    loss_sum: jax.Array  # scalar: sum of per-unit losses
    denom: jax.Array  # scalar: number of units summed over
    metrics: dict  # name -> (sum, count)


@dataclass
class LossContext:
    """What a loss may need besides the model and the batch. All fields are jit-friendly."""
    rng: jax.Array
    cfg: Any  # ObjectiveConfig (static)
    frozen: Any = None  # e.g. reference-model params, passed into jit without gradients
    extras: dict = field(default_factory=dict)


LOSSES: dict[str, Callable[..., LossOut]] = {}


def register_loss(name: str):
    def deco(fn):
        LOSSES[name] = fn
        return fn
    return deco


def get_loss(name: str):
    return LOSSES[name]


# ---- pretraining objectives ---------------------------------------------------------------
def token_nll(logits, targets):
    """logits [B, T, V] (float32), targets [B, T] -> (nll [B, T], logsumexp [B, T], correct [B, T])."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    # "correct" = the target has the top logit (ties count); an argmax over V is ~5x slower on CPU
    correct = target_logit >= logits.max(axis=-1)
    return logz - target_logit, logz, correct


def lm_token_loss(model, tokens, positions, segment_ids, causal, targets, weights, z_loss: float,
                  chunk_tokens: int) -> dict:
    """Weighted next-token loss sums {loss, nll, z, correct} (scalars) of `model` on `tokens`.
    Through the fused chunked head + cross-entropy (jaxllm.xent) unless chunk_tokens=0."""
    h = model.hidden(tokens, positions, segment_ids, causal)  # [B, T, D]
    weights = weights.astype(jnp.float32)
    if chunk_tokens > 0:
        return fused_xent(h, model.head_weight(), targets, weights, z_loss, chunk_tokens)
    nll, logz, correct = token_nll(model.logits(h), targets)
    nll_sum, z_sum = (nll * weights).sum(), (jnp.square(logz) * weights).sum()
    return {"loss": nll_sum + z_loss * z_sum, "nll": nll_sum, "z": z_sum, "correct": (correct * weights).sum()}


@register_loss("causal_lm")
def causal_lm_loss(model, batch, ctx: LossContext) -> LossOut:
    """Next-token cross-entropy on `loss_mask` positions (+ optional z-loss on log Z)."""
    mask = batch["loss_mask"]
    s = lm_token_loss(model, batch["inputs"], batch["positions"], batch["segment_ids"], True, batch["targets"],
                      mask, ctx.cfg.z_loss, ctx.cfg.xent_chunk_tokens)
    n = mask.astype(jnp.float32).sum()
    return LossOut(s["loss"], n, {"nll": (s["nll"], n), "accuracy": (s["correct"], n), "z_loss": (s["z"], n)})


def mask_tokens(rng, tokens, valid, mask_prob: float, mask_id: int, vocab_size: int):
    """BERT corruption: select `mask_prob` of valid tokens; of those 80% -> mask_id,
    10% -> a random token, 10% unchanged. Returns (corrupted tokens, selected mask)."""
    k_sel, k_kind, k_rand = jax.random.split(rng, 3)
    selected = (jax.random.uniform(k_sel, tokens.shape) < mask_prob) & valid
    kind = jax.random.uniform(k_kind, tokens.shape)
    random_tokens = jax.random.randint(k_rand, tokens.shape, 0, vocab_size, dtype=tokens.dtype)
    corrupted = jnp.where(selected & (kind < 0.8), mask_id, tokens)
    corrupted = jnp.where(selected & (kind >= 0.8) & (kind < 0.9), random_tokens, corrupted)
    return corrupted, selected


@register_loss("masked_lm")
def masked_lm_loss(model, batch, ctx: LossContext) -> LossOut:
    """BERT-style masked-token prediction with bidirectional attention (within each segment)."""
    tokens = batch["inputs"]
    valid = batch["segment_ids"] != 0
    corrupted, selected = mask_tokens(ctx.rng, tokens, valid, ctx.cfg.mask_prob,
                                      ctx.extras["mask_id"], model.cfg.vocab_size)
    s = lm_token_loss(model, corrupted, batch["positions"], batch["segment_ids"], False, tokens, selected,
                      0.0, ctx.cfg.xent_chunk_tokens)
    n = selected.astype(jnp.float32).sum()
    return LossOut(s["loss"], n, {"nll": (s["nll"], n), "accuracy": (s["correct"], n)})  # metrics carry no gradient


# SFT is next-token loss restricted to response tokens: the chat pipeline's loss_mask does that.
LOSSES["sft"] = causal_lm_loss


def _flat_k(batch):
    """[B, K, T] preference batch -> ([B*K, T] arrays, B, K)."""
    B, K, T = batch["inputs"].shape
    return {k: v.reshape(B * K, *v.shape[2:]) for k, v in batch.items() if v.ndim >= 3}, B, K


def pair_indices(K: int):
    """All K(K-1)/2 pairs (i, j) with i ranked above j (completions are ranked best first)."""
    i, j = np.triu_indices(K, 1)
    return jnp.asarray(i), jnp.asarray(j)


@register_loss("reward_bt")
def reward_bt_loss(model, batch, ctx: LossContext) -> LossOut:
    """Bradley-Terry over all ranked pairs of each prompt, reward read at the last real token."""
    from jaxllm.model import last_token_index
    flat, B, K = _flat_k(batch)
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


def lm_token_logps(model, batch, temperature: float = 1.0, chunk_tokens: int = 512):
    """-> (log-prob of each target [B, T], entropy [B, T]) of the causal LM `model` on `batch`
    (inputs, positions, segment_ids, targets). Through the chunked head (jaxllm.xent.token_logps),
    which never holds [B, T, V] logits, unless chunk_tokens=0."""
    h = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"], True)  # [B, T, D]
    if chunk_tokens > 0:
        return token_logps(h, model.head_weight(), batch["targets"], temperature, chunk_tokens)
    return token_logps_and_entropy(model.logits(h), batch["targets"], temperature)


def policy_logps(model, flat, chunk_tokens: int = 512):
    """[N, T] batch -> [N] summed log-probs of the loss_mask targets."""
    logps, _ = lm_token_logps(model, flat, 1.0, chunk_tokens)
    return (logps * flat["loss_mask"].astype(jnp.float32)).sum(-1)


@register_loss("dpo")
def dpo_objective(model, batch, ctx: LossContext) -> LossOut:
    """DPO/IPO on (chosen, rejected) = completions 0 and 1 of each example. The reference is the
    frozen SFT model (ctx.frozen["reference"]) or log-probs precomputed into the batch."""
    flat, B, K = _flat_k(batch)
    logps = policy_logps(model, flat, ctx.cfg.xent_chunk_tokens).reshape(B, K)
    if "ref_logps" in batch:
        ref = batch["ref_logps"]
    else:
        from flax import nnx
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


# ---- public math API ----------------------------------------------------------------------
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


# ---- RL math (public, pure) ----------------------------------------------------------------
def kl_penalty(logprobs, ref_logprobs, kind: str = "k1"):
    """Per-token KL estimate of policy vs reference from sampled tokens, d = ref - logp:
    k1 = -d (unbiased, can be negative), k2 = d^2/2, k3 = exp(d) - d - 1 (unbiased, >= 0)."""
    d = jnp.asarray(ref_logprobs, jnp.float32) - jnp.asarray(logprobs, jnp.float32)
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * jnp.square(d)
    if kind == "k3":
        return jnp.exp(d) - d - 1.0
    raise ValueError(f"kl kind {kind!r}: use k1, k2 or k3")


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation on [B, T] (reverse scan over T). The value after the last
    unmasked token is 0: the episode ends there. -> (advantages, returns = advantages + values),
    both zero where mask is 0."""
    r, v = jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32)
    m = jnp.asarray(mask, jnp.float32)
    next_v = jnp.concatenate([v[:, 1:] * m[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)

    def back(adv_next, xs):
        r_t, v_t, nv_t, m_t = xs
        a = m_t * (r_t + gamma * nv_t - v_t + gamma * lam * adv_next)
        return a, a

    _, adv = jax.lax.scan(back, jnp.zeros_like(r[:, 0]), (r.T, v.T, next_v.T, m.T), reverse=True)
    adv = adv.T
    return adv, (adv + v) * m


def group_advantages(rewards, group_size: int, normalize_std: bool = True, eps: float = 1e-6):
    """Flat [N*G] rewards, consecutive blocks of G = one prompt's samples -> [N*G] advantages
    r - mean(group), divided by (std(group) + eps) if normalize_std (population std). A group
    whose rewards are all equal gets advantage 0."""
    r = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
    a = r - r.mean(axis=1, keepdims=True)
    if normalize_std:
        a = a / (r.std(axis=1, keepdims=True) + eps)
    return a.reshape(-1)


def _clipped_pg(logprobs, old_logprobs, advantages, clip_low, clip_high):
    """Per-token clipped policy-gradient loss and whether clipping was active."""
    ratio = jnp.exp(jnp.asarray(logprobs, jnp.float32) - jnp.asarray(old_logprobs, jnp.float32))
    adv = jnp.asarray(advantages, jnp.float32)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.maximum(unclipped, clipped), clipped > unclipped


def _masked_mean(x, mask):
    m = jnp.asarray(mask, jnp.float32)
    return (x * m).sum() / jnp.maximum(m.sum(), 1.0)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low: float = 0.2, clip_high: float = 0.2):
    """Masked token-mean of max(-A*r, -A*clip(r, 1-clip_low, 1+clip_high)), r = exp(logp - old).
    -> (loss, {"clip_fraction", "approx_kl"})."""
    per_tok, was_clipped = _clipped_pg(logprobs, old_logprobs, advantages, clip_low, clip_high)
    approx_kl = 0.5 * jnp.square(jnp.asarray(logprobs) - jnp.asarray(old_logprobs))
    return _masked_mean(per_tok, mask), {"clip_fraction": _masked_mean(was_clipped, mask),
                                         "approx_kl": _masked_mean(approx_kl, mask)}


def _value_terms(values, old_values, returns, clip):
    v, ov, R = (jnp.asarray(x, jnp.float32) for x in (values, old_values, returns))
    v_clipped = ov + jnp.clip(v - ov, -clip, clip)
    return 0.5 * jnp.maximum(jnp.square(v - R), jnp.square(v_clipped - R))


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """Masked token-mean of 0.5*max((V-R)^2, (V_clipped-R)^2), V_clipped = V_old + clip(V-V_old, ±clip)."""
    return _masked_mean(_value_terms(values, old_values, returns, clip), mask)


# ---- RL losses on rollout batches ------------------------------------------------------------
# A rollout batch (built by jaxllm.rl) holds per sequence [B, T]: inputs, targets, positions,
# segment_ids, loss_mask (1 on completion tokens), old_logps, ref_logps, advantages, and for PPO
# old_values and returns. All per-token arrays are aligned with `targets`.
def token_logps_and_entropy(logits, targets, temperature: float = 1.0):
    """Log-probs of `targets` and entropies under softmax(logits / temperature): the sampling
    distribution of the rollouts (temperature 0 = greedy is scored at 1)."""
    logits = logits.astype(jnp.float32)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    entropy = -(jnp.exp(logp) * logp).sum(-1)
    return tok, entropy


def _aggregate(per_tok, mask, how: str):
    """-> (sum, denom): token-level (all tokens weigh the same) or sequence-level (each
    sequence's token mean weighs the same)."""
    m = mask.astype(jnp.float32)
    if how == "sequence":
        per_seq = (per_tok * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)
        has = (m.sum(-1) > 0).astype(jnp.float32)
        return (per_seq * has).sum(), has.sum()
    return (per_tok * m).sum(), m.sum()


def _rl_metrics(batch, logps, entropy, was_clipped, m):
    n = m.sum()
    return {"entropy": ((entropy * m).sum(), n), "clip_fraction": ((was_clipped * m).sum(), n),
            "policy_kl": ((kl_penalty(logps, batch["ref_logps"], "k3") * m).sum(), n),
            "ratio": ((jnp.exp(logps - batch["old_logps"]) * m).sum(), n)}


@register_loss("grpo")
def grpo_loss(model, batch, ctx: LossContext) -> LossOut:
    """Clipped policy loss with group-relative advantages + beta * KL(policy || reference)."""
    rl = ctx.extras["rl"]
    logps, entropy = lm_token_logps(model, batch, rl.temperature, ctx.cfg.xent_chunk_tokens)
    pg, was_clipped = _clipped_pg(logps, batch["old_logps"], batch["advantages"], rl.clip_low, rl.clip_high)
    kl = kl_penalty(logps, batch["ref_logps"], rl.kl_estimator)
    per_tok = pg + rl.kl_coef * kl if rl.kl_coef else pg
    m = batch["loss_mask"].astype(jnp.float32)
    total, denom = _aggregate(per_tok, m, rl.loss_agg)
    return LossOut(total, denom, _rl_metrics(batch, logps, entropy, was_clipped, m))


@register_loss("ppo")
def ppo_loss(model, batch, ctx: LossContext) -> LossOut:
    """Actor-critic: clipped policy loss + vf_coef * clipped value loss (model = rl.ActorCritic)."""
    rl = ctx.extras["rl"]
    logps, entropy = lm_token_logps(model.actor, batch, rl.temperature, ctx.cfg.xent_chunk_tokens)
    values = model.critic.scores(batch["inputs"], batch["positions"], batch["segment_ids"])
    pg, was_clipped = _clipped_pg(logps, batch["old_logps"], batch["advantages"], rl.clip_low, rl.clip_high)
    vl = _value_terms(values, batch["old_values"], batch["returns"], rl.value_clip)
    m = batch["loss_mask"].astype(jnp.float32)
    total, denom = _aggregate(pg + rl.vf_coef * vl, m, rl.loss_agg)
    metrics = _rl_metrics(batch, logps, entropy, was_clipped, m)
    metrics["value_loss"] = ((vl * m).sum(), m.sum())
    return LossOut(total, denom, metrics)
