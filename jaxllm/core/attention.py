"""Attention kernels behind `model.attention_impl`, and the remat/offload policies by name.

impl   | TPU                         | GPU                        | CPU
-------|-----------------------------|----------------------------|------------------------------
xla    | einsum + float32 softmax: materialises [B, H, T, S] scores (the reference path)
cudnn  | -                           | cuDNN flash attention      | -
splash | Pallas splash attention     | -                          | splash in Pallas interpret mode
auto   | splash                      | jax.nn.dot_product_attention (cuDNN when it applies, else XLA)

Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) is a flash-attention kernel
that never holds the T x S scores: it walks [block_q, block_kv] tiles, skips tiles the causal
mask rules out, and compares segment ids in-kernel, so packed rows need no [B, T, S] mask either.
It runs on one device's [H, T, Dh] slice; under a mesh it is wrapped in shard_map with batch and
heads split the way the rules table splits the `batch` and `act_heads` activations.

The platform is the mesh's (so `jaxllm plan` compiling for a TPU topology on a CPU host picks the
TPU kernels), else JAX's default backend.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxllm.core import sharding as shd

LANES = 128  # TPU vector lane width: splash's tiles and sequence lengths are multiples of it


# ---- which kernel --------------------------------------------------------------------------
def platform() -> str:
    """'tpu' | 'gpu' | 'cpu' of the active mesh's devices, else of the default backend."""
    mesh, _ = shd.active_device_mesh()
    name = mesh.devices.flat[0].platform if mesh is not None and mesh.devices.size else jax.default_backend()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def resolve(impl: str) -> str:
    """The configured attention_impl -> the path that runs here: xla | cudnn | splash | dpa."""
    if impl == "auto":
        return "splash" if platform() == "tpu" else "dpa"
    return impl


class Segments(NamedTuple):
    """What splash needs instead of a dense mask: segment ids [B, T] / [B, S] (0 = padding)."""
    q: jax.Array
    kv: jax.Array
    causal: bool


# ---- splash attention ----------------------------------------------------------------------
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(length: int, want: int) -> int:
    """The largest multiple of LANES that is <= want and divides length (a multiple of LANES)."""
    b = max(LANES, min(want, length) // LANES * LANES)
    while length % b:
        b -= LANES
    return b


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, length: int, causal: bool, block_q: int, block_kv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    one = sa.CausalMask((length, length)) if causal else sa.FullMask((length, length))
    bq, bkv = _block(length, block_q), _block(length, block_kv)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                          block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                          block_q_dq=bq, block_kv_dq=bkv)
    # The mask's block tables are built with numpy once per shape and held as concrete constants
    # (built while tracing they would be tracers and could not be cached).
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, q_seg, kv_seg, *, causal: bool, block_q: int, block_kv: int, interpret: bool):
    """One device's part. q: [B, T, H, Dh], k/v: [B, T, K, Dh], segments [B, T] -> [B, T, H, Dh]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
    B, T, H, Dh = q.shape
    Tp = _round_up(T, LANES)
    if Tp != T:  # pad to whole tiles; padded rows are segment 0 and are cut off again below
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        q_seg, kv_seg = jnp.pad(q_seg, ((0, 0), (0, Tp - T))), jnp.pad(kv_seg, ((0, 0), (0, Tp - T)))
    kernel = _kernel(H, Tp, causal, block_q, block_kv, interpret)
    # the kernel wants heads major: [H, T, Dh] per sequence; it does not scale the logits
    qh = (q * (1.0 / math.sqrt(Dh))).astype(q.dtype).transpose(0, 2, 1, 3)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    # Padding (segment 0) only meets padding: a real query's segment is never 0, and a padded
    # query always sees itself, so no row is fully masked.
    seg = SegmentIds(q=q_seg.astype(jnp.int32), kv=kv_seg.astype(jnp.int32))
    out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=s))(qh, kh, vh, seg)  # [B, H, Tp, Dh]
    return out.transpose(0, 2, 1, 3)[:, :T]


def splash_attention(q, k, v, segments: Segments, *, block_q: int = 512, block_kv: int = 512,
                     interpret: Optional[bool] = None):
    """q: [B, T, H, Dh], k/v: [B, T, K, Dh] (GQA: K divides H) -> [B, T, H, Dh].

    interpret=None runs the real kernel on TPU and Pallas interpret mode elsewhere (tests)."""
    if interpret is None:
        interpret = platform() != "tpu"
    local = functools.partial(_splash_local, causal=segments.causal, block_q=block_q, block_kv=block_kv,
                              interpret=interpret)
    mesh, rules = shd.active_device_mesh()
    if mesh is None:
        return local(q, k, v, segments.q, segments.kv)
    spec_q = shd.spec_for(("batch", None, "act_heads", None), rules, q.shape, mesh, what="splash q")
    spec_kv = shd.spec_for(("batch", None, "act_kv_heads", None), rules, k.shape, mesh, what="splash k/v")
    if spec_kv[2] != spec_q[2]:
        # kv heads split differently from query heads (e.g. 8 kv heads on a 16-way tensor axis):
        # give every query head its own kv head so both split alike.
        k, v = (jnp.repeat(t, q.shape[2] // k.shape[2], axis=2) for t in (k, v))
        spec_kv = spec_q
    spec_seg = jax.sharding.PartitionSpec(spec_q[0], None)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec_q, spec_kv, spec_kv, spec_seg, spec_seg),
                       out_specs=spec_q, check_vma=False)
    return fn(q, k, v, segments.q, segments.kv)


# ---- remat and offload policies --------------------------------------------------------------
# Activations the model names with jax.ad_checkpoint.checkpoint_name (model.py), MaxText's names.
QKV = ("query_proj", "key_proj", "value_proj")
CONTEXT = ("context",)  # attention output before the output projection
OUT = ("out_proj",)
MLP_IN = ("mlpwi_0", "mlpwi_1")  # gate and up projections
MLP_OUT = ("mlpwo",)
ALL_DOTS = QKV + CONTEXT + OUT + MLP_IN + MLP_OUT


def _save(*names):
    return jax.checkpoint_policies.save_only_these_names(*names)


def _offload(*names):
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
        offload_src="device", offload_dst="pinned_host")


# name -> (policy factory or None for "save nothing", what it keeps, HBM cost rank: 0 = most).
# Ordered from the least recomputation (most memory) to the most: `jaxllm plan --auto-remat`
# walks this order and keeps the first that fits.
REMAT_POLICIES = {
    "none": (None, "no rematerialisation: every activation the backward needs stays in HBM"),
    "minimal": (lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                "saves every weight matmul output (projections and MLP), recomputes the rest"),
    "save_dots": (lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable, "alias of minimal"),
    "minimal_offloaded": (lambda: _offload(*ALL_DOTS),
                          "like minimal, but the saved matmul outputs wait in pinned host memory"),
    "save_dot_with_context_except_mlp": (lambda: _save(*QKV, *CONTEXT, *OUT),
                                         "saves q/k/v, attention context and output projection"),
    "save_dot_except_mlp": (lambda: _save(*QKV, *OUT), "saves q/k/v and the output projection"),
    "save_dot_except_mlpwi": (lambda: _save(*QKV, *OUT, *MLP_OUT),
                              "saves q/k/v, output projection and the MLP down projection"),
    "save_qkv_proj": (lambda: _save(*QKV), "saves the q/k/v projections"),
    "qkv_proj_offloaded": (lambda: _offload(*QKV), "like save_qkv_proj, saved in pinned host memory"),
    "save_out_proj": (lambda: _save(*OUT), "saves the attention output projection"),
    "full": (None, "saves only each layer's input; the whole layer is recomputed in the backward"),
}
AUTO_REMAT_ORDER = ("none", "minimal", "save_dot_with_context_except_mlp", "save_dot_except_mlp",
                    "save_qkv_proj", "minimal_offloaded", "qkv_proj_offloaded", "full")


def remat_policy(name: str):
    """-> (use jax.checkpoint, its policy)."""
    factory = REMAT_POLICIES[name][0]
    return name != "none", (factory() if factory else None)
