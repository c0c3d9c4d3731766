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
    correct = jnp.argmax(logits, axis=-1) == targets
    return logz - target_logit, logz, correct


@register_loss("causal_lm")
def causal_lm_loss(model, batch, ctx: LossContext) -> LossOut:
    """Next-token cross-entropy on `loss_mask` positions (+ optional z-loss on log Z)."""
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"], causal=True)
    nll, logz, correct = token_nll(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    n = mask.sum()
    nll_sum = (nll * mask).sum()
    z_sum = (jnp.square(logz) * mask).sum()
    loss_sum = nll_sum + ctx.cfg.z_loss * z_sum
    return LossOut(loss_sum, n, {"nll": (nll_sum, n), "accuracy": ((correct * mask).sum(), n),
                                 "z_loss": (z_sum, n)})


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
    logits = model(corrupted, batch["positions"], batch["segment_ids"], causal=False)
    nll, _, correct = token_nll(logits, tokens)
    sel = selected.astype(jnp.float32)
    n = sel.sum()
    nll_sum = (nll * sel).sum()
    return LossOut(nll_sum, n, {"nll": (nll_sum, n), "accuracy": ((correct * sel).sum(), n)})


# ---- public math API ----------------------------------------------------------------------
def sequence_logprobs(logits, tokens, mask):
    """Sum over unmasked positions of log_softmax(logits)[t, tokens[t]].

    logits [B, T, V] are already aligned with the tokens they score; tokens, mask [B, T] -> [B].
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok_logp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return (tok_logp * mask.astype(jnp.float32)).sum(-1)
