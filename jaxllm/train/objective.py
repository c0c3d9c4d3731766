"""The contract between an objective and the train loop.

One `Objective` record holds everything about an objective: its loss, the data it reads, the
model class it trains, whether it needs a frozen reference, its config checks and options, its
shapes for planning, its report metrics, and hooks for what differs between objectives (a batch
source for on-policy RL, a prepare step for DPO's reference log-probs). The records live in
`jaxllm.objectives` (one file each, one registry); the loop and the step below read only these
fields and call only these hooks, so they name no objective.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
from flax import nnx


class LossOut(NamedTuple):
    """A loss returns a *sum* and the count it is a sum over (tokens, pairs, sequences), never a
    mean, so gradient accumulation and packing stay exact: the step sums both over micro-batches
    and divides once. Extra metrics are (sum, count) pairs for the same reason."""
    loss_sum: jax.Array  # scalar
    denom: jax.Array  # scalar
    metrics: dict  # name -> (sum, count)


@dataclasses.dataclass
class LossContext:
    """What a loss may need besides the model and the batch. All fields are jit-friendly."""
    rng: jax.Array
    cfg: Any  # ObjectiveConfig (static)
    frozen: Any = None  # e.g. reference-model params, passed into jit without gradients
    extras: dict = dataclasses.field(default_factory=dict)  # static values (mask id, RL config)
    options: Any = None  # the objective's own options (Objective.options dataclass), static


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable[..., LossOut]  # (model, batch, LossContext) -> LossOut
    data_kinds: tuple  # data.kind values it reads; the first is suggested on a mismatch
    model: str = "lm"  # a key of core.model.MODEL_CLASSES: "lm", "scalar", "actor_critic"
    needs_reference: bool = False  # a frozen copy of the starting weights is passed to the loss
    reference_prefix: str = ""  # the reference is this sub-module's weights ("actor" for PPO)
    new_params: tuple = ()  # param path prefixes an init_from checkpoint may lack (new heads)
    init_sources: tuple = (("", "init_from"),)  # (param path prefix, config key its weights come from)
    options: Optional[type] = None  # dataclass of `objective.options.*` (typed, validated like the config)
    check: Optional[Callable] = None  # (RunConfig) -> None: config checks, raise ConfigError
    # planning (jaxllm plan): one global step's batch {name: (shape, dtype)}; None = not plannable
    batch_shapes: Optional[Callable] = None
    sequences_per_example: int = 1  # preference data: 2 completions per example
    reference_flops: bool = False  # the step runs a reference forward pass (unless precomputed)
    # the report: (held-out metric, higher is better, what it means) and training curves
    headline: tuple = ("eval_loss", False, "held-out loss (nats/token)")
    curves: tuple = ("loss",)
    report_samples: str = "chat"  # the report's greedy samples: "chat" prompts, "text" prompts, "" none
    # hooks; None = nothing special
    make_pipeline: Optional[Callable] = None  # (cfg, tok) -> pipeline; default: the run's data, batched
    setup: Optional[Callable] = None  # (cfg, stage) -> None at build time: eval records, extra eval
    prepare: Optional[Callable] = None  # (trainer, frozen) -> frozen for the step, before the loop
    batch_source: Optional[Callable] = None  # (trainer, data_state, frozen) -> (source, frozen for the step)


@dataclasses.dataclass
class Stage:
    """One run's objective, bound to its config: what the loop needs to build state and steps."""
    objective: Objective
    make_model: Callable[[nnx.Rngs], nnx.Module]
    pipeline: Any
    tokenizer: Any
    trainable: Any = nnx.Param
    extras: dict = dataclasses.field(default_factory=dict)
    options: Any = None
    eval_records: list = dataclasses.field(default_factory=list)  # held-out records with answers
    extra_eval: Optional[Callable] = None  # (graphdef, state) -> held-out metrics beyond the loss

    @property
    def loss_fn(self):
        return self.objective.loss
