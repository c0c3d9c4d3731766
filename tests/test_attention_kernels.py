"""Splash attention (Pallas, interpret mode on CPU) against the XLA reference path, and the remat
policies by name: same outputs and gradients, under every mesh layout that splits batch or heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import MeshConfig, ModelConfig
from jaxllm.core import attention as attn
from jaxllm.core.model import Transformer, attention_mask, dot_product_attention
from jaxllm.core.sharding import make_mesh, make_rules, use_mesh_rules


def _qkv(B, T, H, K, Dh, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, H, Dh)), jax.random.normal(ks[1], (B, T, K, Dh)),
            jax.random.normal(ks[2], (B, T, K, Dh)))


def _packed_segments(B, T, seed=0):
    """Rows of 2-3 packed examples followed by padding (segment 0)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(8, T - 8), size=2, replace=False))
        seg[b, :cuts[0]], seg[b, cuts[0]:cuts[1]] = 1, 2
        seg[b, cuts[1]:T - 8 * b] = 3
    return jnp.asarray(seg)


def _both(q, k, v, seg, causal, mesh=None):
    """(splash, xla) outputs and input gradients of a loss on the real (non-padding) rows."""
    real = (seg > 0)[:, :, None, None]
    w = jax.random.normal(jax.random.key(9), q.shape)  # a loss that weighs every output differently

    def loss(impl, q, k, v):
        mask = attn.Segments(seg, seg, causal) if impl == "splash" else attention_mask(seg, seg, causal)
        out = dot_product_attention(q, k, v, mask, impl, 128, 128)
        return jnp.sum(jnp.where(real, out * w, 0.0)), out

    def run(impl):
        f = jax.jit(jax.value_and_grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2), has_aux=True))
        if mesh is None:
            return f(q, k, v)
        with use_mesh_rules(mesh, make_rules()):
            return f(q, k, v)
    return run("splash"), run("xla"), real


def _assert_close(a, b, real):
    (la, oa), ga = a
    (lb, ob), gb = b
    np.testing.assert_allclose(np.where(real, oa, 0), np.where(real, ob, 0), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-4)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x, y, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_splash_equals_xla_gqa(causal):
    q, k, v = _qkv(2, 256, 4, 2, 128)
    seg = jnp.ones((2, 256), jnp.int32)
    _assert_close(*_both(q, k, v, seg, causal))


def test_splash_equals_xla_packed_and_padded():
    q, k, v = _qkv(2, 256, 4, 1, 128, seed=1)  # multi-query: one kv head
    _assert_close(*_both(q, k, v, _packed_segments(2, 256), True))


def test_splash_pads_lengths_that_are_not_whole_tiles():
    q, k, v = _qkv(1, 200, 2, 2, 128, seed=2)  # 200 -> 256 inside, cut back to 200
    _assert_close(*_both(q, k, v, _packed_segments(1, 200, seed=3), True))


@pytest.mark.parametrize("layout", [dict(data=2, fsdp=2, tensor=2),
                                    pytest.param(dict(data=1, fsdp=8, tensor=1), marks=pytest.mark.slow),
                                    dict(data=1, fsdp=2, tensor=4)])
def test_splash_sharded_equals_xla(layout):
    """Under shard_map: batch over data x fsdp, heads over tensor. With tensor=4 and 2 kv heads the kv
    heads cannot split like the 4 query heads and are repeated per query head."""
    mesh = make_mesh(MeshConfig(**layout))
    q, k, v = _qkv(8, 256, 4, 2, 128, seed=4)
    _assert_close(*_both(q, k, v, _packed_segments(8, 256, seed=5), True, mesh))


def test_auto_resolves_by_platform():
    assert attn.resolve("auto") == "dpa" and attn.resolve("xla") == "xla"
    from jaxllm.app.plan import tpu_devices, libtpu_available, parse_topology
    if not libtpu_available():
        pytest.skip("libtpu not installed: no compile-only TPU devices")
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), tpu_devices(parse_topology("v5p-8")))
    with use_mesh_rules(mesh, make_rules()):
        assert attn.platform() == "tpu" and attn.resolve("auto") == "splash"


def _model_cfg(**kw):
    base = dict(vocab_size=96, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=128, mlp_dim=256,
                max_seq_len=256)
    return ModelConfig(**{**base, **kw})


def _loss_and_grads(cfg, tokens, seg):
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state):
        def loss(state):
            logits = nnx.merge(graphdef, state)(tokens, segment_ids=seg)
            return jnp.mean(jnp.where(seg[..., None] > 0, jax.nn.log_softmax(logits), 0.0))
        return jax.value_and_grad(loss)(state)
    return f(state)


@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True])  # CI time: one in the fast set
def test_model_splash_equals_xla(scan):
    tokens = jax.random.randint(jax.random.key(0), (2, 256), 1, 96)
    seg = _packed_segments(2, 256, seed=6)
    la, ga = _loss_and_grads(_model_cfg(attention_impl="splash", scan_layers=scan, remat="full"), tokens, seg)
    lb, gb = _loss_and_grads(_model_cfg(attention_impl="xla", scan_layers=scan, remat="full"), tokens, seg)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, atol=2e-6, rtol=2e-4)


FAST_POLICIES = ("none", "minimal", "save_dot_except_mlp", "full")  # the rest run with -m slow (CI time)


@pytest.mark.parametrize("policy", [p if p in FAST_POLICIES else pytest.param(p, marks=pytest.mark.slow)
                                    for p in attn.REMAT_POLICIES if "offloaded" not in p])
def test_remat_policies_keep_the_gradients(policy):
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 1, 96)
    seg = jnp.ones((2, 64), jnp.int32)
    la, ga = _loss_and_grads(_model_cfg(remat=policy, scan_layers=True), tokens, seg)
    lb, gb = _loss_and_grads(_model_cfg(remat="none", scan_layers=True), tokens, seg)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)


def test_remat_policies_save_what_their_names_say():
    """Activation elements saved for the backward pass (jax's own residual listing) shrink along
    the policies' order: a missing checkpoint_name tag would make two neighbours equal."""
    import math

    from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints
    tokens = jnp.ones((2, 64), jnp.int32)
    order = ["none", "minimal", "save_dot_with_context_except_mlp", "save_dot_except_mlp", "save_qkv_proj",
             "save_out_proj", "full"]
    saved = []
    for policy in order:
        graphdef, state = nnx.split(Transformer(_model_cfg(remat=policy, scan_layers=True, head_dim=32), nnx.Rngs(0)))
        res = saved_residuals(lambda s: jnp.mean(nnx.merge(graphdef, s).hidden(tokens) ** 2), state)
        saved.append(sum(math.prod(a.shape) for a, why in res if a.ndim >= 3 and "argument" not in why))
    assert all(a > b for a, b in zip(saved, saved[1:])), dict(zip(order, saved))
