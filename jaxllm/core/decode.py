"""Decode attention over a compacted KV cache with the Pallas TPU paged-attention kernel.

The sampler's default (xla) decode step attends over every one of the S = P + max_new cache
slots, left padding and not-yet-written slots included, with a [B, 1, 1, S] mask. The kernel path
reads only each row's valid keys: `jax.experimental.pallas.ops.tpu.paged_attention` walks a row's
pages up to its length (in compute blocks of `pages_per_block` pages) and never touches the rest.

Layout. The kernel wants pages [K, n_pages, page, Dh] plus a page table. A contiguous cache laid
out [K, B, S, Dh] *is* such a page pool after a free reshape to [K, B * S/page, page, Dh], with the
page table page_indices[b] = b * S/page + arange(S/page): nothing is copied. That needs row b's
valid keys at slots [0, lengths[b]) -- a *compacted* cache. So prefill writes each row's real
prompt tokens from slot 0 on (its left padding is dropped, not stored) and decode step t writes
row b's new key/value at slot lengths[b] (a per-row scatter); lengths grow by one a step. RoPE
positions are explicit (the sampler passes them), so moving a key to another slot changes nothing.
A finished row (it sampled a stop id) gets length 0 and writes nothing: the kernel walks none of
its pages, so from then on it costs no attention reads, only its share of the batched matmuls.

Page size. A row's pages are contiguous, so the page size only sets the granularity of the
kernel's DMAs (one async copy per page) and of the cache's padding: pages of 128 slots (fewer,
a multiple of 16, when the whole cache is shorter; 16 so bf16 pages are whole (16, 128) tiles),
the slot count padded up to whole pages (< 128 extra slots a row). A compute block holds as many
pages as make up to 512 keys and divide the row's pages: large enough to amortise the kernel's
per-block overhead, while a row reads less than one block past its length.

Precision. The kernel does not scale the logits (we scale q by 1/sqrt(Dh) in float32) and it
converts K/V pages to bfloat16 before its float32 dot products: exact for bfloat16 caches,
a ~2^-9 relative rounding of keys and values for float32 ones.

When. The sampler (core/sampler.py, decode_impl) uses it on TPU when model.attention_impl is
auto or splash and head_dim is a multiple of 128; decode_impl="paged" forces it anywhere (off TPU
the kernel runs in a Pallas interpreter, see _interpret_mode), "xla" never. Prefill stays a dense
attention over the prompt itself.

Sharding. Under an active mesh (sharding.use_mesh_rules) the kernel and the cache writes run in
shard_map: batch split the way the rules split `batch`, kv heads (and their query-head groups)
the way they split `act_kv_heads`; each device runs the kernel on its own rows and heads.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.core import sharding as shd
from jaxllm.core.attention import platform  # the active mesh's platform (compile-only TPU devices too)

MAX_PAGE = 128  # slots per page (at most)
PAGE_MULTIPLE = 16  # bf16 sublane packing: pages of whole (16, 128) tiles
BLOCK_KEYS = 512  # keys per kernel compute block (at most)
DROP = 2 ** 30  # write slot of padding tokens: out of range, so the scatter drops them
DECODE_IMPLS = ("auto", "xla", "paged")


# ---- which path ----------------------------------------------------------------------------
def use_paged(cfg, decode_impl: str = "auto") -> bool:
    """Whether the sampler decodes with the kernel. decode_impl: "auto" (the kernel on TPU when
    cfg.attention_impl is auto/splash and head_dim is a multiple of 128), "xla" (never), "paged"
    (always; Pallas interpret mode off TPU, for tests)."""
    if decode_impl not in DECODE_IMPLS:
        raise ValueError(f"decode_impl={decode_impl!r}: choose one of {', '.join(DECODE_IMPLS)}")
    if decode_impl != "auto":
        return decode_impl == "paged"
    return cfg.attention_impl in ("auto", "splash") and platform() == "tpu" and cfg.head_dim % 128 == 0


# ---- cache geometry ------------------------------------------------------------------------
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def page_size(slots: int) -> int:
    """Slots per page for a cache of `slots` slots (idempotent: page_size(padded_slots(s)) is the same)."""
    return min(MAX_PAGE, _round_up(max(slots, 1), PAGE_MULTIPLE))


def padded_slots(slots: int) -> int:
    """The kernel cache's slot count: `slots` rounded up to whole pages."""
    return _round_up(slots, page_size(slots))


def default_pages_per_block(pages: int, page: int) -> int:
    """The most pages, at most BLOCK_KEYS keys in all, that divide a row's `pages`."""
    best = 1
    for n in range(1, max(1, BLOCK_KEYS // page) + 1):
        if pages % n == 0:
            best = n
    return best


# ---- the chunk's bookkeeping ----------------------------------------------------------------
class PagedKV(NamedTuple):
    """What Attention's cache branch gets in place of a dense mask with a compacted cache.
    slots [B, T]: cache slot of each chunk token (DROP for padding); lengths [B]: valid slots
    after this chunk's write; mask [B, 1, T, T]: the chunk's own attention mask (T > 1) or None."""
    slots: jax.Array
    lengths: jax.Array
    mask: Optional[jax.Array]


def chunk_slots(segment_ids, kv_lengths):
    """segment_ids [B, T] (0 = padding), kv_lengths [B] valid slots before the chunk -> (slots
    [B, T], lengths [B]). Real tokens go, in order, to the next free slots; padding is dropped."""
    real = segment_ids != 0
    kv_lengths = kv_lengths.astype(jnp.int32)
    slots = jnp.where(real, kv_lengths[:, None] + jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1, DROP)
    return slots, kv_lengths + real.sum(axis=1, dtype=jnp.int32)


# ---- sharding helper -------------------------------------------------------------------------
def _cache_spec(shape, mesh, rules) -> P:
    """[K, B, S, Dh] cache -> its PartitionSpec (what init_cache constrains it to)."""
    return shd.spec_for(("act_kv_heads", "batch", None, None), rules, shape, mesh, what="decode cache")


# ---- cache writes ----------------------------------------------------------------------------
def _write_local(kc, vc, k, v, slots):
    B, T = slots.shape
    rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))

    def put(c, x):  # x [B, T, K, Dh] -> c[:, b, slots[b, t]] = x[b, t]
        return c.at[:, rows, slots].set(x.transpose(2, 0, 1, 3).astype(c.dtype), mode="drop")

    return put(kc, k), put(vc, v)


def write_kv(cache, k, v, slots):
    """cache (k, v) each [K, B, S, Dh]; k/v [B, T, K, Dh]; slots [B, T] -> the updated cache.
    Slots out of range (DROP) are not written."""
    mesh, rules = shd.active_device_mesh()
    if mesh is None:
        return _write_local(cache[0], cache[1], k, v, slots)
    cspec = _cache_spec(cache[0].shape, mesh, rules)
    xspec, sspec = P(cspec[1], None, cspec[0], None), P(cspec[1], None)
    fn = jax.shard_map(_write_local, mesh=mesh, in_specs=(cspec, cspec, xspec, xspec, sspec),
                       out_specs=(cspec, cspec), check_vma=False)
    return fn(cache[0], cache[1], k, v, slots)


# ---- the kernel ------------------------------------------------------------------------------
def _interpret_mode(interpret):
    """False: the compiled kernel (TPU). True: Pallas TPU interpret mode, which simulates the TPU's
    memories, DMAs and semaphores on CPU through Python callbacks (faithful, but ~0.25 s a kernel
    call even for the tests' tiny model, and under a multi-device shard_map it deadlocked inside the sampler's
    jitted loop on 8 simulated CPU devices: it syncs all devices with Python barriers). "hlo": the
    generic Pallas interpreter, the kernel body discharged to plain HLO (DMAs become copies): the
    same results (tests/test_decode_kernel.py checks both), as fast as XLA, and fine in shard_map."""
    from jax.experimental.pallas import tpu as pltpu
    if not interpret:
        return contextlib.nullcontext()
    # force_tpu_interpret_mode(p) makes every pallas_call traced under it run with interpret=p:
    # an InterpretParams selects TPU interpret mode, True the generic interpreter.
    return pltpu.force_tpu_interpret_mode(True if interpret == "hlo" else pltpu.InterpretParams())


def _decode_local(q, k_cache, v_cache, lengths, *, pages_per_block: Optional[int], interpret):
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
    B, H, Dh = q.shape
    K, _, S, _ = k_cache.shape
    page = page_size(S)
    if S % page:
        raise ValueError(f"paged decode: {S} cache slots are not whole pages of {page}; "
                         f"allocate padded_slots(...) slots")
    pages = S // page
    ppb = pages_per_block or default_pages_per_block(pages, page)
    table = jnp.arange(B, dtype=jnp.int32)[:, None] * pages + jnp.arange(pages, dtype=jnp.int32)[None]
    qs = q.astype(jnp.float32) * (1.0 / math.sqrt(Dh))  # the kernel does not scale the logits
    with _interpret_mode(interpret):
        out = paged_attention(qs, k_cache.reshape(K, B * pages, page, Dh), v_cache.reshape(K, B * pages, page, Dh),
                              lengths.astype(jnp.int32), table, pages_per_compute_block=ppb)
    # a length-0 row (a finished sequence) reads no pages; its output is 0, not the kernel's 0/0
    return jnp.where(lengths[:, None, None] > 0, out, 0).astype(q.dtype)


def paged_decode_attention(q, k_cache, v_cache, lengths, *, pages_per_block: Optional[int] = None,
                           interpret=None):
    """One query per row over a compacted cache. q [B, H, Dh]; k_cache/v_cache [K, B, S, Dh]
    (K divides H: query heads h*G..h*G+G-1 share kv head h; S whole pages, see padded_slots);
    lengths [B] int: row b attends to slots [0, lengths[b]) -> [B, H, Dh] (softmax(q k / sqrt(Dh)) v);
    a row of length 0 reads nothing and gives zeros (the sampler's finished rows).
    pages_per_block=None picks up to BLOCK_KEYS keys a block. interpret: False (the TPU kernel),
    True (Pallas TPU interpret mode), "hlo" (the generic Pallas interpreter; see _interpret_mode),
    None (the kernel on TPU, "hlo" elsewhere)."""
    mesh, rules = shd.active_device_mesh()
    if interpret is None:
        interpret = False if platform() == "tpu" else "hlo"
    local = functools.partial(_decode_local, pages_per_block=pages_per_block, interpret=interpret)
    if mesh is None:
        return local(q, k_cache, v_cache, lengths)
    cspec = _cache_spec(k_cache.shape, mesh, rules)
    qspec = P(cspec[1], cspec[0], None)  # query heads split like their kv heads
    fn = jax.shard_map(local, mesh=mesh, in_specs=(qspec, cspec, cspec, P(cspec[1])), out_specs=qspec,
                       check_vma=False)
    return fn(q, k_cache, v_cache, lengths)
