"""The public math API against values computed by hand from the formulas."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.objectives import dpo_loss, reward_pair_loss, sequence_logprobs


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_sequence_logprobs_with_mask_and_padding():
    logits = jnp.array([[[0.0, math.log(3.0)], [math.log(2.0), 0.0], [5.0, -5.0]]])  # [1, 3, 2]
    tokens = jnp.array([[1, 0, 1]])
    mask = jnp.array([[1, 1, 0]])  # last position is padding
    expected = math.log(3 / 4) + math.log(2 / 3)
    assert float(sequence_logprobs(logits, tokens, mask)[0]) == pytest.approx(expected, abs=1e-6)
    assert float(sequence_logprobs(logits, tokens, jnp.zeros((1, 3)))[0]) == 0.0


def test_reward_pair_loss():
    c, r = jnp.array([2.0, 0.0, -1.0]), jnp.array([1.0, 0.0, 1.0])
    got = np.asarray(reward_pair_loss(c, r))
    np.testing.assert_allclose(got, [-math.log(_sig(1)), math.log(2), -math.log(_sig(-2))], rtol=1e-6)
    assert got.shape == (3,)
    np.testing.assert_allclose(np.asarray(reward_pair_loss(c, r, margin=0.5))[0], -math.log(_sig(0.5)), rtol=1e-6)


def test_dpo_loss_hand_values():
    pc, pr, rc, rr = jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.5])
    delta = (-1 + 3) - (-2 + 2.5)  # 1.5
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert float(losses[0]) == pytest.approx(-math.log(_sig(0.15)), rel=1e-6)
    assert float(cr[0]) == pytest.approx(0.1 * (-1 + 2)) and float(rj[0]) == pytest.approx(0.1 * (-3 + 2.5))
    eps = 0.2
    ls, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=eps)
    assert float(ls[0]) == pytest.approx(-(1 - eps) * math.log(_sig(0.15)) - eps * math.log(_sig(-0.15)), rel=1e-6)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert float(ipo[0]) == pytest.approx((delta - 1 / 0.2) ** 2, rel=1e-6)


def test_dpo_limits_behave_as_the_formula_says():
    pc, pr, rc, rr = jnp.array([-1.0, -3.0]), jnp.array([-3.0, -1.0]), jnp.zeros(2), jnp.zeros(2)
    big, _, _ = dpo_loss(pc, pr, rc, rr, beta=100.0)
    # large beta: loss -> 0 when the policy prefers chosen, -> beta*|delta| when it prefers rejected
    assert float(big[0]) < 1e-6 and float(big[1]) == pytest.approx(200.0, rel=1e-4)
    # label smoothing penalises over-confidence: loss with eps > 0 grows with beta*delta
    s1, _, _ = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=1.0, label_smoothing=0.1)
    s2, _, _ = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=10.0, label_smoothing=0.1)
    assert float(s2[0]) > float(s1[0])
    # equal policy and reference: log 2 regardless of beta
    z, _, _ = dpo_loss(rc, rr, rc, rr, beta=3.0)
    np.testing.assert_allclose(np.asarray(z), [math.log(2)] * 2, rtol=1e-6)
