"""Batched autoregressive sampling with a preallocated KV cache, all inside one jit.

Prompts are left-padded to width P (right-padded prompts are realigned on the host first); the
cache has S = P + max_new slots. One prefill pass writes the prompt's keys/values, then a
`lax.while_loop` decodes one token per step for every sequence until each has produced a stop id or
max_new tokens. Token ids come from the caller (a tokenizer's eos/stop ids and pad id); the
defaults are jaxllm's own tokenizers' (pad 0, EOS 3). A `prompt_mask` (1 on real prompt tokens)
says where the left padding ends; without one, leading pad ids are taken as padding. Returned
log-probs are log softmax(logits / temperature) of the chosen token, i.e. what a teacher-forced
forward pass at that temperature gives (tested), before top-k/top-p. The cache and batch are
sharded by the same logical rules as training (`batch`, `act_kv_heads`).

Decode attention (`decode_impl`): "xla" attends over all S slots each step with a mask; "paged"
keeps a compacted cache (each row's real tokens from slot 0, left padding dropped) and reads only
each row's valid slots with the Pallas paged-attention kernel (core/decode.py). "auto" picks paged
on TPU when model.attention_impl is auto or splash, xla elsewhere.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.data.tokenizer import EOS_ID, PAD_ID
from jaxllm.core import decode as paged_decode
from jaxllm.core.arrays import positions_from_segments
from jaxllm.core.sharding import constrain, use_mesh_rules


@dataclasses.dataclass
class Rollout:
    """Host or device arrays: tokens/logps/mask [B, max_new]; mask is 1 on generated tokens
    (the stop token included); finished says whether a stop id was produced."""
    tokens: jax.Array
    logps: jax.Array
    mask: jax.Array
    finished: jax.Array


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=None, paged: bool = False):
    """Per layer (k, v), each [B, S, K, Dh]; one stacked [L, B, S, K, Dh] pair when scanning.
    paged=True: the decode kernel's layout [K, B, S', Dh] (S' = S rounded up to whole pages)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    if paged:
        shape = (cfg.n_kv_heads, batch, paged_decode.padded_slots(slots), cfg.head_dim)
        axes = ("act_kv_heads", "batch", None, None)
    else:
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


def prompt_layout(prompt, pad_id=PAD_ID, prompt_mask=None):
    """Left-padded [B, P] -> (segment ids: 1 on real tokens, positions from 0 at the first one).
    The segment ids are prompt_mask when given, else 0 on the leading pad_id tokens."""
    if prompt_mask is None:
        seg = (jnp.cumsum(prompt != pad_id, axis=1) > 0).astype(jnp.int32)
    else:
        seg = (prompt_mask > 0).astype(jnp.int32)
    return seg, positions_from_segments(seg)


def _is_stop(tok, stops):
    """tok [...] vs stops [S] -> bool [...]."""
    return jnp.any(tok[..., None] == stops, axis=-1)


@partial(jax.jit, static_argnames=("max_new", "top_k", "mesh", "rules", "decode_impl"))
def _generate(graphdef, state, prompt, prompt_mask, rng, temperature, top_p, stops, pad_id, *, max_new: int,
              top_k: int, mesh=None, rules=None, decode_impl: str = "auto"):
    with use_mesh_rules(mesh, dict(rules or ())):
        model = nnx.merge(graphdef, state)
        B, P = prompt.shape
        seg, pos = prompt_layout(prompt, pad_id, prompt_mask)
        kv_segments = jnp.concatenate([seg, jnp.ones((B, max_new), jnp.int32)], axis=1)  # [B, S]
        # paged: a compacted cache, row b's n_b prompt tokens at slots [0, n_b), step t's token at n_b + t
        paged = paged_decode.use_paged(model.cfg, decode_impl)
        cache = init_cache(model.cfg, B, P + max_new, paged=paged)
        where = {"kv_lengths": jnp.zeros((B,), jnp.int32)} if paged else {"cache_index": 0, "kv_segments": kv_segments}
        h, cache = model.hidden_cached(prompt, pos, seg, cache=cache, **where)
        logits = model.logits(h[:, -1:])[:, 0]  # [B, V]
        next_pos = seg.sum(1)  # [B] position of the first generated token

        def cond(c):
            return (c["t"] < max_new) & ~jnp.all(c["done"])

        def body(c):
            rng, key = jax.random.split(c["rng"])
            tok, logp = sample_token(key, c["logits"], temperature, top_k, top_p)
            live = ~c["done"]
            tok = jnp.where(live, tok, pad_id)
            t = c["t"]
            out = {"tokens": c["tokens"].at[:, t].set(tok),
                   "logps": c["logps"].at[:, t].set(jnp.where(live, logp, 0.0)),
                   "mask": c["mask"].at[:, t].set(live.astype(jnp.int32))}
            done = c["done"] | _is_stop(tok, stops)
            if paged:  # a finished row writes nothing and reads no keys (length 0: the kernel skips its pages)
                going = ~done
                h, cache = model.hidden_cached(tok[:, None], (next_pos + t)[:, None], going.astype(jnp.int32)[:, None],
                                               cache=c["cache"], kv_lengths=jnp.where(going, next_pos + t, 0))
            else:
                h, cache = model.hidden_cached(tok[:, None], (next_pos + t)[:, None], jnp.ones((B, 1), jnp.int32),
                                               cache=c["cache"], cache_index=P + t, kv_segments=kv_segments)
            return {**out, "t": t + 1, "done": done, "rng": rng, "cache": cache,
                    "logits": model.logits(h)[:, 0]}

        init = {"t": jnp.int32(0), "done": jnp.zeros((B,), bool), "rng": rng, "cache": cache, "logits": logits,
                "tokens": jnp.full((B, max_new), pad_id, jnp.int32), "logps": jnp.zeros((B, max_new), jnp.float32),
                "mask": jnp.zeros((B, max_new), jnp.int32)}
        c = jax.lax.while_loop(cond, body, init)
        finished = jnp.any(_is_stop(c["tokens"], stops) & (c["mask"] > 0), axis=1)
        return Rollout(c["tokens"], c["logps"], c["mask"], finished)


jax.tree_util.register_dataclass(Rollout, data_fields=["tokens", "logps", "mask", "finished"], meta_fields=[])


def left_align(prompts: np.ndarray, padding: str = "left", pad_id: int = PAD_ID) -> np.ndarray:
    """Right-padded prompts (trailing pad_id tokens) -> left-padded (the sampler's layout)."""
    if padding == "left":
        return prompts
    out = np.full_like(prompts, pad_id)
    for i, row in enumerate(prompts):
        real = np.nonzero(row != pad_id)[0]
        n = real[-1] + 1 if len(real) else 0
        out[i, prompts.shape[1] - n:] = row[:n]
    return out


def _stop_array(eos_id) -> jax.Array:
    ids = [eos_id] if isinstance(eos_id, (int, np.integer)) else list(eos_id)
    return jnp.asarray(ids or [-1], jnp.int32)  # -1 never matches: () means "never stop"


def generate_ids(graphdef, state, prompts, max_new: int, *, rng=None, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, eos_id: Union[int, Sequence[int]] = EOS_ID,
                 pad_id: int = PAD_ID, prompt_mask=None, mesh=None, rules=None, padding: str = "left",
                 decode_impl: str = "auto") -> Rollout:
    """prompts [B, P] int (host or global array; left-padded unless padding="right") -> Rollout.
    A sequence stops at any id in eos_id: one id or several (a tokenizer's eos_ids, a chat format's
    stop_ids); eos_id=() always generates max_new tokens (benchmarks). pad_id fills finished rows.
    prompt_mask [B, P]: 1 on real prompt tokens (left-padded prompts only); None: leading pad_id
    tokens are padding. decode_impl: "auto" | "xla" | "paged" (the module docstring)."""
    if decode_impl not in paged_decode.DECODE_IMPLS:
        raise ValueError(f"decode_impl={decode_impl!r}: choose one of {', '.join(paged_decode.DECODE_IMPLS)}")
    if isinstance(prompts, np.ndarray):
        prompts = jnp.asarray(left_align(prompts, padding, pad_id))
    if prompt_mask is not None and not isinstance(prompt_mask, jax.Array):
        prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(graphdef, state, prompts, prompt_mask, rng, jnp.float32(temperature), jnp.float32(top_p),
                     _stop_array(eos_id), jnp.int32(pad_id), max_new=max_new, top_k=top_k, mesh=mesh,
                     rules=tuple(sorted(rules.items())) if rules else None,  # hashable: a static arg
                     decode_impl=decode_impl)


def pad_prompts(prompts: Sequence[Sequence[int]], width: Optional[int] = None, pad_id: int = PAD_ID) -> np.ndarray:
    """Token-id prompts -> left-padded [B, width] (longer prompts keep their last `width` tokens)."""
    width = width or max(len(p) for p in prompts)
    out = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        p = list(p)[-width:]
        out[i, width - len(p):] = p
    return out


def prompt_masks(prompts: Sequence[Sequence[int]], width: Optional[int] = None) -> np.ndarray:
    """The prompt_mask of pad_prompts(prompts, width): 1 on the real tokens."""
    width = width or max(len(p) for p in prompts)
    out = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        out[i, width - min(len(p), width):] = 1
    return out


def completions(tokens, mask, stop_ids: Sequence[int]) -> list[list[int]]:
    """Rollout tokens/mask [B, M] -> per row the generated ids before the first stop id."""
    stops = set(int(s) for s in stop_ids)
    out = []
    for row, live in zip(np.asarray(tokens).tolist(), np.asarray(mask).tolist()):
        ids = [t for t, m in zip(row, live) if m]
        cut = next((j for j, t in enumerate(ids) if t in stops), len(ids))
        out.append(ids[:cut])
    return out


def sample_ids(model, prompts: Sequence[Sequence[int]], max_new: int, temperature: float = 0.0, seed: int = 0,
               stop_ids: Union[int, Sequence[int]] = (EOS_ID,), top_k: int = 0, top_p: float = 1.0,
               pad_id: int = PAD_ID) -> list[list[int]]:
    """Token-id prompts -> generated ids (KV-cache sampler), cut before the first stop id. Pass the
    tokenizer's ids: tok.eos_ids for text, tok.chat.stop_ids for chat prompts, tok.pad_id."""
    graphdef, state = nnx.split(model)
    stop_ids = (stop_ids,) if isinstance(stop_ids, int) else tuple(stop_ids)
    out = generate_ids(graphdef, state, pad_prompts(prompts, pad_id=pad_id), max_new, rng=jax.random.key(seed),
                       temperature=temperature, top_k=top_k, top_p=top_p, eos_id=stop_ids, pad_id=pad_id,
                       prompt_mask=prompt_masks(prompts))
    return completions(out.tokens, out.mask, stop_ids)
