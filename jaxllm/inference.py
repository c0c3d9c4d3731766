"""Loading a checkpoint into a model, and a simple jitted sampler for eyeballing models.

`generate` / `sample_ids` use the KV-cache sampler (sampler.py). `_sample` recomputes the whole
left-padded buffer every step: the slow, obviously-correct reference the sampler is tested and
benchmarked against.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import checkpoint as ckpt_lib
from jaxllm.config import ModelConfig, from_dict
from jaxllm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from jaxllm.model import Transformer
from jaxllm.sharding import make_rules, state_shardings


def load_model(path: str, mesh=None, tokenizer: str = ""):
    """Checkpoint (run dir or step dir) -> (Transformer with its params, Tokenizer, metadata)."""
    src, step = ckpt_lib.open_for_read(path)
    meta = src.metadata(step)
    model_cfg = from_dict(ModelConfig, meta["model"], "model.")
    actor_critic = meta.get("objective") == "ppo"  # PPO checkpoints hold actor + critic
    if actor_critic:
        from jaxllm.rl import ActorCritic
        abstract = nnx.eval_shape(lambda: ActorCritic(model_cfg, nnx.Rngs(0)))
    else:
        abstract = nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0)))
    graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    if mesh is None:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    shard = state_shardings(abs_params, mesh, make_rules())
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_params, shard)
    params = src.restore(step, target)["params"]
    src.close()
    tok_path = tokenizer or (meta.get("tokenizer") or {}).get("path", "")
    tok = Tokenizer(tok_path)
    model = nnx.merge(graphdef, params, abs_rest)
    return (model.actor if actor_critic else model), tok, meta


def left_pad(prompts: Sequence[Sequence[int]], length: int) -> np.ndarray:
    out = np.full((len(prompts), length), PAD_ID, np.int32)
    for i, p in enumerate(prompts):
        p = list(p)[-length:]
        out[i, length - len(p):] = p
    return out


@jax.jit(static_argnames=("max_new",))
def _sample(graphdef, state, buf, rng, temperature, max_new: int, stop_id=EOS_ID):
    model = nnx.merge(graphdef, state)
    B, L = buf.shape
    start = L - max_new

    def body(t, carry):
        buf, done, rng = carry
        seg = (jnp.cumsum(buf != PAD_ID, axis=1) > 0).astype(jnp.int32)  # left pad -> segment 0
        pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
        logits = model(buf, pos, seg)[:, t - 1]  # [B, V]
        rng, k = jax.random.split(rng)
        greedy = jnp.argmax(logits, -1)
        sampled = jax.random.categorical(k, logits / jnp.maximum(temperature, 1e-6))
        nxt = jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
        nxt = jnp.where(done, PAD_ID, nxt)
        buf = buf.at[:, t].set(nxt)
        return buf, done | (nxt == EOS_ID) | (nxt == stop_id), rng

    buf, _, _ = jax.lax.fori_loop(start, L, body, (buf, jnp.zeros((B,), bool), rng))
    return buf[:, start:]


def sample_ids(model, prompts: Sequence[Sequence[int]], max_new: int, temperature: float = 0.0, seed: int = 0,
               stop_id: int = EOS_ID, top_k: int = 0, top_p: float = 1.0) -> list[list[int]]:
    """Token-id prompts -> generated ids (KV-cache sampler), cut before the first stop/EOS token."""
    from jaxllm.sampler import cut_at_stop, generate_ids, pad_prompts
    graphdef, state = nnx.split(model)
    out = generate_ids(graphdef, state, pad_prompts(prompts), max_new, rng=jax.random.key(seed),
                       temperature=temperature, top_k=top_k, top_p=top_p, eos_id=stop_id)
    return [cut_at_stop(row, (stop_id, EOS_ID)) for row in np.asarray(out.tokens).tolist()]


def generate(model, tok: Tokenizer, prompts: Sequence[str], max_new: int = 64, temperature: float = 0.0,
             seed: int = 0, bos: bool = True, top_k: int = 0, top_p: float = 1.0) -> list[str]:
    ids = [tok.encode(p, bos=bos) for p in prompts]
    width = max(len(x) for x in ids)
    if width + max_new > model.cfg.max_seq_len:
        max_new = max(1, model.cfg.max_seq_len - width)
    return [tok.decode(o) for o in sample_ids(model, ids, max_new, temperature, seed, EOS_ID, top_k, top_p)]
