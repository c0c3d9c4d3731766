"""The fused chunked LM-head + cross-entropy (jaxllm.core.xent) equals the plain logits path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.objectives import token_nll
from jaxllm.core.xent import chunking, fused_xent, token_logps


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


def test_chunking_pads_the_sequence_as_little_as_possible():
    assert chunking(8, 256, 512) == (64, 4)
    assert chunking(4, 24, 40) == (8, 3)  # 10 tokens wanted per row: 3 chunks of 8
    assert chunking(32, 43, 512) == (15, 3)  # a prime rollout length: 45 = 3 x 15 (2 padded), not 43 x 1
    assert chunking(64, 256, 16) == (1, 256)
    assert chunking(1, 100, 4096) == (100, 1)


@pytest.mark.parametrize("z_loss,chunk,T", [(0.0, 16, 24), (1e-3, 40, 24), (1e-3, 10_000, 24), (1e-3, 20, 23)])
def test_values_and_gradients_match_plain_path(z_loss, chunk, T):
    h, w, targets, weights = _inputs(T=T)  # T=23: prime, so the last chunk is padded
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


# ---- per-token log-probs and entropies (DPO, PPO, GRPO, rollout scoring) ----------------------
@pytest.mark.parametrize("temperature,chunk,T", [(1.0, 16, 24), (0.7, 40, 24), (0.7, 10_000, 24), (0.7, 20, 23)])
def test_token_logps_values_and_gradients_match_plain_path(temperature, chunk, T):
    from jaxllm.objectives import token_logps_and_entropy
    h, w, targets, _ = _inputs(T=T, seed=2)
    rng = np.random.default_rng(3)
    a, b = (jnp.asarray(rng.standard_normal(targets.shape), jnp.float32) for _ in range(2))
    plain = lambda h, w: token_logps_and_entropy(jnp.einsum("btd,dv->btv", h, w), targets, temperature)
    chunked = lambda h, w: token_logps(h, w, targets, temperature, chunk)
    for got, want in zip(chunked(h, w), plain(h, w)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-6)
    # a cotangent on both outputs (DPO/PPO weight log-probs per token; an entropy bonus weights entropies)
    for f_of in (lambda o: (o[0] * a).sum() + (o[1] * b).sum(), lambda o: (o[0] * a).sum(),
                 lambda o: (o[1] * b).sum()):
        g_got = jax.jit(jax.grad(lambda h, w: f_of(chunked(h, w)), (0, 1)))(h, w)
        g_want = jax.grad(lambda h, w: f_of(plain(h, w)), (0, 1))(h, w)
        for x, y in zip(g_got, g_want):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
            assert float(jnp.abs(y).max()) > 1e-2
    # a frozen head (only dh computed) and a frozen trunk (only dW): the same gradients
    gh = jax.jit(jax.grad(lambda h: (chunked(h, w)[0] * a).sum()))(h)
    np.testing.assert_allclose(np.asarray(gh), np.asarray(jax.grad(lambda h: (plain(h, w)[0] * a).sum())(h)),
                               rtol=1e-4, atol=1e-6)
    gw = jax.jit(jax.grad(lambda w: (chunked(h, w)[0] * a).sum()))(w)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(jax.grad(lambda w: (plain(h, w)[0] * a).sum())(w)),
                               rtol=1e-4, atol=1e-6)


def test_token_logps_in_bfloat16_returns_gradients_in_the_inputs_dtypes():
    """A bf16 model: logits are accumulated in float32 (the plain path rounds them to bf16), the
    gradients come back in bf16 and agree with float32 math on the same bf16 inputs."""
    from jaxllm.objectives import token_logps_and_entropy
    h, w, targets, _ = _inputs(T=23, seed=4)
    hb, wb = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    a = jnp.asarray(np.random.default_rng(5).standard_normal(targets.shape), jnp.float32)
    got = jax.jit(jax.grad(lambda h, w: (token_logps(h, w, targets, 0.7, 20)[0] * a).sum(), (0, 1)))(hb, wb)
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.bfloat16]
    f32 = lambda h, w: (token_logps_and_entropy(jnp.einsum("btd,dv->btv", h, w), targets, 0.7)[0] * a).sum()
    want = jax.grad(f32, (0, 1))(hb.astype(jnp.float32), wb.astype(jnp.float32))
    for x, y in zip(got, want):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y), rtol=0.05, atol=0.02 * float(jnp.abs(y).max()))


def _rl_batches(rng, B, T, V):
    """Small DPO ([B, 2, T] with precomputed ref_logps) and GRPO/PPO rollout batches."""
    def seqs(*lead):
        return {"inputs": rng.integers(0, V, (*lead, T), dtype=np.int32),
                "targets": rng.integers(0, V, (*lead, T), dtype=np.int32),
                "segment_ids": np.ones((*lead, T), np.int32),
                "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (*lead, T)).copy(),
                "loss_mask": (rng.random((*lead, T)) > 0.3).astype(np.int32)}
    dpo = dict(seqs(B, 2), ref_logps=(rng.standard_normal((B, 2)) * 3 - 40).astype(np.float32))
    noise = lambda: (rng.standard_normal((B, T)) * 0.3).astype(np.float32)
    rollout = dict(seqs(B), old_logps=noise() - 7.0, ref_logps=noise() - 7.0, advantages=noise() * 3,
                   old_values=noise(), returns=noise())
    return {"dpo": dpo, "grpo": rollout, "ppo": rollout}


@pytest.mark.parametrize("loss_name", ["dpo", "grpo", pytest.param("ppo", marks=pytest.mark.slow)])
def test_post_training_losses_on_a_sharded_mesh_match_the_plain_path(tmp_path, monkeypatch, loss_name):
    """dpo / grpo / ppo through the chunked log-prob head (vocab over `tensor`, batch over
    data x fsdp) give the plain logits path's loss, metrics and gradients."""
    from flax import nnx
    from jaxllm.config import MeshConfig, RLConfig
    from jaxllm.core.arrays import to_global
    from jaxllm.core.model import Transformer
    from jaxllm.objectives import REGISTRY, LossContext
    from jaxllm.core.model import ActorCritic
    from jaxllm.core.sharding import make_mesh, make_rules, use_mesh_rules
    from jaxllm.train.state import abstract_model, init_state, state_shardings_for
    from jaxllm.core.optim import make_optimizer
    from tests.conftest import tiny_config
    cfg = tiny_config(tmp_path, "model.n_kv_heads=4", "objective.xent_chunk_tokens=32")
    mesh, rules = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()), make_rules()
    cls = ActorCritic if loss_name == "ppo" else Transformer
    make_model = lambda rngs: cls(cfg.model, rngs)
    graphdef, abs_p, abs_r = abstract_model(make_model, nnx.Param)
    opt = make_optimizer(cfg.optimizer, 10)
    state = init_state(make_model, nnx.Param, opt, state_shardings_for(abs_p, abs_r, opt, mesh, rules), seed=0)
    batch_np = _rl_batches(np.random.default_rng(0), 8, 32, cfg.model.vocab_size)[loss_name]
    batch = jax.tree.map(lambda x: x[0], to_global(batch_np, mesh, rules))
    rl = RLConfig(temperature=0.8, kl_coef=0.05)
    import jaxllm.core.xent as xent
    calls = {}
    real = xent.token_logps
    monkeypatch.setattr(xent, "token_logps", lambda *a: calls.setdefault(0, True) and real(*a))

    def run(chunk):
        obj = dataclasses.replace(cfg.objective, name=loss_name, xent_chunk_tokens=chunk)

        @jax.jit
        def f(params, rest, batch):
            def loss(p):
                with use_mesh_rules(mesh, rules):
                    out = REGISTRY[loss_name].loss(nnx.merge(graphdef, p, rest), batch,
                                            LossContext(jax.random.key(0), obj, extras={"rl": rl}))
                return out.loss_sum / out.denom, out.metrics
            return jax.value_and_grad(loss, has_aux=True)(params)
        (value, metrics), grads = f(state.params, state.rest, batch)
        assert calls.pop(0, None) == (chunk > 0 or None)  # the knob picks the path (traced once)
        return float(value), jax.device_get(metrics), jax.device_get(grads)

    chunked, plain = run(32), run(0)
    assert chunked[0] == pytest.approx(plain[0], rel=1e-5)
    for k in plain[1]:
        np.testing.assert_allclose(np.asarray(chunked[1][k]), np.asarray(plain[1][k]), rtol=1e-4, atol=1e-5, err_msg=k)
    flat_c, flat_p = (jax.tree_util.tree_flatten_with_path(g[2])[0] for g in (chunked, plain))
    assert max(float(np.abs(r).max()) for _, r in flat_p) > 1e-3
    for (path, g), (_, r) in zip(flat_c, flat_p):
        np.testing.assert_allclose(g, r, rtol=2e-3, atol=2e-6, err_msg=jax.tree_util.keystr(path))
