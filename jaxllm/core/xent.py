"""Fused LM-head + cross-entropy: the [B, T, V] logits are never materialised.

With a 32k vocabulary the head is most of a small model's work (for the 20.6M benchmark model,
100 of 152 GFLOP per step) and its [B, T, V] float32 logits are the largest activations (262 MB
at batch 8 x 256). The plain path writes them, reads them for log-sum-exp and argmax, writes the
softmax gradient and reads it twice more. Here the tokens go through the head in chunks along the
sequence axis (batch sharding is kept), and because the loss is the last node of the graph the
gradient is computed in the same pass (as in Liger-kernel's fused linear cross-entropy): per chunk
    logits = h_c W;  p = softmax(logits);  dlogits = w (p (1 + 2 z lse) - onehot(target))
    dh_c = dlogits W^T;  dW += dlogits^T h_c
so the backward only scales the stored dh and dW by the incoming cotangent. Same FLOPs as the
plain forward + backward, no recomputation. Measured on the 2-core CPU (20.6M model, XLA profile):
the head + loss went from ~900 ms to ~600 ms per step.

Only the returned loss is differentiable; the metric sums are wrapped in stop_gradient. A token's
prediction counts as correct when its target logit equals the row maximum (ties count as correct;
an argmax over 32k columns costs ~140 ms per step on CPU).

`token_logps` (bottom) is the chunked head for losses built from per-token log-probs (DPO, PPO,
GRPO): it recomputes each chunk's logits in the backward instead.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxllm.core.sharding import constrain


def _sharded_like_head(dwt):
    """The [V, D] float32 head-gradient sum, split like the head weight (not a whole [V, D] on
    every device)."""
    return constrain(dwt, ("vocab", "embed"))


def _head_grad(dlogits, hc):
    """dlogits [N, V], hc [N, D] -> dW^T [V, D] float32, split like the head weight. The chunk's
    rows are gathered first (N is a few hundred tokens: dlogits is ~128 MiB in bf16 for a 128k
    vocabulary) so each device computes its own [V, D] block whole. Contracting the batch-sharded
    rows in place leaves a partial sum of the whole [V, D] on every device, which XLA:TPU
    all-reduced every chunk (2 GiB of float32 per chunk for Llama-3-8B; seen in the compiled
    step of jaxllm plan). Peak memory barely moves (-0.03 GiB per chip there): the point is the
    traffic, 128 MiB gathered instead of 2 GiB reduced per chunk."""
    dlogits, hc = constrain(dlogits, (None, "vocab")), constrain(hc, (None, "embed"))
    return _sharded_like_head(lax.dot_general(dlogits, hc, (((0,), (0,)), ((), ())),
                                              preferred_element_type=jnp.float32))


def chunking(batch: int, seq: int, chunk_tokens: int) -> tuple[int, int]:
    """-> (chunk length, number of chunks) along the sequence, with batch x length <= chunk_tokens
    (length >= 1) and the least padding: the sequence is padded to length x chunks. Rollout
    lengths (prompt + completion - 1) are often prime, so chunks cannot simply divide them."""
    want = max(1, chunk_tokens // max(batch, 1))
    n = -(-seq // want)
    return -(-seq // n), n


def _pad_seq(x, to: int):
    """[B, T, ...] -> [B, to, ...] zero-padded along the sequence (zero weight / cotangent there)."""
    return x if x.shape[1] == to else jnp.pad(x, [(0, 0), (0, to - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _split(x, length):
    """[B, T, ...] -> [T / length, B, length, ...]: chunks along the sequence keep batch sharding."""
    B, T = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, T // length, length, *x.shape[2:]), 1, 0)


def _unsplit(x):
    n, B, C = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(B, n * C, *x.shape[3:])


def _lse_stats(z):
    """float32 logits [N, V] -> (row max, exp(z - max), sum of those, log-sum-exp)."""
    m = z.max(-1)
    e = jnp.exp(z - m[:, None])
    s = e.sum(-1)
    return m, e, s, m + jnp.log(s)


def fused_xent(h, w, targets, weights, z_loss: float = 0.0, chunk_tokens: int = 512):
    """h [B, T, D] final hidden states, w [D, V] head weight (compute dtype), targets [B, T] int,
    weights [B, T] float (the loss mask) -> dict of scalars:
    loss = sum(weights * nll) + z_loss * sum(weights * lse^2)  (differentiable w.r.t. h and w),
    nll, z (sum of weights * lse^2) and correct (stop_gradient)."""
    length, n = chunking(h.shape[0], h.shape[1], chunk_tokens)
    T = length * n  # padded positions carry weight 0: they add nothing to any sum or gradient
    loss, sums = _fused(_pad_seq(h, T), w, _pad_seq(targets, T), _pad_seq(weights.astype(jnp.float32), T),
                        float(z_loss), length)
    nll, z, correct = (lax.stop_gradient(s) for s in sums)
    return {"loss": loss, "nll": nll, "z": z, "correct": correct}


def _chunk(hc, w, tc, wc, z_loss, need_dh, need_dw):
    """One chunk: hc [B, C, D], tc/wc [B, C] -> ((nll, z, correct) sums, dh [B, C, D] | None,
    dW^T [V, D] | None). Computed as 2-D [B*C, ...] matmuls (see model.dense for why)."""
    shape = hc.shape
    hc, tc, wc = hc.reshape(-1, shape[-1]), tc.reshape(-1), wc.reshape(-1)  # [N, D], [N], [N]
    logits = jnp.dot(hc, w, preferred_element_type=jnp.float32)  # [N, V]
    m, e, s, lse = _lse_stats(logits)
    target_logit = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    sums = (((lse - target_logit) * wc).sum(), (lse * lse * wc).sum(), ((target_logit >= m) * wc).sum())
    if not (need_dh or need_dw):
        return sums, None, None
    coef = wc * (1.0 + 2.0 * z_loss * lse) / s  # softmax scale and z-loss term per row
    onehot = jax.nn.one_hot(tc, w.shape[1], dtype=jnp.float32)
    dlogits = (e * coef[:, None] - onehot * wc[:, None]).astype(w.dtype)  # [N, V]
    dh = None
    if need_dh:
        dh = lax.dot_general(dlogits, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        dh = dh.astype(hc.dtype).reshape(shape)
    # [V, D] = dlogits^T h: on XLA:CPU this orientation runs ~1.5x faster than [D, V] for chunks
    dwt = _head_grad(dlogits, hc) if need_dw else None
    return sums, dh, dwt


def _run(h, w, targets, weights, z_loss, length, need_dh, need_dw):
    def body(carry, xs):
        sums, dwt = carry
        s, dh, dwt_c = _chunk(*xs[:1], w, *xs[1:], z_loss, need_dh, need_dw)
        sums = tuple(a + b for a, b in zip(sums, s))
        return (sums, _sharded_like_head(dwt + dwt_c) if need_dw else dwt), dh

    zero = jnp.zeros((), jnp.float32)
    dwt0 = _sharded_like_head(jnp.zeros(w.shape[::-1], jnp.float32)) if need_dw else None
    xs = tuple(_split(x, length) for x in (h, targets, weights))
    (sums, dwt), dh = lax.scan(body, ((zero, zero, zero), dwt0), xs)
    if need_dh:
        dh = _unsplit(dh)
    return (sums[0] + z_loss * sums[1], sums), dh, None if dwt is None else dwt.T.astype(w.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(h, w, targets, weights, z_loss, length):
    return _run(h, w, targets, weights, z_loss, length, False, False)[0]


def _fused_fwd(h, w, targets, weights, z_loss, length):
    # symbolic_zeros: `.perturbed` says whether h / w are being differentiated (frozen heads skip dW)
    out, dh, dw = _run(h.value, w.value, targets.value, weights.value, z_loss, length, h.perturbed, w.perturbed)
    return out, (dh, dw)


def _fused_bwd(z_loss, length, res, g):
    dh, dw = res
    g_loss = g[0]
    if isinstance(g_loss, SymbolicZero):
        return (None, None, None, None)
    return (None if dh is None else dh * g_loss.astype(dh.dtype),
            None if dw is None else dw * g_loss.astype(dw.dtype), None, None)


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


# ---- per-token log-probs and entropies (DPO, PPO, GRPO, rollout scoring) --------------------------
# These losses are not linear in the per-token values (DPO sums them per sequence and passes them
# through log-sigmoid; PPO through clipped ratios), so dW cannot be finished in the forward pass.
# Instead the forward keeps only lse and the mean logit per token, and the backward recomputes each
# chunk's logits: one more head matmul (4 instead of 3) for never holding [B, T, V] logits.
def token_logps(h, w, targets, temperature: float = 1.0, chunk_tokens: int = 512):
    """h [B, T, D], w [D, V], targets [B, T] -> (log-prob of each target [B, T], entropy [B, T]),
    both float32, under softmax(h w / temperature) (temperature <= 0 or 1 = unscaled). Equal to
    objectives.token_logps_and_entropy(logits, ...) but computed in token chunks; both outputs are
    differentiable w.r.t. h and w."""
    scale = 1.0 / temperature if temperature > 0 else 1.0
    B, T = targets.shape
    length, n = chunking(B, T, chunk_tokens)
    # padded positions are sliced off, so their cotangents are 0 and they add nothing to dh or dW
    logp, ent = _logps(_pad_seq(h, length * n), w, _pad_seq(targets, length * n), float(scale), length)
    return logp[:, :T], ent[:, :T]


def _scaled_logits(hc, w, scale):
    """hc [B, C, D] -> float32 logits [B*C, V] at the sampling temperature."""
    z = jnp.dot(hc.reshape(-1, hc.shape[-1]), w, preferred_element_type=jnp.float32)
    return z * scale if scale != 1.0 else z


def _logps_fwd_chunks(h, w, targets, scale, length):
    def body(_, xs):
        hc, tc = xs
        z = _scaled_logits(hc, w, scale)  # [N, V]
        _, e, s, lse = _lse_stats(z)
        mean_z = (e * z).sum(-1) / s  # E_p[z]; entropy = lse - E_p[z]
        tz = jnp.take_along_axis(z, tc.reshape(-1, 1), axis=-1)[:, 0]
        return None, tuple(x.reshape(tc.shape) for x in (tz - lse, lse - mean_z, lse))

    _, out = lax.scan(body, None, (_split(h, length), _split(targets, length)))
    return tuple(_unsplit(x) for x in out)  # logp, entropy, lse: [B, T]


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _logps(h, w, targets, scale, length):
    return _logps_fwd_chunks(h, w, targets, scale, length)[:2]


def _logps_fwd(h, w, targets, scale, length):
    logp, ent, lse = _logps_fwd_chunks(h.value, w.value, targets.value, scale, length)
    # which inputs need a gradient is kept in the residuals' structure (() or None), not as values
    flags = tuple(() if x.perturbed else None for x in (h, w))
    return (logp, ent), (h.value, w.value, targets.value, ent, lse, flags)


def _logps_bwd(scale, length, res, g):
    h, w, targets, ent, lse, flags = res
    need_dh, need_dw = (f is not None for f in flags)
    g_logp, g_ent = g
    use_logp, use_ent = not isinstance(g_logp, SymbolicZero), not isinstance(g_ent, SymbolicZero)
    if not (use_logp or use_ent) or not (need_dh or need_dw):
        return (None, None, None)
    zeros = jnp.zeros(targets.shape, jnp.float32)
    g_logp = g_logp if use_logp else zeros
    g_ent = g_ent if use_ent else zeros

    def body(dwt, xs):
        hc, tc, gl, ge, ent_c, lse_c = (x.reshape(-1, *x.shape[2:]) for x in xs)  # [N, ...]
        z = _scaled_logits(hc[None], w, scale)
        p = jnp.exp(z - lse_c[:, None])
        # d logp / dz = onehot - p;  d entropy / dz = -p (z - E_p[z]),  E_p[z] = lse - entropy
        dz = -p * gl[:, None]
        if use_ent:
            dz = dz - p * (z - (lse_c - ent_c)[:, None]) * ge[:, None]
        dz = dz + jax.nn.one_hot(tc, w.shape[1], dtype=jnp.float32) * gl[:, None]
        dz = (dz * scale if scale != 1.0 else dz).astype(w.dtype)  # through z = scale * h w
        dh = lax.dot_general(dz, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) \
            if need_dh else None
        if need_dw:  # [V, D] orientation, as in _chunk
            dwt = _sharded_like_head(dwt + _head_grad(dz, hc))
        return dwt, None if dh is None else dh.astype(h.dtype).reshape(xs[0].shape)

    dwt0 = _sharded_like_head(jnp.zeros(w.shape[::-1], jnp.float32)) if need_dw else None
    xs = tuple(_split(x, length) for x in (h, targets, g_logp, g_ent, ent, lse))
    dwt, dh = lax.scan(body, dwt0, xs)
    return (None if dh is None else _unsplit(dh), None if dwt is None else dwt.T.astype(w.dtype), None)


_logps.defvjp(_logps_fwd, _logps_bwd, symbolic_zeros=True)


# ---- a model's LM losses and log-probs: through the chunked heads above, or the plain logits path ----
def token_nll(logits, targets):
    """logits [B, T, V] (float32), targets [B, T] -> (nll [B, T], logsumexp [B, T], correct [B, T])."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    # "correct" = the target has the top logit (ties count); an argmax over V is ~5x slower on CPU
    correct = target_logit >= logits.max(axis=-1)
    return logz - target_logit, logz, correct


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


def lm_token_loss(model, tokens, positions, segment_ids, causal, targets, weights, z_loss: float,
                  chunk_tokens: int) -> dict:
    """Weighted next-token loss sums {loss, nll, z, correct} (scalars) of `model` on `tokens`.
    Through the fused chunked head + cross-entropy (jaxllm.core.xent) unless chunk_tokens=0."""
    h = model.hidden(tokens, positions, segment_ids, causal)  # [B, T, D]
    weights = weights.astype(jnp.float32)
    if chunk_tokens > 0:
        return fused_xent(h, model.head_weight(), targets, weights, z_loss, chunk_tokens)
    nll, logz, correct = token_nll(model.logits(h), targets)
    nll_sum, z_sum = (nll * weights).sum(), (jnp.square(logz) * weights).sum()
    return {"loss": nll_sum + z_loss * z_sum, "nll": nll_sum, "z": z_sum, "correct": (correct * weights).sum()}


def lm_token_logps(model, batch, temperature: float = 1.0, chunk_tokens: int = 512):
    """-> (log-prob of each target [B, T], entropy [B, T]) of the causal LM `model` on `batch`
    (inputs, positions, segment_ids, targets). Through the chunked head (jaxllm.core.xent.token_logps),
    which never holds [B, T, V] logits, unless chunk_tokens=0."""
    h = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"], True)  # [B, T, D]
    if chunk_tokens > 0:
        return token_logps(h, model.head_weight(), batch["targets"], temperature, chunk_tokens)
    return token_logps_and_entropy(model.logits(h), batch["targets"], temperature)
