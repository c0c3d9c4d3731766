"""RL algorithm pieces, registered by name: KL estimators (`rl.kl_estimator`), policy losses
(`rl.loss_type`) and advantage estimators (`rl.advantage`). A new algorithm is a new entry in one
of these registries, not a branch in the rollout or the loss. The math is public and pure.

Shapes: N sequences of a rollout, T teacher-forced positions; per-token arrays are aligned with
the batch's `targets`, and `mask` is 1 on generated (trained) tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import Registry, RLConfig
from jaxllm.core.arrays import last_token_index

KL_ESTIMATORS = Registry("rl.kl_estimator")
POLICY_LOSSES = Registry("rl.loss_type")
ADVANTAGES = Registry("rl.advantage")


# ---- KL estimators: d = ref - logp of the sampled token ------------------------------------------
KL_ESTIMATORS.register("k1", lambda d: -d)  # unbiased, can be negative
KL_ESTIMATORS.register("k2", lambda d: 0.5 * jnp.square(d))
KL_ESTIMATORS.register("k3", lambda d: jnp.exp(d) - d - 1.0)  # unbiased, >= 0


def kl_penalty(logprobs, ref_logprobs, kind: str = "k1"):
    """Per-token KL estimate of policy vs reference from sampled tokens, d = ref - logp:
    k1 = -d (unbiased, can be negative), k2 = d^2/2, k3 = exp(d) - d - 1 (unbiased, >= 0)."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kl kind {kind!r}: use {', '.join(KL_ESTIMATORS)}")
    d = jnp.asarray(ref_logprobs, jnp.float32) - jnp.asarray(logprobs, jnp.float32)
    return KL_ESTIMATORS[kind](d)


# ---- how tokens group into sequences ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sequences:
    """Padded rows: one sequence per row (ids None). Packed rows (`jaxllm.rl.packing`): `ids` [R, T]
    holds each token's sequence index in the mini-batch, n on padding, for n sequences."""
    ids: Optional[jax.Array] = None
    n: int = 0

    def sums(self, x):
        """[rows, T] -> per-sequence sums [sequences]."""
        if self.ids is None:
            return x.sum(-1)
        return jax.ops.segment_sum(x.reshape(-1), self.ids.reshape(-1), num_segments=self.n + 1)[: self.n]

    def spread(self, per_seq):
        """[sequences] -> [rows, T]: each token gets its sequence's value (padding 0)."""
        if self.ids is None:
            return per_seq[:, None]
        return jnp.concatenate([per_seq, jnp.zeros((1,), per_seq.dtype)])[self.ids]


ROWS = Sequences()


def sequences_of(batch: dict, n: int) -> Sequences:
    """n: sequences per (packed) mini-batch; ignored for padded rows."""
    if "sequence_ids" not in batch:
        return ROWS
    if n <= 0:
        raise ValueError("packed RL rows need the mini-batch's sequence count (LossContext.extras['sequences'])")
    return Sequences(batch["sequence_ids"], n)


# ---- policy losses: (logps, old_logps, advantages, mask, rl, seqs) -> (per-token loss, was clipped) ---
# An entry may set `.aggregation` ("token", "sequence" or "constant"), overriding rl.loss_agg: the
# normalisation is part of what defines Dr. GRPO and GSPO.
def clipped_surrogate(logprobs, old_logprobs, advantages, clip_low, clip_high):
    """Per-token PPO-clip loss max(-A*r, -A*clip(r, 1-clip_low, 1+clip_high)), r = exp(logp - old),
    and where clipping was active."""
    ratio = jnp.exp(jnp.asarray(logprobs, jnp.float32) - jnp.asarray(old_logprobs, jnp.float32))
    adv = jnp.asarray(advantages, jnp.float32)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.maximum(unclipped, clipped), clipped > unclipped


@POLICY_LOSSES.register("grpo")
def grpo_policy_loss(logprobs, old_logprobs, advantages, mask, rl: RLConfig, seqs: Sequences = ROWS):
    """The PPO-clip surrogate per token (GRPO's and PPO's policy term)."""
    return clipped_surrogate(logprobs, old_logprobs, advantages, rl.clip_low, rl.clip_high)


@POLICY_LOSSES.register("dr_grpo")
def dr_grpo_policy_loss(logprobs, old_logprobs, advantages, mask, rl: RLConfig, seqs: Sequences = ROWS):
    """Dr. GRPO (Liu et al. 2025): GRPO's surrogate, summed over tokens and divided by a constant
    (sequences x rl.max_new_tokens) instead of each sequence's length, which removes the length
    bias; paired with unnormalised group advantages (rl.advantage_norm=mean, checked at load)."""
    return clipped_surrogate(logprobs, old_logprobs, advantages, rl.clip_low, rl.clip_high)


dr_grpo_policy_loss.aggregation = "constant"


def gspo_token_ratio(logprobs, old_logprobs, mask, seqs: Sequences = ROWS):
    """GSPO's per-token ratio: equal in value to the sequence ratio gspo_ratio [N] on every token,
    with the gradient of that token's log-prob (sg(s_i) * exp(logp_t - sg(logp_t)), GSPO-token)."""
    lp = jnp.asarray(logprobs, jnp.float32)
    seq = jax.lax.stop_gradient(gspo_ratio(lp, old_logprobs, mask, seqs))
    return seqs.spread(seq) * jnp.exp(lp - jax.lax.stop_gradient(lp))


@POLICY_LOSSES.register("gspo")
def gspo_policy_loss(logprobs, old_logprobs, advantages, mask, rl: RLConfig, seqs: Sequences = ROWS):
    """GSPO (Zheng et al. 2025): the clipped surrogate on the sequence-level ratio (the geometric
    mean of the token ratios), so a whole sequence is clipped or not; sequence-mean aggregation.
    Its clip ranges are ~1e-3, not 0.2: set rl.clip_low / rl.clip_high (paper: 3e-4 / 4e-4)."""
    ratio = gspo_token_ratio(logprobs, old_logprobs, mask, seqs)
    adv = jnp.asarray(advantages, jnp.float32)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - rl.clip_low, 1.0 + rl.clip_high)
    return jnp.maximum(unclipped, clipped), clipped > unclipped


gspo_policy_loss.aggregation = "sequence"


@POLICY_LOSSES.register("cispo")
def cispo_policy_loss(logprobs, old_logprobs, advantages, mask, rl: RLConfig, seqs: Sequences = ROWS):
    """CISPO (MiniMax-M1, 2025): REINFORCE on every token with a stop-gradient importance weight
    truncated at 1 + rl.clip_high, -sg(min(r, 1 + clip_high)) * A * logp: no token's gradient is
    dropped by clipping, only its weight is capped. Token-level aggregation."""
    lp = jnp.asarray(logprobs, jnp.float32)
    ratio = jnp.exp(jax.lax.stop_gradient(lp) - jnp.asarray(old_logprobs, jnp.float32))
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + rl.clip_high))
    return -weight * jnp.asarray(advantages, jnp.float32) * lp, ratio > 1.0 + rl.clip_high


cispo_policy_loss.aggregation = "token"


@POLICY_LOSSES.register("dapo")
def dapo_policy_loss(logprobs, old_logprobs, advantages, mask, rl: RLConfig, seqs: Sequences = ROWS):
    """DAPO (Yu et al. 2025): the clipped surrogate with decoupled ranges (clip-higher: set
    rl.clip_high above rl.clip_low, paper 0.28 / 0.2), token-level aggregation; its rollouts
    refill all-equal groups with new prompts (dynamic sampling) and softly penalise completions
    in the last quarter before max_new_tokens (overlong shaping): `rollout_options`."""
    return clipped_surrogate(logprobs, old_logprobs, advantages, rl.clip_low, rl.clip_high)


dapo_policy_loss.aggregation = "token"
dapo_policy_loss.dynamic_sampling = True
dapo_policy_loss.overlong_fraction = 0.25


def rollout_options(rl: RLConfig) -> tuple[bool, int]:
    """(dynamic sampling on, overlong buffer in tokens): rl's setting, or on "auto" / -1 what
    the rl.loss_type entry asks for."""
    entry = POLICY_LOSSES[rl.loss_type]
    dynamic = getattr(entry, "dynamic_sampling", False) if rl.dynamic_sampling == "auto" else rl.dynamic_sampling == "on"
    buffer = rl.overlong_buffer if rl.overlong_buffer >= 0 else int(rl.max_new_tokens * getattr(entry, "overlong_fraction", 0))
    return dynamic, buffer


def overlong_penalty(lengths, finished, max_new: int, buffer: int, penalty: float = 1.0) -> np.ndarray:
    """DAPO's soft overlong punishment: 0 up to max_new - buffer tokens, then falling linearly to
    -penalty at max_new; a completion cut off without finishing gets -penalty. [N] -> [N]."""
    n = np.asarray(lengths, np.float64)
    ramp = np.clip((n - (max_new - buffer)) / max(buffer, 1), 0.0, 1.0) if buffer > 0 else np.zeros_like(n)
    return -penalty * np.where(np.asarray(finished, bool), ramp, 1.0)


def tis_weights(trainer_logps, sampler_logps, mask, cap: float):
    """Truncated importance sampling (Yao et al. 2025): min(exp(logp_trainer - logp_sampler), cap)
    per generated token, correcting the sampler/trainer mismatch; 0 off the mask."""
    w = jnp.exp(jnp.asarray(trainer_logps, jnp.float32) - jnp.asarray(sampler_logps, jnp.float32))
    return jnp.minimum(w, cap) * jnp.asarray(mask, jnp.float32)


def live_groups(scores, group_size: int):
    """[N] rewards -> [N // G] bool: the group's rewards are not all equal (it has a signal).
    numpy in, numpy out (host dynamic sampling); jax in, jax out (the jitted scoring)."""
    xp = np if isinstance(scores, np.ndarray) else jnp
    g = xp.asarray(scores).reshape(-1, group_size)
    return g.max(1) > g.min(1)


def masked_mean(x, mask):
    m = jnp.asarray(mask, jnp.float32)
    return (x * m).sum() / jnp.maximum(m.sum(), 1.0)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low: float = 0.2, clip_high: float = 0.2):
    """Masked token-mean of max(-A*r, -A*clip(r, 1-clip_low, 1+clip_high)), r = exp(logp - old).
    -> (loss, {"clip_fraction", "approx_kl"})."""
    per_tok, was_clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_low, clip_high)
    approx_kl = 0.5 * jnp.square(jnp.asarray(logprobs) - jnp.asarray(old_logprobs))
    return masked_mean(per_tok, mask), {"clip_fraction": masked_mean(was_clipped, mask),
                                        "approx_kl": masked_mean(approx_kl, mask)}


def value_terms(values, old_values, returns, clip):
    """Per-token 0.5*max((V-R)^2, (V_clipped-R)^2), V_clipped = V_old + clip(V-V_old, ±clip)."""
    v, ov, R = (jnp.asarray(x, jnp.float32) for x in (values, old_values, returns))
    v_clipped = ov + jnp.clip(v - ov, -clip, clip)
    return 0.5 * jnp.maximum(jnp.square(v - R), jnp.square(v_clipped - R))


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """Masked token-mean of value_terms."""
    return masked_mean(value_terms(values, old_values, returns, clip), mask)


def aggregate(per_tok, mask, how: str, max_tokens: int = 0, seqs: Sequences = ROWS):
    """-> (sum, denom): token-level (all tokens weigh the same), sequence-level (each sequence's
    token mean weighs the same) or constant (the token sum over sequences x max_tokens, Dr. GRPO).
    A sum and a denominator, so micro-batch accumulation stays exact; `seqs` says which tokens
    make a sequence (rows, or packed ids)."""
    m = mask.astype(jnp.float32)
    if how == "constant":
        has = (seqs.sums(m) > 0).astype(jnp.float32)
        return (per_tok * m).sum(), has.sum() * max_tokens
    if how == "sequence":
        counts = seqs.sums(m)
        per_seq = seqs.sums(per_tok * m) / jnp.maximum(counts, 1.0)
        has = (counts > 0).astype(jnp.float32)
        return (per_seq * has).sum(), has.sum()
    return (per_tok * m).sum(), m.sum()


# ---- advantage estimators ---------------------------------------------------------------------------
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


# ---- more advantage estimators and policy losses (public math) -------------------------------------
def rloo_advantages(rewards, group_size: int):
    """RLOO (Ahmadian et al. 2024): each reward minus the mean of the other G-1 rewards of its group.
    Flat [N*G] -> [N*G]."""
    r = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
    others = (r.sum(axis=1, keepdims=True) - r) / (group_size - 1)
    return (r - others).reshape(-1)


def reinforce_pp_advantages(rewards, mask):
    """REINFORCE++ (Hu 2025): per-token returns (sum of the rewards from t to the end, gamma 1) of
    [N, T] token rewards, whitened over every masked token of the batch; 0 off the mask."""
    r = jnp.asarray(rewards, jnp.float32) * jnp.asarray(mask, jnp.float32)
    m = jnp.asarray(mask, jnp.float32)
    returns = jnp.flip(jnp.cumsum(jnp.flip(r, -1), -1), -1)
    n = jnp.maximum(m.sum(), 1.0)
    mu = (returns * m).sum() / n
    sd = jnp.sqrt((jnp.square(returns - mu) * m).sum() / n)
    return (returns - mu) / (sd + 1e-8) * m


def gspo_ratio(logps, old_logps, mask, seqs: Sequences = ROWS):
    """GSPO (Zheng et al. 2025): the sequence-level importance ratio exp(mean over the sequence's
    masked tokens of logp - old_logp). [N, T] -> [N]."""
    m = jnp.asarray(mask, jnp.float32)
    d = (jnp.asarray(logps, jnp.float32) - jnp.asarray(old_logps, jnp.float32)) * m
    return jnp.exp(seqs.sums(d) / jnp.maximum(seqs.sums(m), 1.0))


def _masked_moments(x, m):
    """Mean and variance of x over mask m (float 0/1), without boolean indexing (traceable)."""
    n = jnp.maximum(m.sum(), 1.0)
    mu = (x * m).sum() / n
    return mu, (jnp.square(x - mu) * m).sum() / n


def whiten(x, mask):
    m = jnp.asarray(mask, jnp.float32)
    mu, var = _masked_moments(x, m)
    return jnp.where(m > 0, (x - mu) / (jnp.sqrt(var) + 1e-8), 0.0)


@dataclasses.dataclass
class Scored:
    """One scored rollout, what every advantage estimator may read. Estimators are traced inside
    the rollout's one jitted scoring function (jax arrays in, jax arrays out: no host math)."""
    scores: jax.Array  # [N] sequence rewards
    loss_mask: jax.Array  # [N, T] 1 on generated tokens
    token_kl: jax.Array  # [N, T] per-token KL estimate to the reference (masked, clamped)
    kl_coef: jax.Array  # scalar (the adaptive controller's value: an input, not a constant)
    group_size: int
    values: Optional[jax.Array] = None  # [N, T] critic values (actor-critic objectives)


def _per_sequence(s: Scored, adv, metrics: dict) -> tuple[dict, dict]:
    """Sequence advantages [N] on every generated token; groups whose rewards are all equal train
    nothing (their advantages are 0 and they would only add KL)."""
    live = jnp.repeat(live_groups(jnp.asarray(s.scores), s.group_size), s.group_size)
    loss_mask = jnp.asarray(s.loss_mask) * live[:, None].astype(jnp.asarray(s.loss_mask).dtype)
    return ({"loss_mask": loss_mask, "advantages": (adv[:, None] * loss_mask).astype(jnp.float32)},
            {**metrics, "live_group_fraction": live.astype(jnp.float32).mean()})


def _with_final_reward(s: Scored, m):
    """Per-token rewards: -kl_coef * KL, plus the sequence reward at its last generated token."""
    rewards = -s.kl_coef * jnp.asarray(s.token_kl, jnp.float32) * m
    return rewards.at[jnp.arange(m.shape[0]), last_token_index(m)].add(jnp.asarray(s.scores, jnp.float32))


@ADVANTAGES.register("group")
def group_estimator(s: Scored, rl: RLConfig) -> tuple[dict, dict]:
    """GRPO: reward minus its group's mean (over std, or not: rl.advantage_norm=mean is Dr. GRPO),
    the same for every token of a sequence."""
    adv = group_advantages(s.scores, s.group_size, normalize_std=rl.advantage_norm == "std")
    return _per_sequence(s, adv, {})


@ADVANTAGES.register("rloo")
def rloo_estimator(s: Scored, rl: RLConfig) -> tuple[dict, dict]:
    """RLOO: reward minus the mean of the group's other samples, the same for every token."""
    return _per_sequence(s, rloo_advantages(s.scores, s.group_size), {})


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp_estimator(s: Scored, rl: RLConfig) -> tuple[dict, dict]:
    """REINFORCE++: token rewards -kl_coef * KL plus the sequence reward at its last token, returns
    to the end, whitened over the batch. No critic and no groups."""
    m = jnp.asarray(s.loss_mask, jnp.float32)
    return {"advantages": reinforce_pp_advantages(_with_final_reward(s, m), m)}, {}


@ADVANTAGES.register("gae")
def gae_estimator(s: Scored, rl: RLConfig) -> tuple[dict, dict]:
    """PPO: per-token reward -kl_coef * KL, plus the sequence reward at its last token; GAE with
    the critic's values; returns for the value loss."""
    m = jnp.asarray(s.loss_mask, jnp.float32)
    values = jnp.asarray(s.values, jnp.float32) * m
    adv, returns = gae(_with_final_reward(s, m), values, m, rl.gamma, rl.lam)
    var = _masked_moments(returns, m)[1]
    explained = jnp.where(var > 0, 1.0 - _masked_moments(returns - values, m)[1] / jnp.where(var > 0, var, 1.0), 0.0)
    return ({"old_values": values, "returns": returns,
             "advantages": whiten(adv, m) if rl.whiten_advantages else adv},
            {"value_explained_var": explained})


gae_estimator.needs_values = True  # only for objectives with a critic (Objective.model=actor_critic)
group_estimator.needs_groups = rloo_estimator.needs_groups = True  # rl.group_size >= 2
