"""Llama-family decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Shapes: B batch, T query length, S key length, D d_model, H heads, K kv heads, G = H // K,
Dh head_dim, F mlp_dim, V vocab. Every parameter carries logical axis names (metadata
`out_sharding`, read by sharding.state_shardings); activations are pinned with
sharding.constrain. The same weights serve causal (LM, SFT, RL) and bidirectional (masked LM)
attention; the caller picks with `causal=`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax.ad_checkpoint import checkpoint_name

from jaxllm.config import ModelConfig
from jaxllm.core import attention as attn_kernels
from jaxllm.core import decode as paged
from jaxllm.core.sharding import constrain

NEG_INF = -1e30  # finite, so fully-masked rows (padding) give a uniform softmax, not NaN


def _dtype(name: str):
    return jnp.dtype(name)


def _param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
    # eager_sharding=False: placement is decided by our rules table, not at creation.
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def dense(x, w, n_contract: int = 1):
    """Contracts the last `n_contract` dims of x with the first of w as one 2-D matmul.

    Same math as an einsum, but XLA:CPU runs the backward of [B, T, D] x [D, F] einsums several
    times slower than of [B*T, D] x [D, F] matmuls (measured 716 vs 258 ms for a 32k-vocab head);
    on TPU/GPU the reshapes are free."""
    lead, k_shape = x.shape[: x.ndim - n_contract], x.shape[x.ndim - n_contract:]
    out_shape = w.shape[n_contract:]
    k = math.prod(k_shape)
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1))
    return y.reshape(*lead, *out_shape)


# ---- LoRA -----------------------------------------------------------------------------------
_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("jaxllm_dropout_key", default=None)


@contextlib.contextmanager
def use_dropout_rng(key):
    """Training steps set a key so LoRA dropout is active; evaluation and sampling do not."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


class LoRA(nnx.Module):
    """Low-rank update for a weight contracting `in_shape` into `out_shape`: x -> (x A) B * alpha/r.
    B starts at zero, so the adapted model starts equal to the base model."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, rank: int, alpha: float, dropout: float,
                 uid: int, rngs: nnx.Rngs, param_dtype):
        std = 1.0 / math.sqrt(math.prod(in_shape))
        self.a = nnx.LoRAParam(nnx.initializers.normal(std)(rngs.params(), (*in_shape, rank), param_dtype),
                               out_sharding=(*in_axes, "lora_rank"), eager_sharding=False)
        self.b = nnx.LoRAParam(jnp.zeros((rank, *out_shape), param_dtype), out_sharding=("lora_rank", *out_axes),
                               eager_sharding=False)
        self.scale, self.dropout, self.n_in, self.uid = alpha / rank, dropout, len(in_shape), uid

    def __call__(self, x):
        key = _DROPOUT_KEY.get()
        if self.dropout > 0 and key is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.uid), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        return dense(dense(x, self.a[...].astype(x.dtype), self.n_in), self.b[...].astype(x.dtype)) * self.scale


def _add_lora(module, name: str, lora, in_shape, out_shape, in_axes, out_axes, rngs, param_dtype):
    if lora is not None and lora.mode == "lora" and name in lora.lora_targets:
        uid = hash(name) % 1000
        setattr(module, f"{name}_lora", LoRA(in_shape, out_shape, in_axes, out_axes, lora.lora_rank,
                                             lora.lora_alpha, lora.lora_dropout, uid, rngs, param_dtype))


def _project(module, name: str, x, n_contract: int = 1):
    """x through weight `name` (+ its LoRA adapter if present)."""
    y = dense(x, getattr(module, name)[...].astype(module.dtype), n_contract)
    adapter = getattr(module, f"{name}_lora", None)
    return y if adapter is None else y + adapter(x).astype(y.dtype)


# ---- building blocks ----------------------------------------------------------------------
class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",),
                               eager_sharding=False)

    def __call__(self, x):  # x: [..., D]
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
    """[Dh/2] inverse frequencies, with optional Llama-3 long-context scaling."""
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    if cfg.rope_scaling_factor > 0:
        factor, lo, hi = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_len
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = jnp.where(wavelen > old_len / lo, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        is_mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv = jnp.where(is_mid, mid, scaled)
    return inv


def apply_rope(x, positions, inv_freq):
    """x: [B, T, N, Dh], positions: [B, T]. Rotate-half convention (as in HF Llama)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(q_segments, kv_segments, causal: bool, q_offset=None):
    """[B, 1, T, S] bool: same non-pad segment, and (if causal) key index <= query index.

    q_offset ([B] or scalar) is the absolute index of the first query, for decoding with a cache.
    """
    T, S = q_segments.shape[1], kv_segments.shape[1]
    mask = (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] != 0)
    if causal:
        q_idx = jnp.arange(T)[None, :, None]
        if q_offset is not None:
            q_idx = q_idx + jnp.reshape(q_offset, (-1, 1, 1))
        mask = mask & (jnp.arange(S)[None, None, :] <= q_idx)
    return mask[:, None]


def dot_product_attention(q, k, v, mask, impl: str = "xla", block_q: int = 512, block_kv: int = 512):
    """q: [B, T, H, Dh], k/v: [B, S, K, Dh], mask: [B, 1, T, S] -> [B, T, H, Dh].

    impl="xla" is a plain einsum path (any backend, float32 softmax); "cudnn" and "dpa" go through
    jax.nn.dot_product_attention (cuDNN flash attention on GPU); "splash" takes an
    attention.Segments in place of the dense mask (core/attention.py).
    """
    if impl == "splash":
        return attn_kernels.splash_attention(q, k, v, mask, block_q=block_q, block_kv=block_kv)
    if impl != "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                            implementation="cudnn" if impl == "cudnn" else None)
    B, T, H, Dh = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, Dh)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(Dh)
    logits = jnp.where(mask[:, :, None], logits, NEG_INF)  # mask [B,1,1,T,S]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(B, T, H, Dh)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora=None):
        D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pd = _dtype(cfg.param_dtype)
        w = nnx.initializers.normal(cfg.init_std)
        w_out = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.q = _param(rngs, w, (D, H, Dh), ("embed", "heads", "head_dim"), pd)
        self.k = _param(rngs, w, (D, K, Dh), ("embed", "kv_heads", "head_dim"), pd)
        self.v = _param(rngs, w, (D, K, Dh), ("embed", "kv_heads", "head_dim"), pd)
        self.o = _param(rngs, w_out, (H, Dh, D), ("heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:  # Qwen2
            z = nnx.initializers.zeros
            self.q_bias = _param(rngs, z, (H, Dh), ("heads", "head_dim"), pd)
            self.k_bias = _param(rngs, z, (K, Dh), ("kv_heads", "head_dim"), pd)
            self.v_bias = _param(rngs, z, (K, Dh), ("kv_heads", "head_dim"), pd)
        self.qkv_bias = cfg.qkv_bias
        self.impl = cfg.attention_impl
        self.block_q, self.block_kv = cfg.attention_block_q, cfg.attention_block_kv
        self.dtype = _dtype(cfg.dtype)
        for name, heads, axis in (("q", H, "heads"), ("k", K, "kv_heads"), ("v", K, "kv_heads")):
            _add_lora(self, name, lora, (D,), (heads, Dh), ("embed",), (axis, "head_dim"), rngs, pd)
        _add_lora(self, "o", lora, (H, Dh), (D,), ("heads", "head_dim"), ("embed",), rngs, pd)

    def project_qkv(self, x):
        dt = self.dtype
        q = _project(self, "q", x)  # [B, T, H, Dh]
        k = _project(self, "k", x)  # [B, T, K, Dh]
        v = _project(self, "v", x)
        if self.qkv_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        # names for the remat policies (attention.REMAT_POLICIES)
        return checkpoint_name(q, "query_proj"), checkpoint_name(k, "key_proj"), checkpoint_name(v, "value_proj")

    def __call__(self, x, positions, inv_freq, mask, cache=None, index=None):
        """x: [B, T, D] -> ([B, T, D], cache). With a KV cache ((k, v), each [B, S, K, Dh]) this
        chunk's keys/values are written at slot `index` and the queries attend over the cache.
        With mask a decode.PagedKV the cache is compacted, (k, v) each [K, B, S, Dh]: keys/values
        go to the per-row slots mask.slots; one query (a decode step) attends with the Pallas
        kernel to slots [0, mask.lengths), a longer chunk (prefill, from an empty cache) to itself."""
        q, k, v = self.project_qkv(x)
        q = constrain(apply_rope(q, positions, inv_freq), ("batch", "act_len", "act_heads", None))
        k = constrain(apply_rope(k, positions, inv_freq), ("batch", "act_len", "act_kv_heads", None))
        out = None
        if isinstance(mask, paged.PagedKV):
            cache = paged.write_kv(cache, k, v, mask.slots)
            if q.shape[1] == 1:
                out = paged.paged_decode_attention(q[:, 0], cache[0], cache[1], mask.lengths)[:, None]
            mask = mask.mask
        elif cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, axis=1)
            cache = (k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        impl = attn_kernels.resolve(self.impl) if cache is None else ("xla" if self.impl == "splash" else self.impl)
        if out is None:
            out = dot_product_attention(q, k, v, mask, impl, self.block_q, self.block_kv)  # [B, T, H, Dh]
        out = checkpoint_name(out, "context")
        return checkpoint_name(_project(self, "o", out, 2), "out_proj"), cache  # [B, T, D]


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) * up. The custom backward keeps only the two inputs and recomputes the sigmoid
    in one elementwise pass (autodiff also kept sigmoid(gate) and silu(gate) alive); ~1% of the
    20.6M CPU peer step, measured A/B in one process."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, dy):
    gate, up = res
    g, u, d = gate.astype(jnp.float32), up.astype(jnp.float32), dy.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    d_gate = d * u * sig * (1.0 + g * (1.0 - sig))
    return d_gate.astype(gate.dtype), (d * g * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora=None):
        D, F = cfg.d_model, cfg.mlp_dim
        pd = _dtype(cfg.param_dtype)
        w = nnx.initializers.normal(cfg.init_std)
        w_out = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.gate = _param(rngs, w, (D, F), ("embed", "mlp"), pd)
        self.up = _param(rngs, w, (D, F), ("embed", "mlp"), pd)
        self.down = _param(rngs, w_out, (F, D), ("mlp", "embed"), pd)
        self.dtype = _dtype(cfg.dtype)
        _add_lora(self, "gate", lora, (D,), (F,), ("embed",), ("mlp",), rngs, pd)
        _add_lora(self, "up", lora, (D,), (F,), ("embed",), ("mlp",), rngs, pd)
        _add_lora(self, "down", lora, (F,), (D,), ("mlp",), ("embed",), rngs, pd)

    def __call__(self, x):  # [B, T, D]
        gate = checkpoint_name(_project(self, "gate", x), "mlpwi_0")
        up = checkpoint_name(_project(self, "up", x), "mlpwi_1")
        h = constrain(swiglu(gate, up), ("batch", "act_len", "act_mlp"))  # [B, T, F]
        return checkpoint_name(_project(self, "down", h), "mlpwo")


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora=None):
        pd = _dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        self.attn = Attention(cfg, rngs, lora)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        self.mlp = MLP(cfg, rngs, lora)

    def __call__(self, x, positions, inv_freq, mask, cache=None, index=None):
        a, cache = self.attn(self.attn_norm(x), positions, inv_freq, mask, cache, index)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "act_len", "act_embed")), cache


def _pin_in_loop(layer_state):
    """Adds a zero that XLA cannot prove loop-invariant (it is computed from this layer's own weight
    slice) to each float weight of a scanned layer. Without it XLA:TPU hoists the compute-dtype cast
    of the stacked weights out of the layer loop and holds a cast copy of every layer at once
    (3.5 GiB per chip for Llama-3-8B on v5p-8, jaxllm plan); an optimization barrier does not stop
    it. The zero is not taken from the layer input: that made XLA keep a second copy of the saved
    inputs (31.5 GiB per chip for Llama-3.1-405B on v5p-1024)."""
    leaves = [w for w in jax.tree.leaves(layer_state) if jnp.issubdtype(w.dtype, jnp.floating)]
    if not leaves:
        return layer_state
    # 0.0 whatever the weight is (NaN and inf included); XLA folds simpler forms, e.g.
    # float(x > 0) * 0.0, to a constant and hoists the casts again (measured)
    x = jax.lax.stop_gradient(leaves[0].reshape(-1)[0]).astype(jnp.float32)
    zero = jnp.where(jnp.isfinite(x), x * 0.0, 0.0)
    return jax.tree.map(lambda w: w + zero.astype(w.dtype) if jnp.issubdtype(w.dtype, jnp.floating) else w,
                        layer_state)


class Transformer(nnx.Module):
    """Decoder-only LM. `hidden()` gives final-norm states for heads (reward, value)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora=None):
        """lora: a FinetuneConfig with mode=lora adds adapters to its lora_targets."""
        self.cfg = cfg
        pd = _dtype(cfg.param_dtype)
        self.embed = _param(rngs, nnx.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model),
                            ("vocab", "embed"), pd)
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(r):
                return Block(cfg, r, lora)
            self.blocks = stacked(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs, lora) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.d_model, cfg.vocab_size),
                                  ("embed", "vocab"), pd)

    def hidden(self, tokens, positions=None, segment_ids=None, causal: bool = True):
        """tokens: [B, T] int -> [B, T, D] after the final norm."""
        return self.hidden_cached(tokens, positions, segment_ids, causal)[0]

    def hidden_cached(self, tokens, positions=None, segment_ids=None, causal: bool = True, cache=None,
                      cache_index=None, kv_segments=None, kv_lengths=None):
        """-> ([B, T, D], cache). Without a cache: the plain training forward. With one (see
        sampler.init_cache: per-layer (k, v) [B, S, K, Dh], stacked [L, ...] when scanning), the T
        tokens sit at cache slots cache_index.., and kv_segments [B, S] marks real slots.
        kv_lengths [B] instead selects the compacted decode-kernel cache (init_cache(paged=True),
        core/decode.py): row b holds kv_lengths[b] valid slots and its real tokens are appended
        after them; T > 1 (prefill) must start from an empty cache (kv_lengths 0)."""
        cfg = self.cfg
        B, T = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if cache is None and attn_kernels.resolve(cfg.attention_impl) == "splash":
            mask = attn_kernels.Segments(segment_ids, segment_ids, causal)  # the kernel masks in-kernel
        elif cache is None:
            mask = attention_mask(segment_ids, segment_ids, causal)
        elif kv_lengths is None:
            mask = attention_mask(segment_ids, kv_segments, causal, q_offset=cache_index)
        else:  # compacted cache: per-row write slots; a multi-token chunk attends to itself
            slots, lengths = paged.chunk_slots(segment_ids, kv_lengths)
            mask = paged.PagedKV(slots, lengths, attention_mask(segment_ids, segment_ids, causal) if T > 1 else None)
        inv_freq = rope_inv_freq(cfg)
        x = self.embed[...].astype(_dtype(cfg.dtype))[tokens]  # [B, T, D]
        x = constrain(x, ("batch", "act_len", "act_embed"))
        use_remat, policy = attn_kernels.remat_policy(cfg.remat)

        def run_block(graphdef, state, h, layer_cache):
            def apply(st, h, c):
                if cfg.scan_layers and cfg.cast_in_loop:
                    st = _pin_in_loop(st)
                return nnx.merge(graphdef, st)(h, positions, inv_freq, mask, c, cache_index)
            if use_remat and layer_cache is None:
                apply = jax.checkpoint(apply, policy=policy)
            return apply(state, h, layer_cache)

        if cfg.scan_layers:
            graphdef, stacked_state = nnx.split(self.blocks)
            if cache is None:
                x, _ = jax.lax.scan(lambda h, st: (run_block(graphdef, st, h, None)[0], None), x, stacked_state)
            else:
                x, cache = jax.lax.scan(lambda h, xs: run_block(graphdef, xs[0], h, xs[1]), x,
                                        (stacked_state, cache))
        else:
            new_cache = []
            for i, block in enumerate(self.blocks):
                graphdef, state = nnx.split(block)
                x, c = run_block(graphdef, state, x, None if cache is None else cache[i])
                new_cache.append(c)
            cache = None if cache is None else new_cache
        return self.final_norm(x), cache

    def head_weight(self):
        """[D, V] output projection in the compute dtype (the embedding, transposed, when tied)."""
        w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return w.astype(_dtype(self.cfg.dtype))

    def logits(self, h):
        """h: [B, T, D] -> float32 logits [B, T, V]."""
        out = dense(h, self.head_weight()).astype(jnp.float32)  # [B, T, V]
        return constrain(out, ("batch", "act_len", "act_vocab"))

    def __call__(self, tokens, positions=None, segment_ids=None, causal: bool = True):
        return self.logits(self.hidden(tokens, positions, segment_ids, causal))


class ScalarHeadModel(Transformer):
    """The decoder with a scalar head instead of the LM head: reward models and PPO critics.
    Trunk parameter paths equal Transformer's, so an SFT checkpoint initialises the trunk."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora=None):
        super().__init__(cfg, rngs, lora)
        if hasattr(self, "lm_head"):
            del self.lm_head
        pd = _dtype(cfg.param_dtype)
        self.score = _param(rngs, nnx.initializers.normal(1.0 / math.sqrt(cfg.d_model)), (cfg.d_model,),
                            ("embed",), pd)
        self.score_bias = nnx.Param(jnp.zeros((), pd), out_sharding=(), eager_sharding=False)

    def scores(self, tokens, positions=None, segment_ids=None):
        """[B, T] float32 score at every position."""
        h = self.hidden(tokens, positions, segment_ids, causal=True).astype(jnp.float32)
        return h @ self.score[...].astype(jnp.float32) + self.score_bias[...].astype(jnp.float32)

    def __call__(self, tokens, positions=None, segment_ids=None, causal: bool = True):
        return self.scores(tokens, positions, segment_ids)


class ActorCritic(nnx.Module):
    """PPO's policy (LM head) and critic (scalar head on its own trunk), trained together."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora=None):
        self.actor = Transformer(cfg, rngs, lora)
        self.critic = ScalarHeadModel(cfg, rngs, lora)

    def __call__(self, tokens, positions=None, segment_ids=None, causal: bool = True):
        """-> (logits [B, T, V], values [B, T])."""
        return self.actor(tokens, positions, segment_ids), self.critic.scores(tokens, positions, segment_ids)


# The model classes an objective can train, by the name its record gives (Objective.model).
MODEL_CLASSES = {"lm": Transformer, "scalar": ScalarHeadModel, "actor_critic": ActorCritic}


# ---- accounting ---------------------------------------------------------------------------
def param_count(cfg: ModelConfig, include_embedding: bool = True) -> int:
    D, F, H, K, Dh, V, L = (cfg.d_model, cfg.mlp_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                            cfg.vocab_size, cfg.n_layers)
    per_layer = D * Dh * (H + 2 * K) + H * Dh * D + 3 * D * F + 2 * D
    if cfg.qkv_bias:
        per_layer += Dh * (H + 2 * K)
    total = L * per_layer + D  # + final norm
    head = 0 if cfg.tie_embeddings else D * V
    return total + head + (V * D if include_embedding else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM-style accounting:
    6 * (matmul params, i.e. all params except the embedding lookup; the LM head counts, tied or not)
    + 12 * n_layers * n_heads * head_dim * seq_len for the attention score and value matmuls
    (no discount for the causal mask)."""
    n_matmul = param_count(cfg, include_embedding=False) + (cfg.d_model * cfg.vocab_size if cfg.tie_embeddings else 0)
    return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
