"""Paged decode attention (core/decode.py), run in Pallas TPU interpret mode on CPU: the kernel
against a masked-softmax reference (GQA, ragged lengths), the compacted cache writes, and the
sampler's greedy tokens / log-probs with the kernel path against the xla path (left-padded prompts
of different lengths; scan and no scan; an 8-device mesh)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import MeshConfig, ModelConfig
from jaxllm.core import decode
from jaxllm.core.model import Transformer
from jaxllm.core.sampler import generate_ids, pad_prompts, prompt_masks
from jaxllm.core.sharding import make_mesh, make_rules, state_shardings

PROMPTS = [[2, 5, 9, 11], [2, 7], [2, 100, 200, 250, 17, 8, 9, 10, 11], [2, 40, 41]]


def _reference(q, kc, vc, lengths):
    """Plain masked softmax: q [B, H, Dh], caches [K, B, S, Dh] -> [B, H, Dh]."""
    B, H, Dh = q.shape
    K, _, S, _ = kc.shape
    qg = q.reshape(B, K, H // K, Dh)
    logits = jnp.einsum("bkgd,kbsd->bkgs", qg, kc, precision="highest") / math.sqrt(Dh)
    valid = jnp.arange(S)[None, :] < lengths[:, None]
    probs = jax.nn.softmax(jnp.where(valid[:, None, None], logits, -1e30), axis=-1)
    return jnp.einsum("bkgs,kbsd->bkgd", probs, vc, precision="highest").reshape(B, H, Dh)


@pytest.mark.parametrize("heads,kv_heads,slots,lengths,ppb,interpret", [
    (4, 2, 40, [1, 40, 23], None, True),  # one 48-slot page a row; Pallas TPU interpret mode
    (4, 2, 40, [1, 40, 23], None, "hlo"),  # the same in the generic interpreter (the sampler's off TPU)
    # 128-slot pages, several compute blocks a row, 8 query heads a kv head (the kernel's other q layout)
    (8, 1, 300, [300, 129, 1, 77], 1, True),
])
def test_kernel_matches_masked_softmax(heads, kv_heads, slots, lengths, ppb, interpret):
    B, Dh, S = len(lengths), 128, decode.padded_slots(slots)
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, heads, Dh), jnp.float32)
    kc = jax.random.normal(ks[1], (kv_heads, B, S, Dh), jnp.float32)
    vc = jax.random.normal(ks[2], (kv_heads, B, S, Dh), jnp.float32)
    lengths = jnp.asarray(lengths, jnp.int32)
    # slots past a row's length hold garbage the kernel must not read
    kc = jnp.where(jnp.arange(S)[None, None, :, None] < lengths[None, :, None, None], kc, 1e4)
    out = decode.paged_decode_attention(q, kc, vc, lengths, pages_per_block=ppb, interpret=interpret)
    # the kernel reads K/V pages as bfloat16: exact against a reference with rounded K/V ...
    r16 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_reference(q, r16(kc), r16(vc), lengths)),
                               atol=2e-5, rtol=2e-5)
    # ... and within bfloat16 rounding of the float32 one
    np.testing.assert_allclose(np.asarray(out), np.asarray(_reference(q, kc, vc, lengths)), atol=2e-2)


def test_kernel_skips_zero_length_rows():
    """A finished row (length 0) reads nothing: zeros out, every other row as before."""
    B, H, K, Dh, S = 3, 4, 2, 128, decode.padded_slots(40)
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (B, H, Dh), jnp.float32)
    kc, vc = (jax.random.normal(k, (K, B, S, Dh), jnp.float32) for k in ks[1:])
    lengths = jnp.asarray([0, 40, 7], jnp.int32)
    out = np.asarray(decode.paged_decode_attention(q, kc, vc, lengths, interpret="hlo"))
    np.testing.assert_array_equal(out[0], 0.0)
    r16 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
    ref = np.asarray(_reference(q, r16(kc), r16(vc), lengths))
    np.testing.assert_allclose(out[1:], ref[1:], atol=2e-5, rtol=2e-5)


def test_compacted_writes_drop_left_padding():
    seg = jnp.asarray([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], jnp.int32)
    slots, lengths = decode.chunk_slots(seg, jnp.zeros((3,), jnp.int32))
    np.testing.assert_array_equal(np.asarray(lengths), [2, 4, 1])
    x = jnp.arange(3 * 4, dtype=jnp.float32).reshape(3, 4, 1, 1) + 1  # [B, T, K=1, Dh=1]
    z = jnp.zeros((1, 3, 6, 1))
    kc, _ = decode.write_kv((z, z), x, x, slots)
    np.testing.assert_array_equal(np.asarray(kc[0, :, :, 0]), [[3, 4, 0, 0, 0, 0], [5, 6, 7, 8, 0, 0],
                                                                [12, 0, 0, 0, 0, 0]])
    # a decode step appends at each row's own length
    slots, lengths = decode.chunk_slots(jnp.ones((3, 1), jnp.int32), lengths)
    kc, _ = decode.write_kv((kc, kc), jnp.full((3, 1, 1, 1), -1.0), jnp.full((3, 1, 1, 1), -1.0), slots)
    np.testing.assert_array_equal(np.asarray(lengths), [3, 5, 2])
    np.testing.assert_array_equal(np.asarray(kc[0, :, :, 0]), [[3, 4, -1, 0, 0, 0], [5, 6, 7, 8, -1, 0],
                                                                [12, -1, 0, 0, 0, 0]])


def _model(scan: bool):
    cfg = ModelConfig(vocab_size=300, d_model=256, n_heads=4, n_kv_heads=2, head_dim=128, n_layers=2,
                      mlp_dim=512, scan_layers=scan)
    return Transformer(cfg, nnx.Rngs(0))


def _assert_same(ref, out):
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref.mask))
    np.testing.assert_array_equal(np.asarray(out.finished), np.asarray(ref.finished))
    np.testing.assert_allclose(np.asarray(out.logps), np.asarray(ref.logps), atol=5e-4)


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])  # CI time: one in the fast set
def test_paged_sampler_matches_xla_greedy(scan):
    g, st = nnx.split(_model(scan))
    prompts, masks = pad_prompts(PROMPTS), prompt_masks(PROMPTS)
    ref = generate_ids(g, st, prompts, 10, prompt_mask=masks, eos_id=(), decode_impl="xla")
    out = generate_ids(g, st, prompts, 10, prompt_mask=masks, eos_id=(), decode_impl="paged")
    _assert_same(ref, out)
    # a stop id that ends row 0 early (from then on the kernel reads none of its keys: length 0)
    eos = int(np.asarray(ref.tokens)[0, 2])
    ref = generate_ids(g, st, prompts, 10, prompt_mask=masks, eos_id=eos, decode_impl="xla")
    out = generate_ids(g, st, prompts, 10, prompt_mask=masks, eos_id=eos, decode_impl="paged")
    assert np.asarray(ref.mask)[0].sum() == 3
    _assert_same(ref, out)


def test_decode_impl_choice(monkeypatch):
    cfg = _model(False).cfg
    assert not decode.use_paged(cfg, "auto")  # CPU here
    assert decode.use_paged(cfg, "paged") and not decode.use_paged(cfg, "xla")
    monkeypatch.setattr(decode, "platform", lambda: "tpu")
    tpu = lambda **kw: decode.use_paged(dataclasses.replace(cfg, **kw), "auto")
    assert tpu(attention_impl="auto") and tpu(attention_impl="splash")
    assert not tpu(attention_impl="xla") and not tpu(attention_impl="auto", head_dim=64, d_model=128)
    with pytest.raises(ValueError, match="decode_impl"):
        decode.use_paged(cfg, "pallas")


@pytest.mark.parametrize("mesh_shape", [pytest.param((2, 2, 2), marks=pytest.mark.slow), (2, 1, 4)])
def test_paged_sampler_sharded(mesh_shape):
    """data x fsdp x tensor; (2, 1, 4) leaves the 2 kv heads unsplit on the 4-way tensor axis."""
    g, st = nnx.split(_model(True))
    prompts = pad_prompts(PROMPTS * 2)
    masks = prompt_masks(PROMPTS * 2)
    ref = generate_ids(g, st, prompts, 8, prompt_mask=masks, eos_id=(), decode_impl="xla")
    data, fsdp, tensor = mesh_shape
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    rules = make_rules()
    params = jax.device_put(st, state_shardings(st, mesh, rules))
    from jaxllm.core.arrays import host_to_global
    out = generate_ids(g, params, host_to_global(prompts, mesh, rules, process_local=False), 8,
                       prompt_mask=host_to_global(masks, mesh, rules, process_local=False), eos_id=(), mesh=mesh,
                       rules=rules, decode_impl="paged")
    _assert_same(ref, out)
