"""Batched autoregressive sampling with a preallocated KV cache, all inside one jit.

Prompts are left-padded to width P (right-padded prompts are realigned on the host first); the
cache has S = P + max_new slots. One prefill pass writes the prompt's keys/values, then a
`lax.while_loop` decodes one token per step for every sequence until each has produced EOS or
max_new tokens. Returned log-probs are log softmax(logits / temperature) of the chosen token,
i.e. what a teacher-forced forward pass at that temperature gives (tested), before top-k/top-p.
The cache and batch are sharded by the same logical rules as training (`batch`, `act_kv_heads`).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.data.tokenizer import EOS_ID, PAD_ID
from jaxllm.sharding import constrain, use_mesh_rules


@dataclasses.dataclass
class Rollout:
    """Host or device arrays: tokens/logps/mask [B, max_new]; mask is 1 on generated tokens
    (EOS included); finished says whether EOS was produced."""
    tokens: jax.Array
    logps: jax.Array
    mask: jax.Array
    finished: jax.Array


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=None):
    """Per layer (k, v), each [B, S, K, Dh]; one stacked [L, B, S, K, Dh] pair when scanning."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, slots, cfg.n_kv_heads, cfg.head_dim)
    axes = ("batch", None, "act_kv_heads", None)
    if cfg.scan_layers:
        z = constrain(jnp.zeros((cfg.n_layers, *shape), dtype), (None, *axes))
        return (z, z)
    z = constrain(jnp.zeros(shape, dtype), axes)
    return [(z, z) for _ in range(cfg.n_layers)]


def filter_logits(logits, top_k: int = 0, top_p=1.0):
    """[..., V] -> logits with everything outside the top-k / top-p nucleus set to -inf.
    top_k is static (0 = off); top_p may be traced (1.0 = off)."""
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    def nucleus(x):
        sorted_desc = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(x < cutoff, -jnp.inf, x)
    # the vocabulary sort is the costliest op of a decode step on CPU: skip it when top_p is off
    return jax.lax.cond(top_p < 1.0, nucleus, lambda x: x, logits)


def sample_token(key, logits, temperature, top_k: int, top_p):
    """logits [B, V] float32 -> (token [B], log-prob of it at this temperature [B])."""
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    tok = jax.lax.cond(greedy, lambda: jnp.argmax(logits, -1).astype(jnp.int32),
                       lambda: jax.random.categorical(key, filter_logits(scaled, top_k, top_p)).astype(jnp.int32))
    logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, -1), tok[:, None], -1)[:, 0]
    return tok, logp


def prompt_layout(prompt):
    """Left-padded [B, P] -> (segment ids: 1 on real tokens, positions from 0 at the first one)."""
    seg = (jnp.cumsum(prompt != PAD_ID, axis=1) > 0).astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    return seg, pos


@partial(jax.jit, static_argnames=("max_new", "top_k", "mesh", "rules"))
def _generate(graphdef, state, prompt, rng, temperature, top_p, eos_id, eos2, *, max_new: int, top_k: int,
              mesh=None, rules=None):
    with use_mesh_rules(mesh, dict(rules or ())):
        model = nnx.merge(graphdef, state)
        B, P = prompt.shape
        seg, pos = prompt_layout(prompt)
        kv_segments = jnp.concatenate([seg, jnp.ones((B, max_new), jnp.int32)], axis=1)  # [B, S]
        cache = init_cache(model.cfg, B, P + max_new)
        h, cache = model.hidden_cached(prompt, pos, seg, cache=cache, cache_index=0, kv_segments=kv_segments)
        logits = model.logits(h[:, -1:])[:, 0]  # [B, V]
        next_pos = seg.sum(1)  # [B] position of the first generated token

        def cond(c):
            return (c["t"] < max_new) & ~jnp.all(c["done"])

        def body(c):
            rng, key = jax.random.split(c["rng"])
            tok, logp = sample_token(key, c["logits"], temperature, top_k, top_p)
            live = ~c["done"]
            tok = jnp.where(live, tok, PAD_ID)
            t = c["t"]
            out = {"tokens": c["tokens"].at[:, t].set(tok),
                   "logps": c["logps"].at[:, t].set(jnp.where(live, logp, 0.0)),
                   "mask": c["mask"].at[:, t].set(live.astype(jnp.int32))}
            done = c["done"] | (tok == eos_id) | (tok == eos2)
            h, cache = model.hidden_cached(tok[:, None], (next_pos + t)[:, None], jnp.ones((B, 1), jnp.int32),
                                           cache=c["cache"], cache_index=P + t, kv_segments=kv_segments)
            return {**out, "t": t + 1, "done": done, "rng": rng, "cache": cache,
                    "logits": model.logits(h)[:, 0]}

        init = {"t": jnp.int32(0), "done": jnp.zeros((B,), bool), "rng": rng, "cache": cache, "logits": logits,
                "tokens": jnp.full((B, max_new), PAD_ID, jnp.int32), "logps": jnp.zeros((B, max_new), jnp.float32),
                "mask": jnp.zeros((B, max_new), jnp.int32)}
        c = jax.lax.while_loop(cond, body, init)
        finished = jnp.any((c["tokens"] == eos_id) | (c["tokens"] == eos2), axis=1) & (c["mask"].sum(1) > 0)
        return Rollout(c["tokens"], c["logps"], c["mask"], finished)


jax.tree_util.register_dataclass(Rollout, data_fields=["tokens", "logps", "mask", "finished"], meta_fields=[])


def left_align(prompts: np.ndarray, padding: str = "left") -> np.ndarray:
    """Right-padded prompts -> left-padded (the sampler's layout)."""
    if padding == "left":
        return prompts
    out = np.full_like(prompts, PAD_ID)
    for i, row in enumerate(prompts):
        real = row[row != PAD_ID]
        out[i, prompts.shape[1] - len(real):] = real
    return out


def generate_ids(graphdef, state, prompts, max_new: int, *, rng=None, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, eos_id: int = EOS_ID, mesh=None, rules=None,
                 padding: str = "left", stop_on_eos: bool = True) -> Rollout:
    """prompts [B, P] int (host or global array; left-padded unless padding="right") -> Rollout.
    A sequence stops at eos_id (e.g. the chat `<|end|>`) and, if stop_on_eos, at EOS; pass
    eos_id=-1, stop_on_eos=False to always generate max_new tokens (benchmarks)."""
    if isinstance(prompts, np.ndarray):
        prompts = jnp.asarray(left_align(prompts, padding))
    rng = jax.random.key(0) if rng is None else rng
    return _generate(graphdef, state, prompts, rng, jnp.float32(temperature), jnp.float32(top_p),
                     jnp.int32(eos_id), jnp.int32(EOS_ID if stop_on_eos else -1), max_new=max_new, top_k=top_k, mesh=mesh,
                     rules=tuple(sorted(rules.items())) if rules else None)  # hashable: a static arg


def pad_prompts(prompts: Sequence[Sequence[int]], width: Optional[int] = None) -> np.ndarray:
    width = width or max(len(p) for p in prompts)
    out = np.full((len(prompts), width), PAD_ID, np.int32)
    for i, p in enumerate(prompts):
        p = list(p)[-width:]
        out[i, width - len(p):] = p
    return out


def cut_at_stop(row: Sequence[int], stop_ids: Sequence[int] = (EOS_ID,)) -> list[int]:
    row = list(row)
    ends = [row.index(s) for s in stop_ids if s in row]
    row = row[:min(ends)] if ends else row
    return [t for t in row if t != PAD_ID]
