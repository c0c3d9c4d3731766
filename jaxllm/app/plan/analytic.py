"""The analytic model: FLOPs by formula, per-chip activation memory from shapes (GPUs; a
cross-check for TPU), HBM traffic and the roofline step time."""

from __future__ import annotations

import math

from jaxllm.app.plan.step import PlanResult
from jaxllm.app.plan.targets import CHIPS_BY_NAME
from jaxllm.config import RunConfig
from jaxllm.objectives import REGISTRY

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
    from jaxllm.core.model import flops_per_token
    seqs = cfg.train.batch_size
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    objective = REGISTRY.pick(cfg.objective.name)
    seqs *= objective.sequences_per_example
    if objective.reference_flops and not cfg.objective.precompute_ref:
        fpt *= 4 / 3
    return fpt * seqs * cfg.train.seq_len


def hbm_traffic_bytes(cfg: RunConfig, mem: dict, mesh_shape: dict) -> float:
    """Per-chip HBM bytes moved in one step (documented estimate, for the roofline):
    the optimizer reads and writes params and moments once (2 x their bytes); every micro-batch
    reads each layer's gathered weights in the compute dtype in the forward pass, the remat
    recomputation and twice in the backward pass (dx and dW), sharded only over `tensor`; and
    activations/temporaries are written and read once per micro-batch (2 x temp)."""
    import numpy as np
    from jaxllm.core.model import param_count
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



# --------------------------------------------------------------------------------------------
# Analytic activation model (GPUs; also a cross-check for TPU)
# --------------------------------------------------------------------------------------------
def saved_per_token(remat: str, D: int, qkv: int, context: int, F: int, t: int, width: float) -> float:
    """Activation elements one layer keeps for the backward pass, per token, under a remat policy
    (core/attention.py REMAT_POLICIES): the layer input D plus what the policy saves."""
    return {"none": width, "full": D, "minimal_offloaded": D, "qkv_proj_offloaded": D,
            "minimal": 3 * D + (qkv + 2 * F) / t, "save_dots": 3 * D + (qkv + 2 * F) / t,
            "save_dot_with_context_except_mlp": 2 * D + (qkv + context) / t,
            "save_dot_except_mlp": 2 * D + qkv / t, "save_dot_except_mlpwi": 3 * D + qkv / t,
            "save_qkv_proj": D + qkv / t, "save_out_proj": 2 * D}[remat]


def activation_estimate(cfg: RunConfig, mesh_shape: dict, param_bytes: float, platform: str = "gpu") -> float:
    """Per-device bytes of activations, gradients and other temporaries in one step, from shapes.

    tokens = micro-batch sequences per data-parallel shard x T; t = tensor size; c = bytes of the
    compute dtype. Tensors of width D (act_embed) are not split over `tensor`; heads/mlp/vocab are.
      saved per layer until the backward pass, per token (remat policy):
        full:       D                                   (the layer input)
        minimal:    3D + ((H + 2K) * Dh + 2F) / t       (input + every matmul output)
        none:       W = 6D + (2(H + 2K) * Dh + 5F) / t  (+ norms, rope, silu, products)
        the save_* policies in between (saved_per_token); *_offloaded keep only D on the device
      one layer's backward working set, per token: 2 c W, plus where attention runs through XLA
        (attention_impl=xla) the T x T scores: 8 bytes * H/t * T (f32 logits and their gradient);
        flash kernels (splash on TPU, cuDNN on GPU: cudnn, splash or auto) keep none
      logits: 8 bytes * V/t per token (f32 logits and their gradient) on the plain head; with the
        chunked head (objective.xent_chunk_tokens > 0) only for one chunk of tokens
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
    seqs *= REGISTRY.pick(cfg.objective.name).sequences_per_example
    T = cfg.train.seq_len
    tokens = seqs * T
    c = np.dtype(m.dtype).itemsize
    qkv = (H + 2 * K) * Dh
    width = 6 * D + (2 * qkv + 5 * F) / t
    saved = saved_per_token(m.remat, D, qkv, H * Dh, F, t, width)
    flash = m.attention_impl in ("cudnn", "splash") or m.attention_impl == "auto"  # auto: splash / cuDNN
    scores = 0.0 if flash else 8 * H / t * T
    per_token = L * c * saved + 2 * c * width + scores
    chunk = cfg.objective.xent_chunk_tokens
    head = 8 * V / t * (min(tokens, chunk) if chunk > 0 else tokens)
    layer_params = D * qkv + H * Dh * D + 3 * D * F
    weights = layer_params / t * (2 * c + 4)
    grads = (3 if cfg.train.grad_accum > 1 else 2) * param_bytes
    return tokens * per_token + head + weights + grads
