"""Small array helpers every layer shares: positions and last-token indices from segment ids, and
host arrays to global (sharded) jax arrays. Each exists once; numpy in, numpy out, jax in, jax out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.core.sharding import batch_sharding


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def positions_from_segments(segment_ids):
    """[B, T] segment ids of one sequence per row (0 = padding, on the left, the right or both) ->
    int32 positions counting from 0 at the row's first real token (padding before it gets 0)."""
    xp = _xp(segment_ids)
    return xp.maximum(xp.cumsum(segment_ids != 0, axis=-1) - 1, 0).astype(xp.int32)


def last_token_index(segment_ids):
    """[B, T] segment ids (0 = padding, anywhere) -> [B] index of the last real token."""
    xp = _xp(segment_ids)
    T = segment_ids.shape[-1]
    return T - 1 - xp.argmax(segment_ids[..., ::-1] != 0, axis=-1)


def host_to_global(x: np.ndarray, mesh, rules, leading: int = 0, *, process_local: bool = True) -> jax.Array:
    """Host array -> global jax array sharded over the batch axis (after `leading` unsharded axes).

    process_local=True: `x` is this process's slice of the batch (the input pipeline's rows);
    False: every process holds the same whole array (rollouts, held-out prompts)."""
    sharding = batch_sharding(mesh, rules, x.ndim, leading)
    if process_local:
        return jax.make_array_from_process_local_data(sharding, x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_global(batch: dict, mesh, rules, grad_accum: int = 1) -> dict:
    """Per-process numpy batch [b, ...] -> global jax arrays [A, b/A, ...] (micro-batch index
    first, unsharded; A = grad_accum). Text fields (prompts, reference answers) stay on the host."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype.kind in "USO":
            continue
        v = v.reshape(grad_accum, v.shape[0] // grad_accum, *v.shape[1:])
        out[k] = host_to_global(v, mesh, rules, leading=1)
    return out
