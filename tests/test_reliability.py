"""Preemption, crash safety and non-finite handling, with real signals to real training processes."""

import glob
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxllm.core import checkpoint as ckpt_lib
from jaxllm.app.cli import main
from jaxllm.core.guards import SpikeDetector
from jaxllm.core.monitor import read_metrics
from jaxllm.objectives import make_trainer
from tests.conftest import ROOT, tiny_config

STEPS = 120
# Small and fast: 2-way fsdp over 2 simulated devices, an (async) save every 3 steps.
RUN = [f"train.steps={STEPS}", "train.batch_size=8", "train.seq_len=64", "eval.every=0", "checkpoint.every=3",
       "checkpoint.keep=2", "train.progress=false", "train.log_every=1", "optimizer.warmup_steps=5"]


def _train_cmd(out, *extra):
    return [sys.executable, "-m", "jaxllm.app.cli", "train", os.path.join(ROOT, "configs/runs/pretrain_tiny.yaml"),
            f"output_dir={out}", *RUN, "checkpoint.async_save=true", *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess env: 2 simulated devices, and one persistent compilation cache so each restart
    skips most of the compile."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """Params after an uninterrupted run of the same command."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = subprocess.run(_train_cmd(out, "checkpoint.every=0"), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return _final_params(out)


def _final_params(out):
    src, step = ckpt_lib.open_for_read(str(out))
    assert step == STEPS
    params = src.restore(step, _abstract(out), None)["params"]
    src.close()
    return jax.device_get(params)


def _abstract(out):
    t = make_trainer(tiny_config(out, *RUN))  # same model and shardings: the restore target
    return t.parts.abs_state.params  # ShapeDtypeStructs carrying the trainer's shardings


def _assert_equal_params(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _committed(out):
    d = os.path.join(out, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _entries(out):
    """name -> mtime of what is in the checkpoints dir (committed steps and orbax tmp dirs)."""
    d = os.path.join(out, "checkpoints")
    if not os.path.isdir(d):
        return {}
    out = {}
    for name in os.listdir(d):
        try:
            out[name] = os.stat(os.path.join(d, name)).st_mtime_ns
        except FileNotFoundError:  # renamed or deleted under us
            pass
    return out


def _metric_lines(out):
    path = os.path.join(out, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


@pytest.mark.slow  # CI time: `pytest -m slow` (~105 s with its reference run)
def test_sigterm_saves_at_step_boundary_exits_0_and_resumes(tmp_path, env, reference):
    out = tmp_path / "run"
    p = subprocess.Popen(_train_cmd(out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while _metric_lines(out) < 3 and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 0, log
    saved = _committed(out)
    assert "preempted: checkpoint of step" in log and saved and saved[-1] < STEPS, log
    # the restart resumes from that checkpoint and ends where an uninterrupted run ends, bit for bit
    r = subprocess.run(_train_cmd(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from checkpoint step {saved[-1]}" in r.stdout
    _assert_equal_params(_final_params(out), reference)


@pytest.mark.slow  # long learning test: `pytest -m slow`
def test_sigkill_20_times_resumes_from_last_complete_checkpoint(tmp_path, env, reference):
    """SIGKILL at random moments: during start-up/restore, mid-step and during async saves. Every
    restart must resume from the newest *committed* step, and the end result equals a clean run."""
    out = tmp_path / "run"
    rng = random.Random(1234)
    kills, mid_write, resumed_from = 0, 0, []
    while kills < 20:
        committed = _committed(out)
        seen = _entries(out)
        log = open(tmp_path / f"log{kills}.txt", "w")
        p = subprocess.Popen(_train_cmd(out), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        mode = kills % 4
        if mode == 0:  # anywhere from import to the first steps (restore included)
            time.sleep(rng.uniform(0.5, 6.0))
        else:  # 1, 2: soon after this process starts writing a checkpoint; 3: after it commits one
            deadline = time.time() + 120
            while time.time() < deadline and p.poll() is None:
                new = {k for k, v in _entries(out).items() if seen.get(k) != v}
                if (mode < 3 and any("tmp" in k for k in new)) or (mode == 3 and any(k.isdigit() for k in new)):
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        assert p.poll() is None, "the run finished before it was killed 20 times; raise STEPS"
        p.kill()
        p.wait()
        log.close()
        kills += 1
        mid_write += bool(glob.glob(str(out / "checkpoints" / "*orbax-checkpoint-tmp*")))
        text = open(tmp_path / f"log{kills - 1}.txt").read()
        if "resuming from checkpoint step" in text:
            step = int(text.split("resuming from checkpoint step ")[1].split()[0])
            resumed_from.append(step)
            assert step == committed[-1], (step, committed)  # the newest complete one, never a tmp dir
    assert len(resumed_from) >= 8 and mid_write >= 3, (resumed_from, mid_write)
    r = subprocess.run(_train_cmd(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    _assert_equal_params(_final_params(out), reference)
    steps = [m["step"] for m in read_metrics(str(out)) if "loss" in m]
    assert set(steps) == set(range(1, STEPS + 1))  # torn metric lines are skipped, none missing


@pytest.mark.parametrize("where", ["loss", pytest.param("grad", marks=pytest.mark.slow)])
def test_nonfinite_updates_are_skipped_and_counted(tmp_path, where):
    cfg = tiny_config(tmp_path, "train.steps=8", "train.batch_size=8", "train.seq_len=64", "eval.every=8",
                      "checkpoint.every=4", "train.debug_nonfinite_steps=[3,6]", f"train.debug_nonfinite_in={where}")
    t = make_trainer(cfg)
    t.run()
    m = {r["step"]: r for r in read_metrics(cfg.output_dir) if "finite" in r}
    assert [s for s in m if not m[s]["finite"]] == [3, 6] and m[8]["skipped"] == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(t.state.params))
    evals = [r["eval_loss"] for r in read_metrics(cfg.output_dir) if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]  # training went on: held-out loss at step 8 < step 0


def test_nonfinite_stop_names_the_step_and_saves_nothing_bad(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", os.path.join(ROOT, "configs/runs/pretrain_tiny.yaml"), f"output_dir={out}",
               "train.steps=20", "train.batch_size=8", "train.seq_len=64", "eval.every=0", "checkpoint.every=2",
               "checkpoint.async_save=false", "train.progress=false", "train.nan_policy=stop",
               "train.debug_nonfinite_steps=[5]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: non-finite loss or gradient at step 5") and len(err.splitlines()) == 1
    saved = _committed(out)
    assert saved and saved[-1] <= 6  # stopped right after the bad step
    src = ckpt_lib.Checkpointer(str(out / "checkpoints"), read_only=True)
    for step in saved:  # every checkpoint holds finite weights
        params = src.restore(step, _abstract(tmp_path / "x"), None)["params"]
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    src.close()


def test_spike_detector():
    d = SpikeDetector(factor=2.0, warmup=3)
    assert [d.update(i, v) for i, v in enumerate([3.0, 2.9, 2.8, 2.7])] == [None] * 4
    msg = d.update(5, 9.0)
    assert msg and "loss spike at step 5" in msg
    assert d.update(6, 2.6) is None and d.update(7, 8.0)  # the spike did not raise the running mean
    assert SpikeDetector(0.0).update(1, 1e9) is None  # off


@pytest.mark.slow
def test_loss_spike_is_logged(tmp_path):
    """An absurd learning rate blows the loss up; the spike is logged with its step."""
    cfg = tiny_config(tmp_path, "train.steps=30", "train.batch_size=8", "train.seq_len=64", "eval.every=0",
                      "checkpoint.every=0", "optimizer.lr=3.0", "optimizer.warmup_steps=10", "train.spike_factor=1.5")
    make_trainer(cfg).run()
    spikes = [r for r in read_metrics(cfg.output_dir) if r.get("loss_spike")]
    assert spikes and all(r["step"] > 5 for r in spikes)


@pytest.mark.slow  # CI time: `pytest -m slow`
def test_disk_full_before_save_keeps_earlier_checkpoints(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    base = ["train", os.path.join(ROOT, "configs/runs/pretrain_tiny.yaml"), f"output_dir={out}", "train.batch_size=8",
            "train.seq_len=64", "eval.every=0", "checkpoint.every=2", "checkpoint.async_save=false",
            "train.progress=false"]
    assert main(base + ["train.steps=4"]) == 0
    before = _committed(out)
    import shutil
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    capsys.readouterr()
    assert main(base + ["train.steps=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: not enough disk space in") and "step 4" in err and len(err.splitlines()) == 1
    assert _committed(out) == before


@pytest.mark.slow
def test_disk_full_during_write_keeps_earlier_checkpoints(tmp_path, env):
    """A real failed write: the file-size limit (RLIMIT_FSIZE) makes the OS refuse the checkpoint's
    data files mid-save, as a full disk does."""
    out = tmp_path / "run"
    cmd = [c for c in _train_cmd(out) if not c.startswith("train.steps=")]
    assert subprocess.run(cmd + ["train.steps=4"], cwd=ROOT, env=env, capture_output=True, timeout=300).returncode == 0
    before = _committed(out)

    # SIGXFSZ ignored (inherited through exec): write() then fails with EFBIG instead of killing us
    limited = ["bash", "-c", 'trap "" XFSZ; ulimit -f 256; exec "$@"', "limit"] + cmd + ["train.steps=8"]
    r = subprocess.run(limited, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]  # on a line of its own, whatever the writer threads print
    assert errors[0].startswith("error: could not write a checkpoint in") and "(step 4)" in errors[0], errors
    assert _committed(out) == before
    # after "freeing space" the same command resumes from step 4 and finishes
    r = subprocess.run(cmd + ["train.steps=8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "resuming from checkpoint step 4" in r.stdout, r.stderr[-2000:]
