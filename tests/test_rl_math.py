"""RL math API against values computed by hand from the formulas."""

import math

import numpy as np
import pytest

from jaxllm.objectives import gae, group_advantages, kl_penalty, ppo_policy_loss, ppo_value_loss


def test_kl_estimators_on_known_logprobs():
    logp, ref = np.log([0.5, 0.5]), np.log([0.25, 0.5])  # d = ref - logp = (-ln 2, 0)
    ln2 = math.log(2)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k1"), [ln2, 0.0], atol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k2"), [ln2 ** 2 / 2, 0.0], atol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k3"), [0.5 + ln2 - 1, 0.0], atol=1e-6)
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_gae_short_trajectory():
    adv, ret = gae(np.array([[0.0, 0.0, 1.0]]), np.array([[0.5, 0.6, 0.7]]), np.ones((1, 3)), gamma=1.0, lam=0.5)
    # delta2 = 1 - .7 = .3; delta1 = .7 - .6 = .1, A1 = .1 + .5*.3; delta0 = .6 - .5, A0 = .1 + .5*A1
    np.testing.assert_allclose(adv, [[0.225, 0.25, 0.3]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.725, 0.85, 1.0]], atol=1e-6)


def test_gae_respects_mask_and_discount():
    # prompt token (masked), two completion tokens, padding: the value after the last real token is 0
    rewards = np.array([[0.0, 0.0, 1.0, 5.0]])
    values = np.array([[9.0, 0.6, 0.7, 9.0]])
    mask = np.array([[0, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    a2 = 1.0 - 0.7
    a1 = 0.9 * 0.7 - 0.6 + 0.9 * 0.5 * a2
    np.testing.assert_allclose(adv, [[0.0, a1, a2, 0.0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.0, a1 + 0.6, a2 + 0.7, 0.0]], atol=1e-6)


def test_group_advantages_with_zero_variance_group():
    r = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    std = math.sqrt(2 / 3)
    np.testing.assert_allclose(group_advantages(r, 3), [-1 / std, 0, 1 / std, 0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(group_advantages(r, 3, normalize_std=False), [-1, 0, 1, 0, 0, 0], atol=1e-6)


def test_ppo_policy_loss_clips_on_both_sides():
    ratios = np.array([1.5, 0.5, 0.5, 1.5, 3.0])
    old = np.zeros(5)
    logp = np.log(ratios)
    adv = np.array([1.0, 1.0, -1.0, -1.0, 100.0])
    mask = np.array([1, 1, 1, 1, 0])
    # per token max(-A r, -A clip(r, .8, 1.2)): -1.2 (clipped), -0.5, 0.8 (clipped), 1.5; last masked
    loss, m = ppo_policy_loss(logp, old, adv, mask, 0.2, 0.2)
    assert abs(float(loss) - (-1.2 - 0.5 + 0.8 + 1.5) / 4) < 1e-6
    assert abs(float(m["clip_fraction"]) - 0.5) < 1e-6
    loss_hi, _ = ppo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)  # eps_high only moves token 0
    assert abs(float(loss_hi) - (-1.28 - 0.5 + 0.8 + 1.5) / 4) < 1e-6


def test_ppo_value_loss_clipped():
    v, old, ret = np.array([1.0, 0.0, 7.0]), np.array([0.5, 0.5, 0.0]), np.array([2.0, 0.0, 0.0])
    loss = ppo_value_loss(v, old, ret, np.array([1, 1, 0]), clip=0.2)
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69; token 1: max(0, 0.3^2) = 0.09; halves, mean of two
    assert abs(float(loss) - (0.5 * 1.69 + 0.5 * 0.09) / 2) < 1e-6


def test_rloo_reinforce_pp_and_gspo_hand_computed():
    from jaxllm.rl.algorithms import gspo_ratio, reinforce_pp_advantages, rloo_advantages
    np.testing.assert_allclose(np.asarray(rloo_advantages([1.0, 0.0, 0.0, 1.0], 2)), [1, -1, -1, 1], atol=1e-6)
    np.testing.assert_allclose(np.asarray(rloo_advantages([3.0, 0.0, 0.0], 3)), [3, -1.5, -1.5], atol=1e-6)
    # returns [[1, 1, 1], [2, 2, -]]: mean 1.4, population std sqrt(0.24)
    adv = np.asarray(reinforce_pp_advantages([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]], [[1, 1, 1], [1, 1, 0]]))
    sd = np.sqrt(0.24)
    np.testing.assert_allclose(adv, [[-0.4 / sd] * 3, [0.6 / sd, 0.6 / sd, 0.0]], rtol=1e-5)
    # masked mean log-ratio (0.5 + 0) / 2 -> exp(0.25); the unmasked third token is ignored
    np.testing.assert_allclose(np.asarray(gspo_ratio([[-1.0, -2.0, -3.0]], [[-1.5, -2.0, -2.0]], [[1, 1, 0]])),
                               [np.exp(0.25)], rtol=1e-6)


def test_advantage_estimators_are_registry_entries():
    from jaxllm.config import RLConfig
    from jaxllm.errors import ConfigError
    from jaxllm.rl.algorithms import ADVANTAGES, Scored
    s = Scored(scores=np.array([1.0, 0.0, 2.0, 2.0], np.float32), loss_mask=np.array([[1, 1]] * 4, np.float32),
               token_kl=np.zeros((4, 2), np.float32), kl_coef=0.0, group_size=2)
    out, metrics = ADVANTAGES.pick("rloo")(s, RLConfig())
    np.testing.assert_allclose(out["advantages"], [[1, 1], [-1, -1], [0, 0], [0, 0]])
    assert metrics["live_group_fraction"] == 0.5  # the all-equal group trains nothing
    out, _ = ADVANTAGES.pick("reinforce_pp")(s, RLConfig())
    assert out["advantages"].shape == (4, 2) and abs(float(out["advantages"].mean())) < 1e-6
    with pytest.raises(ConfigError, match="rl.advantage='rlo' is not known; did you mean 'rloo'"):
        ADVANTAGES.pick("rlo")


def _grad(loss_fn, logps):
    import jax
    import jax.numpy as jnp
    return np.asarray(jax.grad(lambda lp: loss_fn(lp).sum())(jnp.asarray(logps, jnp.float32)))


def test_gspo_cispo_dr_grpo_losses_hand_computed():
    import jax.numpy as jnp
    from jaxllm.config import RLConfig
    from jaxllm.objectives import cispo_policy_loss, dr_grpo_policy_loss, gspo_policy_loss
    from jaxllm.rl.algorithms import POLICY_LOSSES, aggregate
    lp, old = np.array([[-1.0, -2.0, -3.0]]), np.array([[-1.5, -2.0, -2.0]])
    mask, adv = np.array([[1.0, 1.0, 0.0]]), np.array([[2.0, 2.0, 2.0]])
    # GSPO: sequence ratio exp(0.25) = 1.284 on every token; clip_high 0.2 caps it at 1.2 (A > 0)
    rl = RLConfig(clip_low=0.2, clip_high=0.2)
    loss, clipped = gspo_policy_loss(lp, old, adv, mask, rl)
    np.testing.assert_allclose(np.asarray(loss)[0, :2], [-2 * 1.2] * 2, rtol=1e-6)
    assert bool(clipped[0, 0]) and POLICY_LOSSES.pick("gspo").aggregation == "sequence"
    # unclipped (wide range): d loss_t / d logp_t = -A * s, s the sequence ratio, token by token
    wide = RLConfig(clip_low=0.9, clip_high=0.9)
    g = _grad(lambda x: gspo_policy_loss(x, old, adv, mask, wide)[0] * mask, lp)
    np.testing.assert_allclose(g, [[-2 * np.exp(0.25)] * 2 + [0.0]], rtol=1e-5)
    # CISPO: weight min(r, 1 + 0.2) stop-gradient; r = [e^0.5, 1, e^-1]; grad = -w * A on every token
    loss, capped = cispo_policy_loss(lp, old, adv, mask, rl)
    w = np.minimum(np.exp(lp - old), 1.2)
    np.testing.assert_allclose(np.asarray(loss), -w * adv * lp, rtol=1e-6)
    np.testing.assert_allclose(_grad(lambda x: cispo_policy_loss(x, old, adv, mask, rl)[0], lp), -w * adv, rtol=1e-6)
    assert list(np.asarray(capped)[0]) == [True, False, False]  # capped, but still has a gradient
    # Dr. GRPO: the PPO-clip surrogate, normalised by sequences x max_new_tokens
    per_tok, _ = dr_grpo_policy_loss(lp, old, adv, mask, rl)
    total, denom = aggregate(per_tok, jnp.asarray(mask), "constant", max_tokens=8)
    np.testing.assert_allclose(float(total), float((np.asarray(per_tok) * mask).sum()), rtol=1e-6)
    assert float(denom) == 8.0  # one sequence with generated tokens x 8


def test_dr_grpo_needs_unnormalised_advantages(tiny):
    from jaxllm.errors import ConfigError
    from jaxllm.objectives import validate
    base = ["objective.name=grpo", "data.kind=prompt", 'rl.rewards=[{kind: function, fn: "jaxllm.rl.rewards:exact_match"}]']
    cfg = tiny(*base, "rl.loss_type=dr_grpo", base="configs/runs/grpo_tiny.yaml")
    with pytest.raises(ConfigError, match="rl.advantage_norm=mean"):
        validate(cfg)
    validate(tiny(*base, "rl.loss_type=dr_grpo", "rl.advantage_norm=mean", base="configs/runs/grpo_tiny.yaml"))
    with pytest.raises(ConfigError, match="did you mean 'gspo'"):
        validate(tiny(*base, "rl.loss_type=gsop", base="configs/runs/grpo_tiny.yaml"))


def test_dapo_loss_overlong_penalty_and_options_hand_computed():
    from jaxllm.config import RLConfig
    from jaxllm.rl.algorithms import POLICY_LOSSES, overlong_penalty, rollout_options
    dapo = POLICY_LOSSES.pick("dapo")
    rl = RLConfig(clip_low=0.2, clip_high=0.28, max_new_tokens=12)
    # ratios e^0.4 = 1.49 (A=+1: capped at 1.28, clip-higher) and e^-0.7 = 0.50 (A=-1: floored at 0.8)
    lp, old = np.array([[-1.0, -1.7]]), np.array([[-1.4, -1.0]])
    loss, clipped = dapo(lp, old, np.array([[1.0, -1.0]]), np.ones((1, 2)), rl)
    np.testing.assert_allclose(np.asarray(loss), [[-1.28, 0.8]], rtol=1e-6)
    assert np.asarray(clipped).all() and dapo.aggregation == "token"
    assert rollout_options(rl) == (False, 0)  # grpo: neither
    assert rollout_options(RLConfig(loss_type="dapo", max_new_tokens=12)) == (True, 3)
    assert rollout_options(RLConfig(loss_type="dapo", dynamic_sampling="off", overlong_buffer=0)) == (False, 0)
    assert rollout_options(RLConfig(dynamic_sampling="on", overlong_buffer=2)) == (True, 2)
    # max 10 tokens, buffer 4: no penalty up to 6, linear to -1 at 10; cut off (unfinished) = -1
    pen = overlong_penalty([5, 6, 7, 8, 10, 10], [1, 1, 1, 1, 1, 0], max_new=10, buffer=4, penalty=1.0)
    np.testing.assert_allclose(pen, [0, 0, -0.25, -0.5, -1, -1])


def test_tis_weights_hand_computed():
    from jaxllm.rl.algorithms import tis_weights
    trainer, sampler = np.array([[-1.0, -2.0, 0.0, -3.0]]), np.array([[-1.5, -1.0, -2.0, -3.0]])
    w = tis_weights(trainer, sampler, np.array([[1, 1, 1, 0]]), cap=2.0)
    np.testing.assert_allclose(w, [[np.exp(0.5), np.exp(-1.0), 2.0, 0.0]], rtol=1e-6)  # e^2 capped at 2


def _lengthy(prompt, completion, reference):
    return float(len(completion))


def test_reward_terms_normalised_before_their_weights():
    from jaxllm.config import RewardConfig, RLConfig
    from jaxllm.rl.rewards import Rewards
    terms = [RewardConfig(fn="jaxllm.rl.rewards:exact_match", weight=1.0),
             RewardConfig(fn="tests.test_rl_math:_lengthy", weight=0.5)]
    comps, refs = ["4", "5", "40000", "4"], ["4"] * 4
    args = (["p"] * 4, comps, refs, {}, np.array([1, 1, 5, 1]), np.ones(4, bool))
    em, n = np.array([1.0, 0, 0, 1]), np.array([1.0, 1, 5, 1])
    raw, t = Rewards(RLConfig(rewards=terms), None, None, None)(*args)
    np.testing.assert_allclose(raw, em + 0.5 * n, rtol=1e-6)
    np.testing.assert_array_equal(t["reward_exact_match"], em)  # the report keeps raw terms
    white = lambda v: (v - v.mean()) / (v.std() + 1e-6)
    norm, t = Rewards(RLConfig(rewards=terms, reward_norm="whiten"), None, None, None)(*args)
    np.testing.assert_allclose(norm, white(em) + 0.5 * white(n), rtol=1e-5)
    np.testing.assert_array_equal(t["reward_exact_match"], em)
    clip, _ = Rewards(RLConfig(rewards=terms, reward_norm="clip", reward_clip=2.0), None, None, None)(*args)
    np.testing.assert_allclose(clip, em + 0.5 * np.minimum(n, 2.0), rtol=1e-6)
    held_out, _ = Rewards(RLConfig(rewards=terms, reward_norm="whiten"), None, None, None)(*args, train=False)
    np.testing.assert_allclose(held_out, raw, rtol=1e-6)  # held-out scores keep their units


def test_dynamic_sampling_refills_all_equal_groups():
    """Groups of 2, 4 groups a rollout: round 1 has 2 live groups, round 2 fills the rest; with
    one round allowed the all-equal groups fill the rollout."""
    from types import SimpleNamespace
    import jax
    from jaxllm.config import RLConfig
    from jaxllm.rl.rollout import ExperienceIterator
    rounds = [np.array([1, 1, 0, 1, 0, 0, 1, 0.]), np.array([0, 1, 1, 0, 1, 1, 0, 1.])]

    def run(rl):
        it = ExperienceIterator.__new__(ExperienceIterator)
        it.ctx = SimpleNamespace(cfg=SimpleNamespace(rl=rl))
        feed = iter(enumerate(rounds))  # sequence ids: 0-7 in round 1, 10-17 in round 2
        it._sample = lambda policy, key: (lambda r, sc: {"scores": sc, "id": np.arange(8) + 10 * r})(*next(feed))
        return it._sample_groups(None, jax.random.key(0))

    roll, n = run(RLConfig(group_size=2, loss_type="dapo"))
    assert n == 2
    assert list(roll["id"]) == [2, 3, 6, 7, 10, 11, 12, 13]  # live groups of round 1, then round 2's
    roll, n = run(RLConfig(group_size=2, loss_type="dapo", max_sampling_rounds=1))
    assert n == 1 and list(roll["id"]) == [2, 3, 6, 7, 0, 1, 4, 5]  # live first, then all-equal
    roll, n = run(RLConfig(group_size=2))  # grpo: one round as sampled
    assert n == 1 and list(roll["id"]) == list(range(8))


def test_verifiable_reward_functions_by_hand():
    from jaxllm.rl.rewards import char_match, exact_match, numeric_answer, token_overlap
    assert exact_match("p", " 42 \n", "42") == 1.0 and exact_match("p", "421", "42") == 0.0
    assert numeric_answer("p", "it is 7.0.", "7") == 1.0 and numeric_answer("p", "none", "7") == 0.0
    assert token_overlap("p", "1 2 9 5", "1 2 5 9") == 0.5
    assert char_match("p", "abdc", "abcd") == 0.5  # a, b in place; c, d swapped
    assert char_match("p", "abcdef", "abc") == 0.5  # extra characters cost credit: 3 of 6
    assert char_match("p", "ab", "abcd") == 0.5
    assert char_match("p", " 114 ", "114") == 1.0 and char_match("p", "", "") == 1.0
    assert char_match("p", "", "12") == 0.0


@pytest.mark.parametrize("name", ["group", "rloo", "reinforce_pp", "gae"])
def test_advantage_estimators_trace_under_jit(name):
    """Every estimator runs inside the rollout's one jitted scoring function: traced, no host math
    (a numpy call on a tracer would raise), and the same numbers as an eager call."""
    import jax
    import jax.numpy as jnp
    from jaxllm.config import RLConfig
    from jaxllm.rl.algorithms import ADVANTAGES, Scored
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.int32)
    args = (jnp.asarray([1.0, 0.0, 2.0, 0.5]), jnp.asarray(mask), jnp.asarray(rng.normal(size=(4, 4)), jnp.float32) * mask,
            jnp.float32(0.1), jnp.asarray(rng.normal(size=(4, 4)), jnp.float32))

    def run(scores, loss_mask, token_kl, kl_coef, values):
        return ADVANTAGES.pick(name)(Scored(scores, loss_mask, token_kl, kl_coef, 2, values), RLConfig())

    eager, jitted = run(*args), jax.jit(run)(*args)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(jitted[0]["advantages"])).all()
