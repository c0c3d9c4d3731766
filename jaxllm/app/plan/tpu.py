"""TPU: compile the real step for compile-only devices of a topology (libtpu; no TPU touched) and
read XLA's memory analysis of the executable."""

from __future__ import annotations

import contextlib
import os
import re
import time

from jaxllm.app.plan.step import PlanResult, build_step, state_parts
from jaxllm.app.plan.targets import LIBTPU_PIN, PlanError, Target
from jaxllm.config import RunConfig
from jaxllm.errors import UserError

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
    from jaxllm.core.sharding import make_mesh, make_rules
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
    # pinned host memory: activations a *_offloaded remat policy keeps there
    host = sum(float(getattr(ma, f"host_{k}_size_in_bytes", 0) or 0) for k in ("temp", "argument"))
    return {"temp": float(ma.temp_size_in_bytes), "code": float(ma.generated_code_size_in_bytes),
            "other": max(args - known, 0.0) + outputs, "host": host}


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
