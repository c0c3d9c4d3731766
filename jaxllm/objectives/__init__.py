"""The objectives: one file each (lm.py, preference.py, simpo.py, rl.py), one registry.

`REGISTRY` maps `objective.name` to its `Objective` record (jaxllm.train.objective). Everything an
objective needs is in its record; this module turns a record plus a run config into the `Stage`
the train loop runs. Adding an objective is one new file that defines its record, plus one line
below that registers it (docs/architecture.md).

Public math (pure, tested against hand-computed values) is re-exported here.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxllm.config import Registry, RunConfig, from_dict
from jaxllm.core.model import MODEL_CLASSES
from jaxllm.core.xent import token_logps_and_entropy, token_nll  # noqa: F401 (public API)
from jaxllm.data.pipeline import build_pipeline
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.errors import ConfigError
from jaxllm.objectives import lm, preference, rl, simpo
from jaxllm.objectives.preference import dpo_loss, reward_pair_loss, sequence_logprobs  # noqa: F401
from jaxllm.rl.algorithms import (cispo_policy_loss, dr_grpo_policy_loss, gae, group_advantages,  # noqa: F401
                                  gspo_policy_loss, gspo_ratio, kl_penalty, ppo_policy_loss, ppo_value_loss,
                                  reinforce_pp_advantages, rloo_advantages)
from jaxllm.train.loop import Trainer
from jaxllm.train.objective import LossContext, LossOut, Objective, Stage  # noqa: F401 (public API)
from jaxllm.train.state import check_freeze_matches, trainable_filter

REGISTRY = Registry("objective.name")
for _record in (*lm.OBJECTIVES, *preference.OBJECTIVES, *rl.OBJECTIVES, simpo.SIMPO):
    REGISTRY.register(_record.name, _record)


def register(objective: Objective) -> Objective:
    """Adds an objective (e.g. from a plugin or a test) under its name."""
    return REGISTRY.register(objective.name, objective)


def model_class(name: str):
    """The model class objective `name` trains: the one place that chooses one. Names that are not
    registered (checkpoints of imported models, say) get the plain LM."""
    return MODEL_CLASSES[REGISTRY[name].model if name in REGISTRY else "lm"]


def validate(cfg: RunConfig) -> Objective:
    """Checks against the registries, before anything is written: the objective's name, the data
    kind it reads, its options, and its own checks (RL: reward functions and algorithm names)."""
    objective = REGISTRY.pick(cfg.objective.name)
    if cfg.data.kind not in objective.data_kinds:
        raise ConfigError(f"objective {objective.name!r} reads data.kind in {list(objective.data_kinds)}, "
                          f"not {cfg.data.kind!r}; set data.kind={objective.data_kinds[0]}")
    options(objective, cfg)
    if objective.check is not None:
        objective.check(cfg)
    return objective


def options(objective: Objective, cfg: RunConfig):
    """`objective.options.*` as the objective's own typed dataclass (None if it has none)."""
    if objective.options is None:
        if cfg.objective.options:
            raise ConfigError(f"objective {objective.name!r} takes no objective.options (got "
                              f"{', '.join(cfg.objective.options)})")
        return None
    opts = from_dict(objective.options, cfg.objective.options, "objective.options.")
    if hasattr(opts, "validate"):
        opts.validate()
    return opts


def build_stage(cfg: RunConfig, process_index: int = 0, process_count: int = 1) -> Stage:
    objective = validate(cfg)
    tok = Tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}; raise model.vocab_size to at least {tok.vocab_size}")
    cls = model_class(objective.name)
    make_model = lambda rngs: cls(cfg.model, rngs, cfg.finetune)
    check_freeze_matches(cfg.finetune, nnx.eval_shape(lambda: make_model(nnx.Rngs(0))))
    if objective.make_pipeline is not None:
        pipeline = objective.make_pipeline(cfg, tok)
    else:
        pipeline = build_pipeline(cfg.data, tok, cfg.train.seq_len, cfg.train.batch_size, cfg.seed,
                                  cfg.eval.batches, process_index, process_count)
    stage = Stage(objective=objective, make_model=make_model, pipeline=pipeline, tokenizer=tok,
                  trainable=trainable_filter(cfg.finetune, cfg.model.n_layers, cfg.model.scan_layers),
                  extras={"mask_id": tok.mask_id}, options=options(objective, cfg))
    if objective.setup is not None:
        objective.setup(cfg, stage)
    return stage


def make_trainer(cfg: RunConfig) -> Trainer:
    """The train loop for `cfg`'s objective."""
    return Trainer(cfg, build_stage(cfg, jax.process_index(), jax.process_count()))


def train(cfg: RunConfig) -> dict:
    return make_trainer(cfg).run()


__all__ = ["REGISTRY", "register", "model_class", "validate", "build_stage", "make_trainer", "train",
           "Objective", "LossOut", "LossContext", "Stage"]
