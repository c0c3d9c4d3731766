"""KV-cache sampler: log-probs equal teacher forcing, greedy tokens equal full recomputation,
top-k / top-p respected, per-sequence EOS, right padding, sharded on an 8-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import MeshConfig, ModelConfig
from jaxllm.app.inference import _sample
from jaxllm.core.model import Transformer
from jaxllm.core.sampler import filter_logits, generate_ids, pad_prompts, sample_token
from jaxllm.core.sharding import make_mesh, make_rules, state_shardings

PROMPTS = [[2, 5, 9, 11], [2, 7], [2, 100, 200, 300, 400, 17], [2, 40, 41]]


def _model(scan: bool):
    return Transformer(ModelConfig(scan_layers=scan, n_layers=2), nnx.Rngs(0))


def _teacher_forced_logps(model, prompts, tokens, temperature=1.0):
    full = np.concatenate([prompts, tokens], 1)
    seg = (np.cumsum(full != 0, 1) > 0).astype(np.int32)
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0)
    logits = model(jnp.asarray(full), jnp.asarray(pos), jnp.asarray(seg)) / temperature
    lp = np.asarray(jax.nn.log_softmax(logits, -1))
    P = prompts.shape[1]
    return np.take_along_axis(lp[:, P - 1:-1], tokens[..., None], -1)[..., 0]


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_cache_equals_full_recompute_and_logps_match(scan):
    model = _model(scan)
    g, st = nnx.split(model)
    prompts = pad_prompts(PROMPTS)
    out = generate_ids(g, st, prompts, 12)
    buf = np.concatenate([prompts, np.zeros((len(PROMPTS), 12), np.int32)], 1)
    ref = np.asarray(_sample(g, st, jnp.asarray(buf), jax.random.key(0), jnp.float32(0), 12))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    tf = _teacher_forced_logps(model, prompts, np.asarray(out.tokens))
    np.testing.assert_allclose(np.asarray(out.logps), tf, atol=2e-5)


def test_sampled_logps_match_teacher_forcing_at_temperature():
    model = _model(False)
    g, st = nnx.split(model)
    prompts = pad_prompts(PROMPTS)
    out = generate_ids(g, st, prompts, 10, rng=jax.random.key(3), temperature=0.7, top_k=50)
    tf = _teacher_forced_logps(model, prompts, np.asarray(out.tokens), 0.7)
    np.testing.assert_allclose(np.asarray(out.logps) * np.asarray(out.mask), tf * np.asarray(out.mask), atol=2e-5)
    assert np.asarray(out.mask).all()


def test_per_sequence_eos_and_right_padding():
    model = _model(False)
    g, st = nnx.split(model)
    prompts = pad_prompts(PROMPTS)
    free = np.asarray(generate_ids(g, st, prompts, 8).tokens)
    eos = int(free[0, 2])  # make sequence 0's third token the stop token
    out = generate_ids(g, st, prompts, 8, eos_id=eos)
    mask, tokens = np.asarray(out.mask), np.asarray(out.tokens)
    assert mask[0, :3].all() and not mask[0, 3:].any() and bool(out.finished[0])
    for i in range(1, len(PROMPTS)):  # the others run until they produce it (or to the end)
        hit = np.where(free[i] == eos)[0]
        n = hit[0] + 1 if len(hit) else 8
        assert mask[i].sum() == n and (tokens[i, :n] == free[i, :n]).all()
    right = np.zeros_like(prompts)
    for i, p in enumerate(PROMPTS):
        right[i, :len(p)] = p
    np.testing.assert_array_equal(np.asarray(generate_ids(g, st, right, 8, padding="right").tokens), free)


def test_sharded_sampler_matches_single_device():
    model = _model(True)
    g, st = nnx.split(model)
    prompts = pad_prompts(PROMPTS * 2)
    ref = generate_ids(g, st, prompts, 8)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = make_rules()
    params = jax.device_put(st, state_shardings(st, mesh, rules))
    from jaxllm.core.arrays import host_to_global
    out = generate_ids(g, params, host_to_global(prompts, mesh, rules, process_local=False), 8, mesh=mesh, rules=rules)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logps), np.asarray(ref.logps), atol=1e-4)
    assert out.tokens.sharding.spec[0] == ("data", "fsdp")


def test_top_k_and_top_p_on_a_known_distribution():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    logits = jnp.log(jnp.asarray(np.tile(probs, (20000, 1)), jnp.float32))

    def freqs(top_k, top_p):
        tok, _ = sample_token(jax.random.key(1), logits, jnp.float32(1.0), top_k, jnp.float32(top_p))
        return np.bincount(np.asarray(tok), minlength=4) / len(tok)

    np.testing.assert_allclose(freqs(0, 1.0), probs, atol=0.015)
    np.testing.assert_allclose(freqs(2, 1.0), [4 / 7, 3 / 7, 0, 0], atol=0.015)
    np.testing.assert_allclose(freqs(0, 0.6), [4 / 7, 3 / 7, 0, 0], atol=0.015)  # 0.4 < 0.6 needs the 2nd
    np.testing.assert_allclose(freqs(0, 0.75), [4 / 9, 3 / 9, 2 / 9, 0], atol=0.015)
    np.testing.assert_allclose(freqs(3, 0.5), [4 / 7, 3 / 7, 0, 0], atol=0.015)
    kept = np.isfinite(np.asarray(filter_logits(jnp.log(jnp.asarray(probs)), 0, 0.3)))
    np.testing.assert_array_equal(kept, [True, False, False, False])


def _decode_hlo(graphdef, state, prompts, mesh, rules):
    """Compiled HLO text of the sampler (prefill + decode loop) for these weights' layout."""
    from jaxllm.core.arrays import host_to_global
    from jaxllm.core.sampler import _generate, _stop_array
    p = host_to_global(prompts, mesh, rules, process_local=False)
    return _generate.lower(graphdef, state, p, None, jax.random.key(0), jnp.float32(0), jnp.float32(1),
                           _stop_array(()), jnp.int32(0), max_new=4, top_k=0, mesh=mesh,
                           rules=tuple(sorted(rules.items())), decode_impl="xla").compile().as_text()


def test_sampler_layout_resharded_once_gathers_no_weights_while_decoding():
    """rl.sampler_mesh: the policy trained fsdp-8 is resharded once to a replicated sampler layout
    (batch over data); the compiled decode then has no all-gather (the fsdp layout has them) and
    its greedy tokens equal the training layout's."""
    from types import SimpleNamespace
    from jaxllm.core.arrays import host_to_global
    from jaxllm.rl.rollout import sampling_policy
    g, st = nnx.split(_model(True))
    rules = make_rules()
    train = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    params = jax.device_put(st, state_shardings(st, train, rules))
    ctx = SimpleNamespace(actor_critic=False, mesh=train, rules=rules,
                          sampler_mesh=make_mesh(MeshConfig(data=8, fsdp=1, tensor=1)))
    sg, sst, smesh = sampling_policy(ctx, g, params)
    assert smesh is ctx.sampler_mesh
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(sst))
    prompts = pad_prompts(PROMPTS * 2)
    assert "all-gather" in _decode_hlo(g, params, prompts, train, rules)
    assert "all-gather" not in _decode_hlo(sg, sst, prompts, smesh, rules)
    a = generate_ids(g, params, host_to_global(prompts, train, rules, process_local=False), 8, mesh=train, rules=rules)
    b = generate_ids(sg, sst, host_to_global(prompts, smesh, rules, process_local=False), 8, mesh=smesh, rules=rules)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logps), np.asarray(b.logps), atol=1e-4)
