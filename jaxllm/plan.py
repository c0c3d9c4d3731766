"""`jaxllm plan`: will this run config fit on that hardware, and how fast could it go?

TPU targets (`--topology v5p-256`) are planned by compiling the real jitted train step
(trainer.make_train_step, with the run's model, optimizer, objective, global batch, grad_accum and
remat) ahead of time for compile-only devices of that topology (`jax.experimental.topologies`, needs
the `libtpu` package; no TPU is touched), and reading XLA's memory analysis of the executable. GPU
targets (`--gpu h100x8`) get the same report from an analytic model, because compiling for CUDA
needs the CUDA plugin and its compiler on the planning machine.

Per-chip memory = arguments (params, optimizer state, frozen weights, batch: their sizes follow from
the shardings) + non-donated outputs + XLA temporaries (activations, gradients, update buffers) +
generated code. FLOPs per step come from model.flops_per_token (the MFU convention) and are
cross-checked against XLA's HLO cost analysis of the same step. The step-time estimate is a roofline,
max(compute, HBM traffic), so it is a lower bound and the MFU an upper bound: ICI/DCN communication,
kernel efficiency and host overheads are not modelled.

Exit codes of the command: 0 fits, 2 user error (bad config/topology, sharding or compile error),
3 compiled (or estimated) but does not fit in HBM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from typing import Any, Optional

from jaxllm.config import RunConfig
from jaxllm.errors import UserError

GiB = 1024 ** 3
EXIT_FITS, EXIT_USER_ERROR, EXIT_DOES_NOT_FIT = 0, 2, 3
# libtpu release that jax[tpu]==0.10.2 pins (its metadata: libtpu==0.0.42.*).
LIBTPU_PIN = "libtpu==0.0.42.1"


class PlanError(UserError):
    """The plan cannot be made: unknown topology, sharding/compile failure, missing libtpu."""


# --------------------------------------------------------------------------------------------
# Chip specs (per chip; vendor data sheets). HBM is what one JAX device can address.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 0.819e12),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.765e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12),
    # GPUs: memory as nvidia-smi reports it (H100 SXM 81559 MiB, H200 143771 MiB), dense bf16 peak.
    "h100": Chip("NVIDIA H100", 81559 * 2 ** 20, 989e12, 3.35e12),
    "h200": Chip("NVIDIA H200", 143771 * 2 ** 20, 989e12, 4.8e12),
}


@dataclasses.dataclass(frozen=True)
class TpuGen:
    chip: str  # key of CHIPS
    topo_prefix: str  # generation name in libtpu topology strings ("v5:4x4x8")
    cores_per_chip: int  # the N of "v5p-N" counts TensorCores
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    chip_config: str  # "megacore": one JAX device per chip (both TensorCores)


TPU_GENS = {
    "v4": TpuGen("v4", "v4", 2, 3, "megacore"),
    "v5p": TpuGen("v5p", "v5", 2, 3, "megacore"),
    "v5e": TpuGen("v5e", "v5e", 1, 2, "default"),
    "v5litepod": TpuGen("v5e", "v5e", 1, 2, "default"),
    "v6e": TpuGen("v6e", "v6e", 1, 2, "default"),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """What to plan for: `chips` devices in `slices` slices (TPU) or nodes (GPU)."""
    label: str  # as the user wrote it
    platform: str  # "tpu" or "gpu"
    chip: Chip
    chips: int  # in all
    slices: int = 1
    topology: str = ""  # libtpu topology name of one slice, e.g. "v5:4x4x8"
    chip_config: str = "default"
    wrap: tuple = (False, False, False)
    chips_per_host: tuple = (2, 2, 1)


def _shape_3d(chips: int) -> Optional[tuple]:
    """Slice shape of a v4/v5p slice: the small sizes are fixed; from 64 chips on, every dimension
    is a multiple of 4 (full cubes), as balanced as possible (GCP's standard shapes)."""
    small = {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
    if chips in small:
        return small[chips]
    if chips % 64:
        return None
    best = None
    for a in range(4, round(chips ** (1 / 3)) + 5, 4):
        for b in range(a, int(math.sqrt(chips // a)) + 5, 4):
            c, rem = divmod(chips, a * b)
            if rem or c < b or c % 4:
                continue
            key = (c, -a)  # smallest longest side, then the largest shortest side
            if best is None or key < best[0]:
                best = (key, (a, b, c))
    return best[1] if best else None


def _shape_2d(chips: int) -> Optional[tuple]:
    sizes = (1, 2, 4, 8, 16)
    shapes = [(a, b) for a in sizes for b in sizes if a <= b and a * b == chips and b <= 2 * a + (a == 1)]
    return shapes[0] if shapes else None


def parse_topology(name: str, slices: int = 1) -> Target:
    """'v5p-256', 'v4-128', 'v5e-16', 'v5litepod-16', 'v6e-64', or a raw 'v5p:4x4x8' -> Target."""
    if slices < 1:
        raise PlanError(f"--num-slices {slices} must be >= 1")
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)([-:])([0-9x]+)", name.strip().lower())
    if not m:
        raise PlanError(f"--topology {name!r}: expected e.g. v5p-8, v5p-256, v4-128, v5e-16, v5litepod-16, "
                        f"v6e-64 or a shape like v5p:4x4x8")
    gen = TPU_GENS[m.group(1)]
    if m.group(2) == ":":
        shape = tuple(int(x) for x in m.group(3).split("x") if x)
        if len(shape) != gen.dims or min(shape, default=0) < 1:
            raise PlanError(f"--topology {name!r}: a {m.group(1)} shape has {gen.dims} sizes, e.g. "
                            f"{m.group(1)}:{'x'.join(['4'] * gen.dims)}")
        chips = math.prod(shape)
    else:
        if not m.group(3).isdigit():
            raise PlanError(f"--topology {name!r}: the part after '-' is a number, e.g. {m.group(1)}-8")
        count = int(m.group(3))
        chips, rem = divmod(count, gen.cores_per_chip)
        shape = (_shape_3d(chips) if gen.dims == 3 else _shape_2d(chips)) if not rem and chips else None
        if shape is None:
            unit = " (the number counts TensorCores, 2 per chip)" if gen.cores_per_chip == 2 else ""
            ex = "8, 16, 32, 64, 128, 256, 512, 1024" if gen.dims == 3 else "1, 4, 8, 16, 32, 64, 128, 256"
            raise PlanError(f"--topology {name!r} is not a standard slice{unit}; use {m.group(1)}-N with N in "
                            f"{ex}, ... or give the shape, e.g. {m.group(1)}:{'x'.join(['4'] * gen.dims)}")
    if gen.dims == 3:
        wrap = tuple([all(s % 4 == 0 for s in shape)] * 3)  # full cubes of 4x4x4 and up are tori
    else:
        wrap = tuple(s == 16 for s in shape) + (False,)
    per_host = (2, 2, 1) if chips >= 4 else (1, 1, 1)
    topo = f"{gen.topo_prefix}:{'x'.join(map(str, shape))}"
    label = name + (f" x {slices} slices" if slices > 1 else "")
    return Target(label, "tpu", CHIPS[gen.chip], chips * slices, slices, topo, gen.chip_config, wrap, per_host)


def parse_gpu(name: str) -> Target:
    """'h100x8' (one node of 8), 'h100x64' (8 nodes of 8), 'h200x16', ... -> Target."""
    m = re.fullmatch(r"(h100|h200)x([0-9]+)", name.strip().lower())
    if not m or int(m.group(2)) < 1:
        raise PlanError(f"--gpu {name!r}: expected KINDxCOUNT with KIND in h100, h200, e.g. h100x8 or h200x64")
    n = int(m.group(2))
    nodes = max(1, -(-n // 8))
    if n > 8 and n % 8:
        raise PlanError(f"--gpu {name!r}: more than one node needs a multiple of 8 GPUs (8 per node)")
    return Target(name, "gpu", CHIPS[m.group(1)], n, nodes)


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


# --------------------------------------------------------------------------------------------
# Step construction (shared by the compile and the flop count)
# --------------------------------------------------------------------------------------------
PLANNED_OBJECTIVES = ("causal_lm", "masked_lm", "sft", "reward_bt", "dpo")


@dataclasses.dataclass
class StepParts:
    train_step: Any  # jitted
    abs_state: Any  # TrainState of ShapeDtypeStructs with shardings
    abs_batch: dict
    abs_frozen: Any
    shardings: Any  # TrainState of NamedShardings


def _model_factory(cfg: RunConfig):
    from jaxllm.model import ScalarHeadModel, Transformer
    from jaxllm.stages import SPECS
    spec = SPECS.get(cfg.objective.name)
    cls = ScalarHeadModel if spec is not None and spec.model == "scalar" else Transformer
    return lambda rngs: cls(cfg.model, rngs, cfg.finetune)


def _batch_shapes(cfg: RunConfig) -> dict:
    """name -> (shape, dtype) of one global step's batch, micro-batch index first ([A, b, ...])."""
    import jax.numpy as jnp
    A, T = cfg.train.grad_accum, cfg.train.seq_len
    lead = (A, cfg.train.batch_size // A)
    names = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    if cfg.objective.name in ("reward_bt", "dpo"):  # preference examples: K=2 ranked completions
        out = {k: ((*lead, 2, T), jnp.int32) for k in names}
        if cfg.objective.name == "dpo" and cfg.objective.precompute_ref:
            out["ref_logps"] = ((*lead, 2), jnp.float32)
        return out
    return {k: ((*lead, T), jnp.int32) for k in names}


def check_objective(cfg: RunConfig) -> None:
    if cfg.objective.name not in PLANNED_OBJECTIVES:
        raise PlanError(f"jaxllm plan covers objectives {', '.join(PLANNED_OBJECTIVES)}; objective.name="
                        f"{cfg.objective.name} trains on rollouts whose sampler memory is not modelled")


def build_step(cfg: RunConfig, mesh, rules) -> StepParts:
    """The trainer's jitted step with abstract, sharded arguments; nothing is allocated."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxllm.objectives import LOSSES
    from jaxllm.optim import make_optimizer, schedule
    from jaxllm.sharding import batch_sharding, state_shardings
    from jaxllm.stages import SPECS, trainable_filter
    from jaxllm.trainer import (TrainState, abstract_like, abstract_model, make_train_step,
                                state_shardings_for)

    check_objective(cfg)
    trainable = trainable_filter(cfg.finetune, cfg.model.n_layers, cfg.model.scan_layers)
    optimizer = make_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, abs_params, abs_rest = abstract_model(_model_factory(cfg), trainable)
    shardings = state_shardings_for(abs_params, abs_rest, optimizer, mesh, rules)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abs_state = abstract_like(shardings, TrainState(step=scalar, params=abs_params, rest=abs_rest,
                                                    opt_state=jax.eval_shape(optimizer.init, abs_params),
                                                    skipped=scalar))
    abs_batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding(mesh, rules, len(shape), leading=1))
                 for k, (shape, dt) in _batch_shapes(cfg).items()}
    abs_frozen = None
    spec = SPECS[cfg.objective.name]
    if spec.needs_reference and not cfg.objective.precompute_ref:  # DPO: a frozen copy of the model
        full = nnx.merge_state(abs_params, abs_rest)
        abs_frozen = {"reference": abstract_like(state_shardings(full, mesh, rules), full)}
    # mask_id only picks which token id masked_lm writes; it changes neither shapes nor FLOPs, and
    # the plan must not need the run's tokenizer file on the planning machine.
    extras = {"mask_id": cfg.model.vocab_size - 1}
    step = make_train_step(graphdef, LOSSES[cfg.objective.name], cfg.objective, optimizer,
                           schedule(cfg.optimizer, cfg.train.steps), seed=cfg.seed,
                           nan_policy=cfg.train.nan_policy, extras=extras, mesh=mesh, rules=rules,
                           state_shardings=shardings)
    return StepParts(step, abs_state, abs_batch, abs_frozen, shardings)


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


def replication_warnings(cfg: RunConfig, mesh_shape: dict, rules: dict) -> list[str]:
    """Model dimensions that their mesh axes do not divide are replicated (sharding.spec_for): say
    so, since that silently multiplies their memory by the axis size."""
    c = cfg.model
    dims = {"heads": c.n_heads, "kv_heads": c.n_kv_heads, "mlp": c.mlp_dim, "vocab": c.vocab_size,
            "embed": c.d_model}
    out = []
    for logical, size in dims.items():
        target = rules.get(logical)
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        n = math.prod(mesh_shape[a] for a in axes) if axes else 1
        if n > 1 and size % n:
            out.append(f"model {logical}={size} is not divisible by mesh {'*'.join(axes)}={n}: "
                       f"those weights are replicated over {'*'.join(axes)}")
    return out


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------
def model_flops_per_step(cfg: RunConfig) -> float:
    """model.flops_per_token x tokens. Preference objectives run K=2 sequences per example, and DPO
    adds a forward pass of the reference (1/3 of forward+backward) unless it is precomputed."""
    from jaxllm.model import flops_per_token
    seqs = cfg.train.batch_size
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    if cfg.objective.name in ("reward_bt", "dpo"):
        seqs *= 2
        if cfg.objective.name == "dpo" and not cfg.objective.precompute_ref:
            fpt *= 4 / 3
    return fpt * seqs * cfg.train.seq_len


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
    """The objective with the chunked LM head (a loop over token chunks, jaxllm.xent) in one chunk:
    cost analysis counts a loop body once, and one chunk runs the same matmuls as several."""
    if getattr(objective, "xent_chunk_tokens", 0) > 0:
        return dataclasses.replace(objective, xent_chunk_tokens=ONE_CHUNK)
    return objective


def _lowered_flops(cfg: RunConfig, n_layers: int, batch: int) -> float:
    """HLO FLOPs of the unscanned step with `n_layers` layers and one micro-batch of `batch`."""
    import jax

    from jaxllm.config import MeshConfig
    from jaxllm.sharding import make_mesh, make_rules
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices("cpu")[:1])
    small = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=n_layers, scan_layers=False),
                                train=dataclasses.replace(cfg.train, batch_size=batch, grad_accum=1),
                                objective=one_chunk_head(cfg.objective))
    parts = build_step(small, mesh, make_rules(cfg.mesh.rules))
    cost = parts.train_step.lower(parts.abs_state, parts.abs_batch, parts.abs_frozen).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def hbm_traffic_bytes(cfg: RunConfig, mem: dict, mesh_shape: dict) -> float:
    """Per-chip HBM bytes moved in one step (documented estimate, for the roofline):
    the optimizer reads and writes params and moments once (2 x their bytes); every micro-batch
    reads each layer's gathered weights in the compute dtype in the forward pass, the remat
    recomputation and twice in the backward pass (dx and dW), sharded only over `tensor`; and
    activations/temporaries are written and read once per micro-batch (2 x temp)."""
    import numpy as np
    from jaxllm.model import param_count
    A = cfg.train.grad_accum
    passes = 4 if cfg.model.remat != "none" else 3
    weights = param_count(cfg.model) * np.dtype(cfg.model.dtype).itemsize / mesh_shape["tensor"]
    return 2 * (mem["params"] + mem["opt_state"]) + A * (passes * weights + 2 * mem["temp"])


def roofline(result: PlanResult, cfg: RunConfig, mem: dict, mesh_shape: dict) -> None:
    chip = CHIPS_BY_NAME[result.chip]
    flops = result.xla_flops_per_step or result.flops_per_step
    result.compute_time_s = flops / (result.chips * chip.peak_flops)
    result.hbm_time_s = hbm_traffic_bytes(cfg, mem, mesh_shape) / chip.hbm_bandwidth
    result.step_time_s = max(result.compute_time_s, result.hbm_time_s)
    if result.step_time_s > 0:
        result.mfu = result.flops_per_step / (result.step_time_s * result.chips * chip.peak_flops)


CHIPS_BY_NAME = {c.name: c for c in CHIPS.values()}


# --------------------------------------------------------------------------------------------
# Analytic activation model (GPUs; also a cross-check for TPU)
# --------------------------------------------------------------------------------------------
def activation_estimate(cfg: RunConfig, mesh_shape: dict, param_bytes: float, platform: str = "gpu") -> float:
    """Per-device bytes of activations, gradients and other temporaries in one step, from shapes.

    tokens = micro-batch sequences per data-parallel shard x T; t = tensor size; c = bytes of the
    compute dtype. Tensors of width D (act_embed) are not split over `tensor`; heads/mlp/vocab are.
      saved per layer until the backward pass, per token (remat policy):
        full:       D                                   (the layer input)
        save_dots:  3D + ((H + 2K) * Dh + 2F) / t       (input + every matmul output)
        none:       W = 6D + (2(H + 2K) * Dh + 5F) / t  (+ norms, rope, silu, products)
      one layer's backward working set, per token: 2 c W, plus where attention runs through XLA
        (attention_impl=xla, or auto on TPU) the T x T scores: 8 bytes * H/t * T (f32 logits and
        their gradient); cuDNN's flash attention (cudnn, or auto on GPU) keeps none
      logits: 8 bytes * V/t per token (f32 logits and their gradient)
      layer weights gathered by FSDP: 2 layers (the next one is prefetched) of c-byte weights plus
        one layer's unreduced f32 gradient, all / t
      gradients: 2 x param bytes (gradient + update), 3 x with grad_accum > 1 (+ running sum)
    Measured against XLA's memory analysis of the compiled step for 8B/v5p-8, 70B/v5p-256 and
    405B/v5p-1024 it is within about 25% (docs/scaling.md has the numbers)."""
    import numpy as np
    m = cfg.model
    D, F, H, K, Dh, L, V = m.d_model, m.mlp_dim, m.n_heads, m.n_kv_heads, m.head_dim, m.n_layers, m.vocab_size
    t = mesh_shape["tensor"]
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    seqs = cfg.train.batch_size // cfg.train.grad_accum / dp
    if cfg.objective.name in ("reward_bt", "dpo"):
        seqs *= 2
    T = cfg.train.seq_len
    tokens = seqs * T
    c = np.dtype(m.dtype).itemsize
    qkv = (H + 2 * K) * Dh
    width = 6 * D + (2 * qkv + 5 * F) / t
    saved = {"full": D, "save_dots": 3 * D + (qkv + 2 * F) / t, "none": width}[m.remat]
    flash = m.attention_impl == "cudnn" or (m.attention_impl == "auto" and platform == "gpu")
    scores = 0.0 if flash else 8 * H / t * T
    per_token = L * c * saved + 2 * c * width + scores + 8 * V / t
    layer_params = D * qkv + H * Dh * D + 3 * D * F
    weights = layer_params / t * (2 * c + 4)
    grads = (3 if cfg.train.grad_accum > 1 else 2) * param_bytes
    return tokens * per_token + weights + grads


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------
def _mesh_shape(cfg: RunConfig, chips: int) -> dict:
    from jaxllm.sharding import MESH_AXES, mesh_shape
    ici, dcn = mesh_shape(cfg.mesh, chips)
    return {a: i * d for a, i, d in zip(MESH_AXES, ici, dcn)}


def _check_batch(cfg: RunConfig, shape: dict) -> None:
    dp = shape["data"] * shape["fsdp"]
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % dp:
        raise PlanError(f"train.batch_size={cfg.train.batch_size} / train.grad_accum={cfg.train.grad_accum} = "
                        f"{micro} sequences per micro-batch is not divisible by the data-parallel size "
                        f"data*fsdp = {dp}; change train.batch_size, train.grad_accum or the mesh")


def _check_slices(cfg: RunConfig, target: Target) -> None:
    dcn = cfg.mesh.dcn_data * cfg.mesh.dcn_fsdp * cfg.mesh.dcn_tensor
    if target.platform == "tpu" and dcn != target.slices:
        raise PlanError(f"mesh DCN sizes dcn_data*dcn_fsdp*dcn_tensor = {dcn} but the target has "
                        f"{target.slices} slice(s); set --num-slices {dcn} or change the mesh")


def _abstract_parts(cfg: RunConfig, shape: dict):
    """Step parts on an abstract mesh of the target's shape: sizes without devices or libtpu."""
    from jax.sharding import AbstractMesh

    from jaxllm.sharding import MESH_AXES, make_rules
    mesh = AbstractMesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES)
    return build_step(cfg, mesh, make_rules(cfg.mesh.rules))


def _new_result(cfg: RunConfig, target: Target, shape: dict, method: str) -> PlanResult:
    from jaxllm.sharding import make_rules
    return PlanResult(target=target.label, chip=target.chip.name, method=method, chips=target.chips,
                      mesh=dict(shape), hbm_bytes=target.chip.hbm_bytes,
                      tokens_per_step=cfg.train.batch_size * cfg.train.seq_len * (
                          2 if cfg.objective.name in ("reward_bt", "dpo") else 1),
                      flops_per_step=model_flops_per_step(cfg),
                      warnings=replication_warnings(cfg, shape, make_rules(cfg.mesh.rules)))


def _fill_memory(result: PlanResult, mem: dict, cfg: RunConfig) -> None:
    result.params_bytes, result.opt_state_bytes = mem["params"], mem["opt_state"]
    result.frozen_bytes, result.batch_bytes = mem["frozen"], mem["batch"]
    result.temp_bytes, result.code_bytes = mem["temp"], mem.get("code", 0.0)
    result.other_bytes = mem.get("other", 0.0)
    result.total_bytes = (result.params_bytes + result.opt_state_bytes + result.frozen_bytes +
                          result.batch_bytes + result.temp_bytes + result.code_bytes + result.other_bytes)
    result.fits = result.total_bytes <= result.hbm_bytes
    result.too_large = "" if result.fits else what_is_too_large(result, cfg)


def what_is_too_large(r: PlanResult, cfg: Optional[RunConfig] = None) -> str:
    """The largest part, and what a user changes to shrink it."""
    state = r.params_bytes + r.opt_state_bytes + r.frozen_bytes
    if state > r.hbm_bytes:
        return (f"params + optimizer state + frozen weights alone are {state / GiB:.1f} GiB per chip "
                f"(params {r.params_bytes / GiB:.1f}, optimizer {r.opt_state_bytes / GiB:.1f}, frozen "
                f"{r.frozen_bytes / GiB:.1f}) > {r.hbm_bytes / GiB:.1f} GiB HBM: use more chips, shard "
                f"them wider (mesh.fsdp), or a smaller optimizer state (optimizer.name=adafactor)")
    parts = {"params": r.params_bytes, "optimizer state": r.opt_state_bytes, "frozen weights": r.frozen_bytes,
             "activations/temporaries": r.temp_bytes, "batch": r.batch_bytes}
    name, size = max(parts.items(), key=lambda kv: kv[1])
    fix = activation_fixes(cfg, r.mesh) if name == "activations/temporaries" else \
        "use more chips or shard wider (mesh.fsdp)"
    return (f"total {r.total_bytes / GiB:.1f} GiB per chip > {r.hbm_bytes / GiB:.1f} GiB HBM; largest part: "
            f"{name} {size / GiB:.1f} GiB: {fix}")


def activation_fixes(cfg: Optional[RunConfig], mesh: dict) -> str:
    """Only the changes that are still open for this config."""
    if cfg is None:
        return "lower the micro-batch or the sequence length"
    fixes = []
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro > mesh["data"] * mesh["fsdp"]:
        fixes.append(f"raise train.grad_accum (now {cfg.train.grad_accum}: {micro} sequences per micro-batch)")
    if cfg.model.remat != "full":
        fixes.append(f"use model.remat=full (now {cfg.model.remat})")
    if cfg.model.n_heads % (mesh["tensor"] * 2) == 0:
        fixes.append(f"split the attention heads wider (mesh.tensor, now {mesh['tensor']})")
    fixes.append(f"lower train.seq_len (now {cfg.train.seq_len}) or train.batch_size")
    return "; ".join(fixes)


def plan(cfg: RunConfig, target: Target, compile: bool = True, xla_flops: bool = True) -> PlanResult:
    """Plans `cfg` on `target`. TPU + compile: XLA's numbers; otherwise the analytic model."""
    from jaxllm.errors import ConfigError
    check_objective(cfg)
    _check_slices(cfg, target)
    try:
        shape = _mesh_shape(cfg, target.chips)
    except ConfigError as e:
        raise PlanError(f"{e} (target {target.label}: {target.chips} chips)") from None
    _check_batch(cfg, shape)
    parts = _abstract_parts(cfg, shape)
    mem = state_parts(parts)
    analytic = target.platform == "gpu" or not compile
    result = _new_result(cfg, target, shape, "analytic" if analytic else "xla")
    if mem["params"] + mem["opt_state"] + mem["frozen"] > target.chip.hbm_bytes:
        # No program can fit when its resident state alone is larger than HBM: skip the compile.
        result.method = "precheck"
        _fill_memory(result, {**mem, "temp": 0.0}, cfg)
        return result
    if analytic:
        mem["temp"] = activation_estimate(cfg, shape, mem["params"], target.platform)
    else:
        mem.update(compile_for_tpu(cfg, target, result))
    _fill_memory(result, mem, cfg)
    if mem.get("compiler_oom"):  # the compiler's verdict wins over our table's HBM size
        result.fits, result.method = False, "xla_oom"
        result.too_large = f"{what_is_too_large(result, cfg)} (XLA: {mem['compiler_oom']})"
        return result
    if xla_flops:
        result.xla_flops_per_step = xla_flops_per_step(cfg)
    roofline(result, cfg, mem, shape)
    return result


# --------------------------------------------------------------------------------------------
# TPU: compile-only devices from libtpu
# --------------------------------------------------------------------------------------------
def libtpu_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("libtpu") is not None


@contextlib.contextmanager
def _quiet_libtpu():
    """libtpu looks for a TPU VM's metadata when it loads and logs errors when there is none; we
    only want compile-only devices, so tell it not to look (only for variables not already set, and
    only while it loads: the values say nothing about the planned topology)."""
    env = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost",
           "TPU_WORKER_ID": "0"}
    added = [k for k in env if k not in os.environ]
    os.environ.update({k: env[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def tpu_devices(target: Target) -> list:
    if not libtpu_available():
        raise PlanError(f"--topology needs the libtpu package to compile for TPU: pip install '{LIBTPU_PIN}' "
                        f"(or jaxllm[tpu]); or add --analytic for the estimate without compiling")
    from jax.experimental import topologies
    with _quiet_libtpu():
        try:
            desc = topologies.get_topology_desc(target.topology, "tpu", chip_config_name=target.chip_config,
                                                chips_per_host_bounds=target.chips_per_host,
                                                num_slices=target.slices, wrap=target.wrap)
        except Exception as e:  # noqa: BLE001 - libtpu raises JaxRuntimeError/RuntimeError
            raise PlanError(f"libtpu rejected topology {target.topology} ({target.label}): {_first_line(e)}") from None
    return list(desc.devices)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:400] if text else type(e).__name__


# XLA:TPU refuses a program larger than HBM at compile time, e.g. "RESOURCE_EXHAUSTED: Ran out of
# memory on HBM, the total memory required for HLO temporaries (170.77G) exceeds available HBM (95.74G)".
_OOM_TEMPS = re.compile(r"temporaries \(([0-9.]+)([KMGT])\) exceeds available HBM \(([0-9.]+)([KMGT])\)")
_OOM_USED = re.compile(r"[Uu]sed ([0-9.]+)([KMGT]) of ([0-9.]+)([KMGT]) hbm")
_SCALE = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}  # XLA prints binary units


def compile_for_tpu(cfg: RunConfig, target: Target, result: PlanResult) -> dict:
    """Compiles the real step for the topology; -> per-chip temp/code/other bytes."""
    from jaxllm.errors import ConfigError
    from jaxllm.sharding import make_mesh, make_rules
    devices = tpu_devices(target)
    try:
        mesh = make_mesh(cfg.mesh, devices)
    except ConfigError as e:
        raise PlanError(f"{e} (target {target.label})") from None
    except Exception as e:  # noqa: BLE001 - mesh_utils raises ValueError/AssertionError on odd shapes
        raise PlanError(f"cannot lay mesh {dict(mesh_axes(cfg))} on {target.label}: {_first_line(e)}") from None
    parts = build_step(cfg, mesh, make_rules(cfg.mesh.rules))
    t0 = time.perf_counter()
    try:
        compiled = parts.train_step.lower(parts.abs_state, parts.abs_batch, parts.abs_frozen).compile()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - XLA raises JaxRuntimeError with the compiler's message
        result.compile_s = time.perf_counter() - t0
        return _compile_failure(e)
    result.compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    state = state_parts(parts)
    args = float(ma.argument_size_in_bytes)
    outputs = float(ma.output_size_in_bytes - ma.alias_size_in_bytes)
    known = state["params"] + state["opt_state"] + state["frozen"] + state["batch"]
    return {"temp": float(ma.temp_size_in_bytes), "code": float(ma.generated_code_size_in_bytes),
            "other": max(args - known, 0.0) + outputs}


def mesh_axes(cfg: RunConfig) -> dict:
    return {k: getattr(cfg.mesh, k) for k in ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor")}


def _compile_failure(e: Exception) -> dict:
    """Out of HBM at compile time is a 'does not fit' result: the compiler's figure for the
    temporaries (or for everything) is kept. Any other compile error is a PlanError."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and not _OOM_USED.search(text):
        raise PlanError(f"XLA could not compile the step for this topology: {_first_line(e)}")
    m = _OOM_TEMPS.search(text)
    if m:
        return {"temp": float(m.group(1)) * _SCALE[m.group(2)], "compiler_oom": _first_line(e)}
    m = _OOM_USED.search(text)
    if m:
        return {"temp": 0.0, "other": float(m.group(1)) * _SCALE[m.group(2)], "compiler_oom": _first_line(e)}
    raise PlanError(f"XLA ran out of memory compiling the step: {_first_line(e)}")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def format_report(r: PlanResult, config_path: str = "") -> str:
    how = {"xla": "XLA memory analysis of the compiled train step",
           "analytic": "analytic model (jaxllm/plan.py: activation_estimate)",
           "precheck": "sharded state sizes (no compile: the state alone exceeds HBM)",
           "xla_oom": "XLA refused to compile the step: out of HBM"}[r.method]
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh.items())
    lines = [f"plan: {config_path} on {r.target} ({r.chips} x {r.chip}, {_gib(r.hbm_bytes)} HBM each)",
             f"mesh: {mesh}   method: {how}" + (f", compiled in {r.compile_s:.0f} s" if r.method == "xla" else ""),
             "memory per chip:",
             f"  params                  {_gib(r.params_bytes):>12}",
             f"  optimizer state         {_gib(r.opt_state_bytes):>12}"]
    if r.frozen_bytes:
        lines.append(f"  frozen weights          {_gib(r.frozen_bytes):>12}")
    temps = "not computed" if r.method == "precheck" else _gib(r.temp_bytes)
    lines += [f"  batch                   {_gib(r.batch_bytes):>12}",
              f"  activations/temporaries {temps:>12}"]
    if r.code_bytes or r.other_bytes:
        lines.append(f"  code + other            {_gib(r.code_bytes + r.other_bytes):>12}")
    pct = 100 * r.total_bytes / r.hbm_bytes
    lines.append(f"  total                   {_gib(r.total_bytes):>12}  ({pct:.0f}% of HBM)  fits: "
                 f"{'yes' if r.fits else 'NO'}")
    if r.flops_per_step:
        lines.append(f"FLOPs per step: {r.flops_per_step:.3e} model (6N + attention, {r.tokens_per_step} tokens)"
                     + (f", {r.xla_flops_per_step:.3e} XLA HLO count (x{r.xla_flops_per_step / r.flops_per_step:.2f})"
                        if r.xla_flops_per_step else ""))
    if r.step_time_s:
        lines.append(f"roofline step time: {r.step_time_s:.3f} s (compute {r.compute_time_s:.3f} s, HBM "
                     f"{r.hbm_time_s:.3f} s; communication not modelled)  MFU <= {100 * r.mfu:.1f}%  "
                     f"tokens/s/chip <= {r.tokens_per_step / r.step_time_s / r.chips:.0f}")
    lines += [f"warning: {w}" for w in r.warnings]
    return "\n".join(lines)  # a plan that does not fit also gets an `error:` line on stderr (run_cli)


# --------------------------------------------------------------------------------------------
# Command line (`jaxllm plan`; cli.py adds the subparser and dispatches here)
# --------------------------------------------------------------------------------------------
def add_plan_parser(sub) -> None:
    pp = sub.add_parser("plan", help="will a run config fit on a TPU topology or GPUs? memory, FLOPs, step time",
                        description="Exit codes: 0 fits, 2 user error (config, topology, sharding, compile), "
                                    "3 does not fit in HBM.")
    pp.add_argument("config", help="run config YAML")
    pp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    where = pp.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", help="TPU slice: v5p-8, v5p-256, v4-128, v5e-16, v5litepod-16, v6e-64, v5p:4x4x8")
    where.add_argument("--gpu", help="GPUs: h100x8, h100x64 (8 per node), h200x16, ...")
    pp.add_argument("--num-slices", type=int, default=1, help="TPU slices joined over DCN (mesh.dcn_* product)")
    pp.add_argument("--analytic", action="store_true", help="TPU: estimate from formulas, do not compile")
    pp.add_argument("--no-xla-flops", action="store_true", help="skip the XLA FLOP cross-check (saves a few s)")
    pp.add_argument("--json", action="store_true", help="print the result as JSON")


def run_cli(args) -> int:
    import json
    import sys

    # Planning never runs on a local accelerator: the TPU devices are compile-only, GPUs analytic.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jaxllm.config import load_config
    cfg = load_config(args.config, args.overrides)
    target = parse_gpu(args.gpu) if args.gpu else parse_topology(args.topology, args.num_slices)
    result = plan(cfg, target, compile=not args.analytic, xla_flops=not args.no_xla_flops)
    if args.json:
        print(json.dumps({"config": args.config, **result.to_dict()}, indent=2))
    else:
        print(format_report(result, args.config))
    if not result.fits:
        print(f"error: does not fit: {result.too_large}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return EXIT_FITS
