"""The fused chunked LM-head + cross-entropy (jaxllm.xent) equals the plain logits path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.objectives import token_nll
from jaxllm.xent import chunk_length, fused_xent


def _plain(h, w, targets, weights, z_loss):
    logits = jnp.einsum("btd,dv->btv", h, w)
    nll, logz, correct = token_nll(logits, targets)
    nll_sum, z_sum = (nll * weights).sum(), (logz * logz * weights).sum()
    return {"loss": nll_sum + z_loss * z_sum, "nll": nll_sum, "z": z_sum, "correct": (correct * weights).sum()}


def _inputs(B=4, T=24, D=16, V=300, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((D, V)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    weights = jnp.asarray(rng.random((B, T)) > 0.25, jnp.float32)
    return h, w, targets, weights


def test_chunk_length_divides_the_sequence():
    assert chunk_length(8, 256, 512) == 64
    assert chunk_length(4, 24, 40) == 8  # 10 wanted; 8 is the largest divisor of 24 <= 10
    assert chunk_length(64, 256, 16) == 1
    assert chunk_length(1, 100, 4096) == 100


@pytest.mark.parametrize("z_loss,chunk", [(0.0, 16), (1e-3, 40), (1e-3, 10_000)])
def test_values_and_gradients_match_plain_path(z_loss, chunk):
    h, w, targets, weights = _inputs()
    got, want = fused_xent(h, w, targets, weights, z_loss, chunk), _plain(h, w, targets, weights, z_loss)
    for k in want:
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=2e-6, err_msg=k)
    g_fused = jax.grad(lambda h, w: fused_xent(h, w, targets, weights, z_loss, chunk)["loss"], (0, 1))(h, w)
    g_plain = jax.grad(lambda h, w: _plain(h, w, targets, weights, z_loss)["loss"], (0, 1))(h, w)
    for a, b in zip(g_fused, g_plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
        assert float(jnp.abs(b).max()) > 1e-3  # the gradient is not trivially zero


def test_cotangent_scales_and_frozen_head_gets_no_gradient():
    h, w, targets, weights = _inputs(seed=1)

    def scaled(h, w):  # the train step divides by the token count; accumulation adds micro-batches
        out = fused_xent(h, w, targets, weights, 0.0, 32)
        return 0.5 * out["loss"] / weights.sum() + 0.0 * out["nll"]  # metrics carry no gradient

    g = jax.grad(scaled, (0, 1))(h, w)
    g_ref = jax.grad(lambda h, w: 0.5 * _plain(h, w, targets, weights, 0.0)["loss"] / weights.sum(), (0, 1))(h, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    # only h differentiated (a frozen head): the fused forward skips dW and dh is unchanged
    gh = jax.jit(jax.grad(lambda h: fused_xent(h, w, targets, weights, 0.0, 32)["loss"]))(h)
    np.testing.assert_allclose(np.asarray(gh), np.asarray(g_ref[0]) * 2 * float(weights.sum()), rtol=1e-4, atol=1e-6)


def test_ties_count_as_correct_and_masked_rows_count_nothing():
    h = jnp.zeros((1, 2, 4), jnp.float32)  # all logits equal: every target is (tied) top-1
    w = jnp.ones((4, 5), jnp.float32)
    out = fused_xent(h, w, jnp.array([[0, 3]]), jnp.array([[1.0, 0.0]]), 0.0, 2)
    assert float(out["correct"]) == 1.0
    np.testing.assert_allclose(float(out["nll"]), np.log(5.0), rtol=1e-6)


def test_train_loss_on_a_sharded_mesh_matches_the_plain_path(tmp_path):
    """causal_lm with the fused head (vocab split over `tensor`, batch over data x fsdp) gives the
    plain path's loss and gradients."""
    from tests.conftest import tiny_config
    from tests.test_sharding import _loss_and_grads
    cfg = tiny_config(tmp_path, "model.n_kv_heads=4", "train.batch_size=8", "objective.z_loss=0.001")
    rng = np.random.default_rng(0)
    T = 32
    batch = {"inputs": rng.integers(0, 1024, (8, T), dtype=np.int32),
             "targets": rng.integers(0, 1024, (8, T), dtype=np.int32),
             "segment_ids": np.ones((8, T), np.int32),
             "positions": np.tile(np.arange(T), (8, 1)).astype(np.int32),
             "loss_mask": (rng.random((8, T)) > 0.2).astype(np.int32)}
    mesh = dict(data=2, fsdp=2, tensor=2)
    fused = _loss_and_grads(cfg, mesh, jax.devices(), batch)
    plain_cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, xent_chunk_tokens=0))
    plain = _loss_and_grads(plain_cfg, mesh, jax.devices(), batch)
    assert cfg.objective.xent_chunk_tokens > 0
    assert fused[0] == pytest.approx(plain[0], rel=1e-6)
    for (path, g), (_, r) in zip(jax.tree_util.tree_flatten_with_path(fused[1])[0],
                                 jax.tree_util.tree_flatten_with_path(plain[1])[0]):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
