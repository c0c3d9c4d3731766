"""Same config and seed, same mesh -> bit-identical losses and weights, for every stage (RL too:
sampling keys come from the step, data order from (seed, step))."""

import jax
import numpy as np
import pytest

from jaxllm.core.monitor import read_metrics
from jaxllm.objectives import make_trainer
from tests.conftest import stage_config, tiny_config

SHORT = ["train.progress=false", "train.log_every=1", "eval.every=0", "checkpoint.every=0"]


def _stage_cfg(name, tmp, pretrained, sft, rm):
    if name == "pretrain":
        return tiny_config(tmp, *SHORT, "train.steps=4", "train.batch_size=8")
    init = f"checkpoint.init_from={pretrained if name == 'sft' else sft}"
    extra = {"sft": ["train.steps=4", "objective.eval_generate=0"],
             "rm": ["train.steps=4"],
             "dpo": ["train.steps=4"],
             "grpo": ["train.steps=4", "rl.max_new_tokens=6"],
             "ppo": ["train.steps=4", "rl.max_new_tokens=6", f"rl.critic_init={rm}",
                     f'rl.rewards=[{{kind: model, path: "{rm}"}}]']}[name]
    return stage_config(tmp, f"{name}_tiny", *SHORT, init, *extra)


@pytest.mark.parametrize("name", ["pretrain", pytest.param("sft", marks=pytest.mark.slow),
                                  pytest.param("rm", marks=pytest.mark.slow), pytest.param("dpo", marks=pytest.mark.slow),
                                  pytest.param("grpo", marks=pytest.mark.slow),
                                  pytest.param("ppo", marks=pytest.mark.slow)])  # slow: `pytest -m slow`
def test_two_runs_are_bit_identical(name, pretrained, sft, reward_model, tmp_path):
    runs = []
    for i in range(2):
        cfg = _stage_cfg(name, tmp_path / f"r{i}", pretrained, sft, reward_model[0])
        t = make_trainer(cfg)
        t.run()
        metrics = [{k: v for k, v in m.items() if k in ("step", "loss", "grad_norm", "reward_mean", "kl")}
                   for m in read_metrics(cfg.output_dir) if "loss" in m]
        runs.append((metrics, jax.device_get(t.state.params)))
    (m0, p0), (m1, p1) = runs
    assert len(m0) == 4 and m0 == m1  # exact float equality, step by step
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
