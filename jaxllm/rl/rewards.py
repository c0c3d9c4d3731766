"""Reward sources for RL. Verifiable rewards are plain functions
`reward(prompt, completion, reference) -> float`, referenced from a config by "module:function";
a reward-model checkpoint scores (prompt + completion) with its scalar head. `Rewards` combines
several with weights, a per-token length penalty and a penalty for never reaching EOS."""

from __future__ import annotations

import importlib
import re
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import RLConfig, RewardConfig
from jaxllm.core.arrays import last_token_index
from jaxllm.core.loading import load_model
from jaxllm.core.model import ScalarHeadModel
from jaxllm.errors import ConfigError
from jaxllm.rl.algorithms import overlong_penalty, rollout_options


# ---- verifiable rewards ------------------------------------------------------------------------
def exact_match(prompt: str, completion: str, reference: str) -> float:
    """1 if the completion equals the reference answer (surrounding whitespace ignored)."""
    return float(completion.strip() == reference.strip())


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def numeric_answer(prompt: str, completion: str, reference: str) -> float:
    """1 if the first number in the completion equals the reference number."""
    got, want = _NUMBER.search(completion), _NUMBER.search(reference)
    return float(bool(got and want) and float(got.group()) == float(want.group()))


def token_overlap(prompt: str, completion: str, reference: str) -> float:
    """Partial credit: fraction of the reference's space-separated items found in order."""
    want, got = reference.split(), completion.split()
    if not want:
        return 0.0
    return sum(1.0 for a, b in zip(want, got) if a == b) / len(want)


def load_function(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rl.rewards: cannot import reward function {spec!r} ({e}); give "
                          f"'module.path:function' importable from this environment") from None
    if not callable(fn):
        raise ConfigError(f"rl.rewards: {spec!r} is not callable")
    return fn


def char_match(prompt: str, completion: str, reference: str) -> float:
    """Partial credit per character: right characters in the right place over the longer of the two
    strings (whitespace at the ends ignored), so a near miss scores between 0 and 1 and extra or
    missing characters cost credit. Dense signal for answers that are one word or number."""
    want, got = reference.strip(), completion.strip()
    if not want and not got:
        return 1.0
    return sum(1.0 for a, b in zip(want, got) if a == b) / max(len(want), len(got))


# ---- reward model ---------------------------------------------------------------------------
def load_scalar_model(path: str, mesh, rules, tok=None):
    """Reward-model checkpoint -> (graphdef, params on the mesh). Checks the tokenizer."""
    model, _ = load_model(path, ScalarHeadModel, mesh, rules, tok, require="score",
                          hint="rl.rewards kind=model takes the output of a reward_bt run")
    return nnx.split(model, nnx.Param)  # a scalar-head model holds nothing but params


@jax.jit
def _score_last(graphdef, params, inputs, positions, segment_ids):
    """Scalar reward read at the last real token of each [B, T] sequence."""
    model = nnx.merge(graphdef, params)
    scores = model.scores(inputs, positions, segment_ids)
    return jnp.take_along_axis(scores, last_token_index(segment_ids)[:, None], axis=1)[:, 0]


class Rewards:
    """Weighted sum of reward terms over a rollout (each normalised first, rl.reward_norm), with the
    length / no-EOS penalties and DAPO's overlong shaping."""

    def __init__(self, rl: RLConfig, mesh, rules, tok):
        self.rl = rl
        self.overlong = rollout_options(rl)[1]
        self.terms = []  # (name, weight, kind, fn or (graphdef, params))
        for i, r in enumerate(rl.rewards):
            if r.kind == "function":
                self.terms.append((r.fn.split(":")[-1], r.weight, "function", load_function(r.fn)))
            else:
                self.terms.append((f"rm{i}", r.weight, "model", load_scalar_model(r.path, mesh, rules, tok)))

    def normalised(self, vals: np.ndarray) -> np.ndarray:
        """One term over the rollout, before its weight: whitened (a term that does not vary is 0)
        or clipped, so no term's scale swamps another's (a reward model's ~5 vs a 0/1 verifier)."""
        if self.rl.reward_norm == "whiten":
            return (vals - vals.mean()) / (vals.std() + 1e-6)
        if self.rl.reward_norm == "clip":
            return np.clip(vals, -self.rl.reward_clip, self.rl.reward_clip)
        return vals

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str],
                 seq: dict, lengths: np.ndarray, finished: np.ndarray, train: bool = True) -> tuple[np.ndarray, dict]:
        """-> (total reward [N], {"reward_<term>": raw values [N]}). `seq` holds the [N, T]
        inputs/positions/segment_ids of prompt + completion (global arrays) for reward models;
        train=False (held-out scoring): terms are not normalised, so the score keeps its units."""
        total = np.zeros(len(completions), np.float64)
        terms = {}
        for name, weight, kind, fn in self.terms:
            if kind == "function":
                vals = np.array([float(fn(p, c, r)) for p, c, r in zip(prompts, completions, references)])
            else:
                graphdef, params = fn
                vals = np.asarray(jax.device_get(_score_last(graphdef, params, seq["inputs"], seq["positions"],
                                                             seq["segment_ids"])), np.float64)
            terms[f"reward_{name}"] = vals
            total += weight * (self.normalised(vals) if train else vals)
        total -= self.rl.length_penalty * lengths
        total -= self.rl.no_eos_penalty * (~finished.astype(bool))
        if self.overlong:
            terms["reward_overlong"] = overlong_penalty(lengths, finished, self.rl.max_new_tokens, self.overlong,
                                                        self.rl.overlong_penalty)
            total += terms["reward_overlong"]
        return total.astype(np.float32), terms
