"""The plan's text report, and what to change when a config does not fit."""

from __future__ import annotations

from typing import Optional

from jaxllm.app.plan.step import PlanResult
from jaxllm.app.plan.targets import GiB
from jaxllm.config import RunConfig

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
        fixes.append(f"recompute more (model.remat=full or an offloading policy, now {cfg.model.remat}; "
                     f"`jaxllm plan --auto-remat` finds the lightest that fits)")
    if cfg.model.n_heads % (mesh["tensor"] * 2) == 0:
        fixes.append(f"split the attention heads wider (mesh.tensor, now {mesh['tensor']})")
    fixes.append(f"lower train.seq_len (now {cfg.train.seq_len}) or train.batch_size")
    return "; ".join(fixes)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def format_report(r: PlanResult, config_path: str = "") -> str:
    how = {"xla": "XLA memory analysis of the compiled train step",
           "analytic": "analytic model (jaxllm/app/plan/analytic.py: activation_estimate)",
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
    if r.remat:
        lines.insert(2, f"remat: {r.remat}   attention: {r.attention}")
    if r.code_bytes or r.other_bytes:
        lines.append(f"  code + other            {_gib(r.code_bytes + r.other_bytes):>12}")
    pct = 100 * r.total_bytes / r.hbm_bytes
    lines.append(f"  total                   {_gib(r.total_bytes):>12}  ({pct:.0f}% of HBM)  fits: "
                 f"{'yes' if r.fits else 'NO'}")
    if r.host_bytes:
        lines.append(f"  pinned host memory      {_gib(r.host_bytes):>12}  (offloaded activations; not HBM)")
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
