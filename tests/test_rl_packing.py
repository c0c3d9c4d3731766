"""Packed RL mini-batches (`data.packing=first_fit`): rollout sequences moved into first-fit rows
keep every per-token array, and every policy loss / aggregation (and PPO's value loss) equals the
padded one, in value and gradient."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig, ObjectiveConfig, RLConfig
from jaxllm.objectives import model_class
from jaxllm.objectives.rl import grpo_loss, ppo_loss
from jaxllm.rl.packing import bucket, first_fit, pack_rollout, padding_fraction
from jaxllm.rl.rollout import layout
from jaxllm.train.objective import LossContext

P, M, V = 12, 10, 64


def _rollout(n=8, seed=0):
    """A padded rollout batch of n sequences: prompts of 2..P real tokens (left-padded),
    completions of 1..M generated tokens, with random old/ref log-probs, advantages, values."""
    rng = np.random.default_rng(seed)
    plen, clen = rng.integers(2, P + 1, n), rng.integers(1, M + 1, n)
    prompts = rng.integers(3, V, (n, P))
    prompt_mask = (np.arange(P)[None] >= P - plen[:, None]).astype(np.int32)
    tokens = rng.integers(3, V, (n, M))
    mask = (np.arange(M)[None] < clen[:, None]).astype(np.int32)
    b = layout(prompts, prompt_mask, tokens, mask, pad_id=0)
    T = b["inputs"].shape[1]
    m = b["loss_mask"].astype(np.float32)
    b.update(old_logps=(rng.normal(-2, 0.3, (n, T)) * m).astype(np.float32),
             ref_logps=(rng.normal(-2, 0.3, (n, T)) * m).astype(np.float32),
             advantages=(rng.normal(0, 1, (n, 1)) * m).astype(np.float32),
             old_values=(rng.normal(0, 1, (n, T)) * m).astype(np.float32),
             returns=(rng.normal(0, 1, (n, T)) * m).astype(np.float32))
    return b, plen, clen


def test_pack_rollout_moves_whole_sequences():
    b, plen, clen = _rollout(8)
    packed = pack_rollout(b, width=32, row_multiple=2)
    n = len(plen)
    assert packed["inputs"].shape[0] % 2 == 0 and packed["inputs"].shape[0] < n
    assert padding_fraction(packed) < padding_fraction(b)
    ids = packed["sequence_ids"]
    for i in range(n):
        at = ids == i
        real = b["segment_ids"][i] > 0
        assert at.sum() == real.sum()  # every real token, nothing else
        for k in ("inputs", "targets", "positions", "loss_mask", "old_logps", "advantages"):
            np.testing.assert_array_equal(packed[k][at], b[k][i][real], err_msg=k)
        row = np.nonzero(at.any(1))[0]
        assert len(row) == 1  # one row holds the whole sequence
        assert packed["positions"][at][0] == 0  # positions restart per sequence
        assert len(np.unique(packed["segment_ids"][at])) == 1
    assert np.all((packed["segment_ids"] == 0) == (ids == n))  # padding only where no sequence is


def test_first_fit_and_bucket():
    assert first_fit(np.array([5, 3, 4, 2]), 8) == [[0, 1], [2, 3]]
    assert first_fit(np.array([6, 6, 2]), 8) == [[0, 2], [1]]
    assert [bucket(r, 2) for r in (1, 2, 3, 5, 8)] == [2, 2, 4, 8, 8]
    from jaxllm.errors import ConfigError
    with pytest.raises(ConfigError, match="train.seq_len"):
        first_fit(np.array([9]), 8)


def _value_and_grad(fn, model, batch, rl, n):
    ctx = LossContext(rng=jax.random.key(0), cfg=ObjectiveConfig(), extras={"rl": rl, "sequences": n})
    graphdef, state = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def f(s):
        out = fn(nnx.merge(graphdef, s), batch, ctx)
        return out.loss_sum / out.denom, (out.loss_sum, out.denom)

    (loss, (total, denom)), grads = jax.value_and_grad(f, has_aux=True)(state)
    return float(total), float(denom), grads


def _assert_same_loss(fn, model, padded, packed, rl, n=8):
    """Same sum, same denominator, same parameter gradients (packed vs padded rows)."""
    a_tot, a_den, a_g = _value_and_grad(fn, model, padded, rl, n)
    p_tot, p_den, p_g = _value_and_grad(fn, model, packed, rl, n)
    assert a_den == p_den
    np.testing.assert_allclose(p_tot, a_tot, rtol=1e-4, atol=1e-6)
    for x, y in zip(jax.tree.leaves(a_g), jax.tree.leaves(p_g)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=2e-3, atol=2e-6)


SLOW = pytest.mark.slow  # CI time: `pytest -m slow` runs every loss


@pytest.mark.parametrize("loss_type,agg", [pytest.param("grpo", "token", marks=SLOW),
                                           pytest.param("grpo", "sequence", marks=SLOW),
                                           pytest.param("dr_grpo", "token", marks=SLOW), ("gspo", "token"),
                                           pytest.param("cispo", "token", marks=SLOW)])
def test_packed_policy_losses_equal_padded(loss_type, agg):
    b, _, _ = _rollout(8, seed=1)
    rl = dataclasses.replace(RLConfig(), loss_type=loss_type, loss_agg=agg, max_new_tokens=M, kl_coef=0.05,
                             temperature=1.0, clip_low=0.2, clip_high=0.28)
    model = model_class("grpo")(ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                                            mlp_dim=64, vocab_size=V), nnx.Rngs(0))
    keys = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "old_logps", "ref_logps", "advantages")
    padded = {k: b[k] for k in keys}
    packed = pack_rollout(padded, width=32)
    _assert_same_loss(grpo_loss, model, padded, packed, rl)


def test_packed_ppo_loss_equals_padded():
    b, _, _ = _rollout(8, seed=2)
    rl = dataclasses.replace(RLConfig(), max_new_tokens=M, temperature=1.0)
    model = model_class("ppo")(ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                                           mlp_dim=64, vocab_size=V), nnx.Rngs(0))
    packed = pack_rollout(b, width=32)
    _assert_same_loss(ppo_loss, model, b, packed, rl)
