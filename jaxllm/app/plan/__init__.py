"""`jaxllm plan`: will this run config fit on that hardware, and how fast could it go?

TPU targets (`--topology v5p-256`) are planned by compiling the real jitted train step
(jaxllm.train.step.build_step, with the run's model, optimizer, objective, global batch, grad_accum and
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

import os

from jaxllm.app.plan.analytic import (activation_estimate, hbm_traffic_bytes, model_flops_per_step,  # noqa: F401
                                      replication_warnings, roofline)
from jaxllm.app.plan.report import activation_fixes, format_report, what_is_too_large  # noqa: F401
from jaxllm.app.plan.step import (ONE_CHUNK, PlanResult, StepParts, build_step, check_objective,  # noqa: F401
                                  one_chunk_head, per_device_bytes, state_parts, xla_flops_per_step)
from jaxllm.app.plan.targets import (CHIPS, EXIT_DOES_NOT_FIT, EXIT_FITS, EXIT_USER_ERROR, GiB,  # noqa: F401
                                     LIBTPU_PIN, PlanError, Target, parse_gpu, parse_topology)
from jaxllm.app.plan.tpu import compile_for_tpu, libtpu_available, tpu_devices  # noqa: F401
from jaxllm.config import RunConfig
from jaxllm.objectives import REGISTRY

# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------
def _mesh_shape(cfg: RunConfig, chips: int) -> dict:
    from jaxllm.core.sharding import MESH_AXES, mesh_shape
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

    from jaxllm.core.sharding import MESH_AXES, make_rules
    mesh = AbstractMesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES)
    return build_step(cfg, mesh, make_rules(cfg.mesh.rules))


def _new_result(cfg: RunConfig, target: Target, shape: dict, method: str) -> PlanResult:
    from jaxllm.core.sharding import make_rules
    return PlanResult(target=target.label, chip=target.chip.name, method=method, chips=target.chips,
                      mesh=dict(shape), hbm_bytes=target.chip.hbm_bytes,
                      tokens_per_step=cfg.train.batch_size * cfg.train.seq_len * (
                          REGISTRY.pick(cfg.objective.name).sequences_per_example),
                      flops_per_step=model_flops_per_step(cfg),
                      warnings=replication_warnings(cfg, shape, make_rules(cfg.mesh.rules)),
                      remat=cfg.model.remat, attention=_attention_on(cfg.model.attention_impl, target.platform))


def _attention_on(impl: str, platform: str) -> str:
    if impl != "auto":
        return impl
    return "splash" if platform == "tpu" else "cuDNN flash (jax.nn.dot_product_attention)"


def _fill_memory(result: PlanResult, mem: dict, cfg: RunConfig) -> None:
    result.params_bytes, result.opt_state_bytes = mem["params"], mem["opt_state"]
    result.frozen_bytes, result.batch_bytes = mem["frozen"], mem["batch"]
    result.temp_bytes, result.code_bytes = mem["temp"], mem.get("code", 0.0)
    result.other_bytes = mem.get("other", 0.0)
    result.host_bytes = mem.get("host", 0.0)
    result.total_bytes = (result.params_bytes + result.opt_state_bytes + result.frozen_bytes +
                          result.batch_bytes + result.temp_bytes + result.code_bytes + result.other_bytes)
    result.fits = result.total_bytes <= result.hbm_bytes
    result.too_large = "" if result.fits else what_is_too_large(result, cfg)


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
# Command line (`jaxllm plan`; cli.py adds the subparser and dispatches here)
# --------------------------------------------------------------------------------------------
def auto_remat(cfg: RunConfig, target: Target, xla_flops: bool = True, log=print) -> tuple:
    """Plans every remat policy from the least recomputation to the most (attention.AUTO_REMAT_ORDER)
    and stops at the first that fits -> (config with that policy, its PlanResult, [(policy, result)])."""
    import dataclasses

    from jaxllm.core.attention import AUTO_REMAT_ORDER
    tried = []
    for policy in AUTO_REMAT_ORDER:
        trial = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=policy))
        result = plan(trial, target, compile=True, xla_flops=False)
        tried.append((policy, result))
        host = f", {result.host_bytes / GiB:.1f} GiB pinned host" if result.host_bytes else ""
        log(f"auto-remat: {policy:<34} {result.total_bytes / GiB:7.1f} GiB per chip{host}  "
            f"{'fits' if result.fits else 'does not fit'}")
        if result.fits:
            if xla_flops:
                result.xla_flops_per_step = xla_flops_per_step(trial)
                roofline(result, trial, {"params": result.params_bytes, "opt_state": result.opt_state_bytes,
                                         "temp": result.temp_bytes}, result.mesh)
            return trial, result, tried
    return cfg, tried[-1][1], tried


def run_cli(args) -> int:
    import json
    import sys

    # Planning never runs on a local accelerator: the TPU devices are compile-only, GPUs analytic.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jaxllm.config import load_config
    cfg = load_config(args.config, args.overrides)
    target = parse_gpu(args.gpu) if args.gpu else parse_topology(args.topology, args.num_slices)
    if getattr(args, "auto_remat", False):
        if args.analytic or target.platform != "tpu":
            raise PlanError("--auto-remat compiles every policy for a TPU topology: use it with --topology and "
                            "without --analytic")
        cfg, result, _ = auto_remat(cfg, target, xla_flops=not args.no_xla_flops,
                                    log=lambda line: print(line, file=sys.stderr))
        if result.fits:
            print(f"auto-remat: the lightest policy that fits is model.remat={cfg.model.remat}", file=sys.stderr)
    else:
        result = plan(cfg, target, compile=not args.analytic, xla_flops=not args.no_xla_flops)
    if args.json:
        print(json.dumps({"config": args.config, **result.to_dict()}, indent=2))
    else:
        print(format_report(result, args.config))
    if not result.fits:
        print(f"error: does not fit: {result.too_large}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return EXIT_FITS
