"""`jaxllm plan`: topology parsing, the state-size precheck, sharding/config errors, the GPU analytic
model and the FLOP cross-check run everywhere; the ahead-of-time TPU compiles (marker `tpu_plan`)
need the libtpu package and are skipped without it."""

import json
import os

import pytest

from jaxllm.app import plan as planlib
from jaxllm.app.cli import main
from jaxllm.config import load_config
from jaxllm.core.model import flops_per_token, param_count

from .conftest import ROOT

CFG_8B = os.path.join(ROOT, "configs/runs/pretrain_8b_v5p8.yaml")
CFG_70B = os.path.join(ROOT, "configs/runs/pretrain_70b_v5p256.yaml")
CFG_405B = os.path.join(ROOT, "configs/runs/pretrain_405b_v5p1024.yaml")
GiB = 1024 ** 3

needs_libtpu = pytest.mark.skipif(
    not planlib.libtpu_available(),
    reason=f"libtpu is not installed: the TPU ahead-of-time compile tests need `pip install {planlib.LIBTPU_PIN}` "
           f"(the release jax[tpu]==0.10.2 pins)")


def run_plan(capsys, *argv):
    """-> (exit code, stdout, stderr lines) of `jaxllm plan ...` run in this process."""
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


# ---- topology parsing ---------------------------------------------------------------------
@pytest.mark.parametrize("name,chips,topo,wrap", [
    ("v5p-8", 4, "v5:2x2x1", (False,) * 3),
    ("v5p-256", 128, "v5:4x4x8", (True,) * 3),
    ("v5p-1024", 512, "v5:8x8x8", (True,) * 3),
    ("v5p-768", 384, "v5:4x8x12", (True,) * 3),
    ("v4-128", 64, "v4:4x4x4", (True,) * 3),
    ("v4-32", 16, "v4:2x2x4", (False,) * 3),
    ("v5litepod-16", 16, "v5e:4x4", (False,) * 3),
    ("v5e-256", 256, "v5e:16x16", (True, True, False)),
    ("v6e-8", 8, "v6e:2x4", (False,) * 3),
    ("v5p:4x4x8", 128, "v5:4x4x8", (True,) * 3),
])
def test_parse_topology(name, chips, topo, wrap):
    t = planlib.parse_topology(name)
    assert (t.chips, t.topology, t.wrap, t.platform) == (chips, topo, wrap, "tpu")


def test_parse_topology_slices_and_errors():
    t = planlib.parse_topology("v5p-512", slices=2)
    assert (t.chips, t.slices, t.topology) == (512, 2, "v5:4x8x8")
    for bad, words in [("v5p-12", "not a standard slice"), ("v7-8", "expected e.g."), ("v5p:4x4", "3 sizes"),
                       ("v5e-6", "not a standard slice")]:
        with pytest.raises(planlib.PlanError, match=words):
            planlib.parse_topology(bad)


def test_parse_gpu():
    assert (planlib.parse_gpu("h100x8").chips, planlib.parse_gpu("h100x8").slices) == (8, 1)
    assert (planlib.parse_gpu("h200x64").chips, planlib.parse_gpu("h200x64").slices) == (64, 8)
    for bad in ("a100x8", "h100x12", "h100"):
        with pytest.raises(planlib.PlanError):
            planlib.parse_gpu(bad)


# ---- does not fit, without compiling --------------------------------------------------------
@pytest.mark.parametrize("model", ["llama3_70b", "llama3_405b"])
def test_oversized_model_does_not_fit(capsys, model):
    """70B/405B params + Adam state on 4 v5p chips: reported from the sharded state sizes alone
    (no libtpu needed), exit code 3, one clear error line naming the state as the problem."""
    code, out, err = run_plan(capsys, CFG_8B, f"model=configs/models/{model}.yaml", "--topology", "v5p-8")
    assert code == planlib.EXIT_DOES_NOT_FIT
    assert len(err) == 1 and err[0].startswith("error: does not fit: params + optimizer state")
    assert "fits: NO" in out and "Traceback" not in out
    cfg = load_config(CFG_8B, [f"model=configs/models/{model}.yaml"])
    params = param_count(cfg.model) * 4 / 4  # float32 params over 4-way fsdp
    assert f"params {params / GiB:.1f}" in err[0] and f"optimizer {2 * params / GiB:.1f}" in err[0]


# ---- sharding / config errors: one line, exit 2, nothing compiled ---------------------------
@pytest.mark.parametrize("overrides,target,words", [
    (["mesh.tensor=3"], "v5p-8", "cannot fill 4 devices per slice"),  # 3 does not divide 4 chips
    (["mesh.fsdp=8"], "v5p-8", "but there are 4 devices"),
    (["train.batch_size=30", "train.grad_accum=1"], "v5p-8", "not divisible by the data-parallel size"),
    (["mesh.dcn_data=2"], "v5p-8", "--num-slices 2"),
    (["train.stpes=3"], "v5p-8", "unknown config key train.stpes"),
    ([], "v5p-12", "not a standard slice"),
])
def test_sharding_and_config_errors(capsys, overrides, target, words):
    code, out, err = run_plan(capsys, CFG_8B, *overrides, "--topology", target)
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_heads_not_divisible_by_tensor_is_reported(capsys):
    """8 KV heads on a 16-way tensor axis are replicated by the rules table: the plan says so."""
    code, out, _ = run_plan(capsys, CFG_70B, "mesh.tensor=16", "--topology", "v5p-256", "--analytic",
                            "--no-xla-flops")
    assert "warning: model kv_heads=8 is not divisible by mesh tensor=16" in out
    assert "heads=64" not in out  # 64 query heads do divide 16


# ---- GPU analytic plan ----------------------------------------------------------------------
def test_gpu_plan_8b_h100x8(capsys):
    code, out, err = run_plan(capsys, CFG_8B, "mesh=configs/meshes/h100x8.yaml", "train.grad_accum=4",
                              "--gpu", "h100x8", "--json")
    assert code == 0, err
    r = json.loads(out)
    cfg = load_config(CFG_8B, ["mesh=configs/meshes/h100x8.yaml", "train.grad_accum=4"])
    n = param_count(cfg.model)
    assert r["method"] == "analytic" and r["chips"] == 8 and r["fits"] is True
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert r["params_bytes"] == pytest.approx(n * 4 / 8, rel=1e-3)  # fp32, 8-way fsdp (norms replicated)
    assert r["opt_state_bytes"] == pytest.approx(2 * n * 4 / 8, rel=1e-3)  # Adam mu + nu
    assert r["hbm_bytes"] == planlib.CHIPS["h100"].hbm_bytes
    assert 0 < r["temp_bytes"] < r["hbm_bytes"] and r["total_bytes"] <= r["hbm_bytes"]
    assert r["flops_per_step"] == pytest.approx(flops_per_token(cfg.model, 8192) * 32 * 8192)
    assert r["step_time_s"] >= r["flops_per_step"] / (8 * 989e12) and 0 < r["mfu"] <= 1


def test_gpu_plan_70b_on_one_node_does_not_fit(capsys):
    code, out, err = run_plan(capsys, CFG_70B, "mesh=configs/meshes/h100x8.yaml", "--gpu", "h100x8")
    assert code == planlib.EXIT_DOES_NOT_FIT
    assert len(err) == 1 and "error: does not fit" in err[0] and "79.6 GiB HBM" in err[0]


def test_activation_estimate_follows_remat_and_batch():
    one = "train.grad_accum=8"  # 1 sequence per chip per micro-batch
    cfg = load_config(CFG_8B, [one])
    shape = {"data": 1, "fsdp": 4, "tensor": 1}
    full = planlib.activation_estimate(cfg, shape, 0.0, "tpu")
    dots = planlib.activation_estimate(load_config(CFG_8B, [one, "model.remat=save_dots"]), shape, 0.0, "tpu")
    double = planlib.activation_estimate(load_config(CFG_8B, ["train.grad_accum=4"]), shape, 0.0, "tpu")
    quad = planlib.activation_estimate(load_config(CFG_8B, ["train.grad_accum=2"]), shape, 0.0, "tpu")
    assert quad - double == pytest.approx(2 * (double - full))  # activations grow with the micro-batch
    # attention_impl=auto is a flash kernel on both (splash on TPU, cuDNN on GPU); xla keeps T x T scores
    assert planlib.activation_estimate(cfg, shape, 0.0, "gpu") == full
    scores = planlib.activation_estimate(load_config(CFG_8B, [one, "model.attention_impl=xla"]), shape, 0.0, "tpu")
    assert dots > full and 1.5 * full < double < 2 * full and scores > full


# ---- FLOPs: the formula against XLA's HLO cost analysis --------------------------------------
def test_xla_flops_cross_check(tiny):
    """The layer-differencing count equals a direct count of the unrolled step, and the model
    formula agrees with it: x1 without remat (up to elementwise ops), more with remat."""
    import dataclasses
    cfg = tiny("model.scan_layers=true", "train.grad_accum=2", "model.remat=none")
    xla = planlib.xla_flops_per_step(cfg)
    unrolled = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False),
                                   train=dataclasses.replace(cfg.train, grad_accum=1),
                                   objective=planlib.one_chunk_head(cfg.objective))
    assert xla == pytest.approx(_direct_flops(unrolled), rel=1e-6)
    formula = planlib.model_flops_per_step(cfg)
    assert 0.95 < xla / formula < 1.25
    remat = planlib.xla_flops_per_step(tiny("model.remat=full"))
    assert 1.2 < remat / formula < 1.5


def _direct_flops(cfg):
    import jax
    from jaxllm.config import MeshConfig
    from jaxllm.core.sharding import make_mesh, make_rules
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices("cpu")[:1])
    parts = planlib.build_step(cfg, mesh, make_rules({}))
    cost = parts.train_step.lower(parts.abs_state, parts.abs_batch, parts.abs_frozen).cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_rl_objective_is_refused_clearly(capsys):
    code, _, err = run_plan(capsys, os.path.join(ROOT, "configs/runs/grpo_tiny.yaml"), "--gpu", "h100x8",
                            "--no-xla-flops")
    assert code == 2 and len(err) == 1 and "objective.name=grpo" in err[0]


# ---- ahead-of-time TPU compiles (libtpu) ----------------------------------------------------
@pytest.mark.tpu_plan
@needs_libtpu
def test_8b_fits_on_v5p_8(capsys):
    code, out, err = run_plan(capsys, CFG_8B, "--topology", "v5p-8", "--json", "--no-xla-flops")
    assert code == 0, err
    r = json.loads(out)
    n = param_count(load_config(CFG_8B, []).model)
    assert r["method"] == "xla" and r["fits"] is True and r["chips"] == 4
    assert r["params_bytes"] == pytest.approx(n * 4 / 4, rel=1e-3)
    assert 10 * GiB < r["temp_bytes"] and r["total_bytes"] < 95 * GiB
    # The analytic model (what GPUs get) lands within 30% of XLA's temporaries here.
    analytic = planlib.plan(load_config(CFG_8B, []), planlib.parse_topology("v5p-8"), compile=False,
                            xla_flops=False)
    assert analytic.temp_bytes == pytest.approx(r["temp_bytes"], rel=0.3)


@pytest.mark.tpu_plan
@needs_libtpu
def test_70b_fits_on_v5p_256(capsys):
    code, out, err = run_plan(capsys, CFG_70B, "--topology", "v5p-256", "--json", "--no-xla-flops")
    assert code == 0, err
    r = json.loads(out)
    assert r["method"] == "xla" and r["fits"] is True and r["chips"] == 128
    assert r["mesh"] == {"data": 1, "fsdp": 128, "tensor": 1}
    assert r["total_bytes"] < 95 * GiB and r["temp_bytes"] > r["params_bytes"] + r["opt_state_bytes"]


@pytest.mark.tpu_plan
@needs_libtpu
def test_compiler_out_of_memory_is_does_not_fit(capsys):
    """24 sequences per chip in one micro-batch: XLA refuses the program and the plan reports it."""
    code, out, err = run_plan(capsys, CFG_8B, "train.batch_size=96", "train.grad_accum=1", "--topology", "v5p-8",
                              "--no-xla-flops")
    assert code == planlib.EXIT_DOES_NOT_FIT
    assert len(err) == 1 and "largest part: activations/temporaries" in err[0] and "RESOURCE_EXHAUSTED" in err[0]
    assert "raise train.grad_accum (now 1" in err[0]
    assert "fits: NO" in out


@pytest.mark.tpu_plan
@needs_libtpu
def test_8b_splash_fits_more_per_chip_than_maxtext(capsys):
    """Issue 19's bar (MaxText 0.2.5, full remat + splash: 8 per chip, 40.5 GiB at 1 per chip):
    at least 10 sequences of 8192 per chip fit, and 1 per chip needs at most 40.5 GiB."""
    for per_chip, limit in ((10, 95 * GiB), (1, 40.5 * GiB)):
        code, out, err = run_plan(capsys, CFG_8B, f"train.batch_size={4 * per_chip}", "train.grad_accum=1",
                                  "--topology", "v5p-8", "--json", "--no-xla-flops")
        r = json.loads(out)
        assert code == 0 and r["fits"] and r["attention"] == "splash" and r["remat"] == "full", err
        assert r["total_bytes"] <= limit, (per_chip, r["total_bytes"] / GiB)


@pytest.mark.tpu_plan
@needs_libtpu
def test_auto_attention_compiles_to_the_splash_kernel_on_tpu():
    """attention_impl=auto on TPU devices lowers to Pallas (Mosaic) custom calls, with no [T, T] scores."""
    from jaxllm.config import MeshConfig
    from jaxllm.core.sharding import make_mesh, make_rules
    cfg = load_config(os.path.join(ROOT, "configs/runs/pretrain_tiny.yaml"), [
        "model.attention_impl=auto", "model.head_dim=128", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_model=256", "model.max_seq_len=640", "train.seq_len=640", "train.batch_size=4", "model.scan_layers=true",
        "model.remat=full"])
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), planlib.tpu_devices(planlib.parse_topology("v5p-8")))
    parts = planlib.build_step(cfg, mesh, make_rules())
    hlo = parts.train_step.lower(parts.abs_state, parts.abs_batch, parts.abs_frozen).compile().as_text()
    assert "tpu_custom_call" in hlo
    assert "640,640]" not in hlo  # no [.., T, T] score tensor anywhere


def test_auto_remat_walks_policies_until_one_fits(monkeypatch, capsys):
    """--auto-remat plans the policies from the least recomputation to the most and stops at the
    first that fits (plan() stubbed: which policies "fit" is decided here, the walk is under test)."""
    from jaxllm.core.attention import AUTO_REMAT_ORDER
    fitting = {"save_qkv_proj", "full"}
    seen = []

    def fake_plan(cfg, target, compile=True, xla_flops=True):
        seen.append(cfg.model.remat)
        r = planlib.PlanResult(target=target.label, chip=target.chip.name, method="xla", chips=target.chips,
                               mesh={"data": 1, "fsdp": 4, "tensor": 1}, hbm_bytes=target.chip.hbm_bytes,
                               remat=cfg.model.remat)
        r.total_bytes, r.fits = (50 if cfg.model.remat in fitting else 120) * GiB, cfg.model.remat in fitting
        return r
    monkeypatch.setattr(planlib, "plan", fake_plan)
    cfg, result, tried = planlib.auto_remat(load_config(CFG_8B, []), planlib.parse_topology("v5p-8"),
                                            xla_flops=False, log=lambda line: None)
    first = min(AUTO_REMAT_ORDER.index(p) for p in fitting)
    assert seen == list(AUTO_REMAT_ORDER[:first + 1]) and cfg.model.remat == AUTO_REMAT_ORDER[first]
    assert result.fits and [p for p, _ in tried] == seen


def test_auto_remat_needs_a_tpu_compile(capsys):
    code, out, err = run_plan(capsys, CFG_8B, "--gpu", "h100x8", "--auto-remat")
    assert code == 2 and len(err) == 1 and "--auto-remat compiles every policy for a TPU topology" in err[0]


@pytest.mark.tpu_plan
@needs_libtpu
def test_auto_remat_picks_minimal_for_8b_at_2_per_chip(capsys):
    """No remat does not fit 2 sequences of 8192 per chip; MaxText's `minimal` does (<= its 87.7 GiB)."""
    code, out, err = run_plan(capsys, CFG_8B, "train.batch_size=8", "train.grad_accum=1", "--topology", "v5p-8",
                              "--auto-remat", "--json", "--no-xla-flops")
    r = json.loads(out)
    assert code == 0 and r["remat"] == "minimal" and r["total_bytes"] <= 87.7 * GiB, err
    assert any(line.startswith("auto-remat: none") and "does not fit" in line for line in err)
