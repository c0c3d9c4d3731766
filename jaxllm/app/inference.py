"""Loading a checkpoint into a model, and a simple jitted sampler for eyeballing models.

`generate` uses the KV-cache sampler (core/sampler.py: sample_ids). `_sample` recomputes the whole
left-padded buffer every step: the slow, obviously-correct reference the sampler is tested and
benchmarked against.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.core import checkpoint as ckpt_lib
from jaxllm.core.arrays import positions_from_segments
from jaxllm.core.loading import load_model as core_load_model
from jaxllm.core.model import ActorCritic, ScalarHeadModel
from jaxllm.core.sampler import sample_ids
from jaxllm.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from jaxllm.errors import CheckpointError
from jaxllm.objectives import model_class


def load_model(path: str, mesh=None, tokenizer: str = ""):
    """Checkpoint (run dir or step dir) -> (the LM with its params, Tokenizer, metadata). A PPO
    checkpoint gives its actor; a reward model has no LM head and is refused."""
    src, step = ckpt_lib.open_for_read(path)
    meta = src.metadata(step)
    src.close()
    cls = model_class(meta.get("objective", ""))
    if cls is ScalarHeadModel:
        raise CheckpointError(f"checkpoint {path} is a reward/value model (scalar head): it has no LM head "
                              f"to generate with")
    model, meta = core_load_model(path, cls, mesh)
    tok = Tokenizer(tokenizer or (meta.get("tokenizer") or {}).get("path", ""))
    return (model.actor if isinstance(model, ActorCritic) else model), tok, meta


@jax.jit(static_argnames=("max_new",))
def _sample(graphdef, state, buf, rng, temperature, max_new: int, stop_id=EOS_ID, pad_id=PAD_ID):
    """The reference sampler: buf [B, L] = left-padded prompts then max_new pad slots. stop_id: one
    id or an array of ids. Defaults: jaxllm's own tokenizers' ids."""
    model = nnx.merge(graphdef, state)
    B, L = buf.shape
    start = L - max_new
    stops = jnp.atleast_1d(jnp.asarray(stop_id, jnp.int32))

    def body(t, carry):
        buf, done, rng = carry
        seg = (jnp.cumsum(buf != pad_id, axis=1) > 0).astype(jnp.int32)  # left pad -> segment 0
        logits = model(buf, positions_from_segments(seg), seg)[:, t - 1]  # [B, V]
        rng, k = jax.random.split(rng)
        greedy = jnp.argmax(logits, -1)
        sampled = jax.random.categorical(k, logits / jnp.maximum(temperature, 1e-6))
        nxt = jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
        nxt = jnp.where(done, pad_id, nxt)
        buf = buf.at[:, t].set(nxt)
        return buf, done | jnp.any(nxt[:, None] == stops, axis=-1), rng

    buf, _, _ = jax.lax.fori_loop(start, L, body, (buf, jnp.zeros((B,), bool), rng))
    return buf[:, start:]


def generate(model, tok: Tokenizer, prompts: Sequence[str], max_new: int = 64, temperature: float = 0.0,
             seed: int = 0, bos: bool = True, top_k: int = 0, top_p: float = 1.0) -> list[str]:
    """Text prompts -> continuations, stopping at the tokenizer's eos ids."""
    ids = [tok.encode(p, bos=bos) for p in prompts]
    width = max(len(x) for x in ids)
    if width + max_new > model.cfg.max_seq_len:
        max_new = max(1, model.cfg.max_seq_len - width)
    outs = sample_ids(model, ids, max_new, temperature, seed, tok.eos_ids, top_k, top_p, pad_id=tok.pad_id)
    return [tok.decode(o) for o in outs]
