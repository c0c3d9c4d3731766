"""What is planned: the run's real train step with abstract, sharded arguments (the trainer's own
step builder, train.step.build_step), its per-chip state sizes, and XLA's FLOP count of it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxllm.app.plan.targets import PlanError
from jaxllm.config import RunConfig
from jaxllm.objectives import REGISTRY, model_class



# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PlanResult:
    target: str
    chip: str
    method: str  # "xla" (compiled), "xla_oom" (compiler: out of HBM), "analytic", "precheck" (state > HBM)
    chips: int
    mesh: dict  # axis -> size (DCN folded in)
    hbm_bytes: float
    # per chip
    params_bytes: float = 0.0
    opt_state_bytes: float = 0.0
    frozen_bytes: float = 0.0  # weights without optimizer state: frozen params, DPO reference
    batch_bytes: float = 0.0
    temp_bytes: float = 0.0  # activations, gradients and other XLA temporaries
    code_bytes: float = 0.0
    other_bytes: float = 0.0  # non-donated outputs (metrics) and what arguments hold beyond the above
    total_bytes: float = 0.0
    host_bytes: float = 0.0  # pinned host memory the step uses (offloaded activations); not in HBM
    remat: str = ""  # model.remat of the planned step
    attention: str = ""  # the attention kernel the target runs (attention_impl resolved for it)
    fits: bool = False
    too_large: str = ""  # what to change when it does not fit
    # per step
    tokens_per_step: int = 0
    flops_per_step: float = 0.0  # model FLOPs, model.flops_per_token * tokens (MFU convention)
    xla_flops_per_step: float = 0.0  # XLA HLO cost analysis, incl. remat recomputation
    compute_time_s: float = 0.0
    hbm_time_s: float = 0.0
    step_time_s: float = 0.0  # roofline lower bound
    mfu: float = 0.0  # roofline upper bound
    compile_s: float = 0.0
    warnings: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class StepParts:
    train_step: Any  # jitted
    abs_state: Any  # TrainState of ShapeDtypeStructs with shardings
    abs_batch: dict
    abs_frozen: Any
    shardings: Any  # TrainState of NamedShardings


def check_objective(cfg: RunConfig) -> None:
    objective = REGISTRY.pick(cfg.objective.name)
    if objective.batch_shapes is None:
        plannable = ", ".join(sorted(n for n, o in REGISTRY.items() if o.batch_shapes is not None))
        raise PlanError(f"jaxllm plan covers objectives {plannable}; objective.name={cfg.objective.name} "
                        f"trains on rollouts whose sampler memory is not modelled")


def build_step(cfg: RunConfig, mesh, rules) -> StepParts:
    """The trainer's jitted step with abstract, sharded arguments; nothing is allocated."""
    import jax
    from flax import nnx

    from jaxllm.core.sharding import batch_sharding, state_shardings
    from jaxllm.train.state import abstract_like, trainable_filter
    from jaxllm.train.step import build_step as build_train_step

    check_objective(cfg)
    objective = REGISTRY.pick(cfg.objective.name)
    cls = model_class(cfg.objective.name)
    # mask_id only picks which token id masked_lm writes; it changes neither shapes nor FLOPs, and
    # the plan must not need the run's tokenizer file on the planning machine.
    extras = {"mask_id": cfg.model.vocab_size - 1}
    options = None
    if objective.options is not None:
        from jaxllm.objectives import options as objective_options
        options = objective_options(objective, cfg)
    parts = build_train_step(cfg, lambda rngs: cls(cfg.model, rngs, cfg.finetune), objective.loss, mesh, rules,
                             trainable=trainable_filter(cfg.finetune, cfg.model.n_layers, cfg.model.scan_layers),
                             extras=extras, options=options)
    abs_batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding(mesh, rules, len(shape), leading=1))
                 for k, (shape, dt) in objective.batch_shapes(cfg).items()}
    abs_frozen = None
    if objective.needs_reference and not cfg.objective.precompute_ref:  # DPO: a frozen copy of the model
        full = nnx.merge_state(parts.abs_state.params, parts.abs_state.rest)
        abs_frozen = {"reference": abstract_like(state_shardings(full, mesh, rules), full)}
    return StepParts(parts.train_step, parts.abs_state, abs_batch, abs_frozen, parts.shardings)


# --------------------------------------------------------------------------------------------
# Sizes from shardings
# --------------------------------------------------------------------------------------------
def per_device_bytes(tree) -> float:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
    import jax
    import numpy as np
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return float(total)


def state_parts(parts: StepParts) -> dict:
    s = parts.abs_state
    return {"params": per_device_bytes(s.params), "opt_state": per_device_bytes(s.opt_state),
            "frozen": per_device_bytes(s.rest) + (per_device_bytes(parts.abs_frozen) if parts.abs_frozen else 0.0),
            "batch": per_device_bytes(parts.abs_batch)}


def xla_flops_per_step(cfg: RunConfig) -> float:
    """XLA's HLO cost analysis of the real step, made exact for loops.

    Cost analysis counts a while-loop body once, so the scanned layers, the grad-accumulation
    loop and the chunked LM head's loop would be undercounted. Instead the step is lowered (not
    compiled) unscanned, with the head in one chunk, on one CPU device with 1 and 2 layers, for one
    micro-batch b and (with grad_accum A > 1) for 2b. FLOPs are linear in layers and in batch, so
    with f(n, b) those counts:
      micro(n) = f(n, 2b) - f(n, b)       (forward + backward of one micro-batch, n layers)
      update(n) = f(n, b) - micro(n)      (once per step: clipping, optimizer, NaN guard)
      step = A * (micro(1) + (L-1) * (micro(2) - micro(1))) + update(1) + (L-1) * (update(2) - update(1))
    remat recomputation is in the counts (jax.checkpoint re-emits the forward in the backward)."""
    A, L = cfg.train.grad_accum, cfg.model.n_layers
    b = cfg.train.batch_size // A
    f = {(n, k): _lowered_flops(cfg, n, k * b) for n in (1, 2) for k in ((1, 2) if A > 1 else (1,))}
    if A == 1:
        return f[1, 1] + (L - 1) * (f[2, 1] - f[1, 1])
    micro = {n: f[n, 2] - f[n, 1] for n in (1, 2)}
    update = {n: f[n, 1] - micro[n] for n in (1, 2)}
    return A * (micro[1] + (L - 1) * (micro[2] - micro[1])) + update[1] + (L - 1) * (update[2] - update[1])


ONE_CHUNK = 2 ** 62  # more tokens than any batch holds (DPO's too: batch x completions x seq)


def one_chunk_head(objective):
    """The objective with the chunked LM head (a loop over token chunks, jaxllm.core.xent) in one chunk:
    cost analysis counts a loop body once, and one chunk runs the same matmuls as several."""
    if getattr(objective, "xent_chunk_tokens", 0) > 0:
        return dataclasses.replace(objective, xent_chunk_tokens=ONE_CHUNK)
    return objective


def _lowered_flops(cfg: RunConfig, n_layers: int, batch: int) -> float:
    """HLO FLOPs of the unscanned step with `n_layers` layers and one micro-batch of `batch`."""
    import jax

    from jaxllm.config import MeshConfig
    from jaxllm.core.sharding import make_mesh, make_rules
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices("cpu")[:1])
    small = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=n_layers, scan_layers=False),
                                train=dataclasses.replace(cfg.train, batch_size=batch, grad_accum=1),
                                objective=one_chunk_head(cfg.objective))
    parts = build_step(small, mesh, make_rules(cfg.mesh.rules))
    cost = parts.train_step.lower(parts.abs_state, parts.abs_batch, parts.abs_frozen).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))
