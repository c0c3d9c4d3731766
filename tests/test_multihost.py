"""Multi-process training on one machine: `jax.distributed.initialize` on 127.0.0.1 with 2 processes
of 2 CPU devices each (the gloo CPU collectives), exactly as hosts of a pod would run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxllm.app.cli import main
from jaxllm.core.monitor import read_metrics
from tests.conftest import ROOT

CFG = os.path.join(ROOT, "configs/runs/pretrain_tiny.yaml")
RUN = ["train.batch_size=8", "train.seq_len=64", "eval.every=0", "eval.batches=2", "checkpoint.every=3",
       "train.progress=false", "train.log_every=1", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": ROOT}


def _cmd(out, *overrides, dist=(), cli=()):
    return [sys.executable, "-m", "jaxllm.app.cli", *cli, *dist, "train", CFG, f"output_dir={out}", *RUN, *overrides]


def _launch(out, nproc, *overrides, timeout_s=300, cli=()):
    port = _port()
    procs = [subprocess.Popen(_cmd(out, *overrides, cli=cli, dist=["--coordinator", f"127.0.0.1:{port}",
                                                                    "--num-processes", str(nproc),
                                                                    "--process-id", str(i), "--init-timeout", "60"]),
                              cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(nproc)]
    return procs


def _wait_all(procs, timeout=300):
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def test_two_processes_train_checkpoint_and_resume_exactly(tmp_path):
    out = tmp_path / "multi"
    # 3 steps, stop (checkpoint), then a fresh pair of processes resumes to 6
    for stop in ("train.stop_at=3", "train.stop_at=0"):
        results = _wait_all(_launch(out, 2, "train.steps=6", stop))
        for rc, o, e in results:
            assert rc == 0, e[-3000:]
    assert "resuming from checkpoint step 3" in results[0][1]  # process 0 prints; both resumed
    assert sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit()) == [3, 6]
    multi = read_metrics(str(out))
    # the same two processes without the stop: resume is exact (each process reads its own units,
    # so its data depends on (seed, step, process), and the iterator state restores it)
    straight = tmp_path / "straight"
    for rc, o, e in _wait_all(_launch(straight, 2, "train.steps=6")):
        assert rc == 0, e[-3000:]
    ref = read_metrics(str(straight))
    losses = lambda ms: {m["step"]: m["loss"] for m in ms if "loss" in m}
    evals = lambda ms: [m["eval_loss"] for m in ms if "eval_loss" in m]
    assert sorted(losses(multi)) == list(range(1, 7))  # only process 0 logs: each step once
    assert losses(multi) == pytest.approx(losses(ref), rel=2e-6, abs=0)
    assert evals(multi) == pytest.approx(evals(ref), rel=2e-6) and evals(ref)


@pytest.mark.slow
def test_two_processes_give_the_held_out_loss_of_one_process(tmp_path):
    """One process on 4 devices vs two processes of 2: the same held-out batches (read globally,
    rows split by process) give the same step-0 held-out loss."""
    evals = lambda ms: [m["eval_loss"] for m in ms if "eval_loss" in m]  # noqa: E731
    single = tmp_path / "single"
    r = subprocess.run(_cmd(single, "train.steps=6", "train.stop_at=1", "eval.every=3"), cwd=ROOT, env=_env(4),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r2 = _wait_all(_launch(tmp_path / "multi0", 2, "train.steps=6", "train.stop_at=1", "eval.every=3"))
    assert all(rc == 0 for rc, _, _ in r2), r2[0][2][-3000:]
    assert evals(read_metrics(str(tmp_path / "multi0")))[0] == pytest.approx(evals(read_metrics(str(single)))[0], rel=2e-6)


@pytest.mark.slow
def test_multihost_preemption_stops_every_process_at_the_same_step(tmp_path):
    """SIGTERM to one worker (as a TPU maintenance event does): JAX's preemption sync point makes
    both save the same step and exit 0."""
    out = tmp_path / "run"
    procs = _launch(out, 2, "train.steps=400", "checkpoint.every=0")
    deadline = time.time() + 180
    while not read_metrics(str(out)) and time.time() < deadline:
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    results = _wait_all(procs, timeout=180)
    steps = set()
    for rc, o, e in results:
        assert rc == 0, e[-3000:]
        steps.add(json.loads(o.strip().splitlines()[-1])["step"])
    assert len(steps) == 1 and 0 < steps.pop() < 400
    assert len([d for d in os.listdir(out / "checkpoints") if d.isdigit()]) == 1


@pytest.mark.slow
def test_lost_process_ends_the_run_instead_of_hanging(tmp_path):
    out = tmp_path / "run"
    procs = _launch(out, 2, "train.steps=100000", "checkpoint.every=0", cli=["--heartbeat-timeout", "5"])
    deadline = time.time() + 180
    while not read_metrics(str(out)) and time.time() < deadline:
        time.sleep(0.1)
    procs[1].kill()
    t0 = time.time()
    _, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode != 0 and time.time() - t0 < 60
    assert "stopped sending heartbeats" in err  # the runtime names the lost task


def test_missing_process_ends_the_join_after_the_timeout(tmp_path):
    """Process 1 never starts: process 0 gives up after --init-timeout (the runtime aborts with
    DEADLINE_EXCEEDED on RegisterTask) instead of waiting forever, having written nothing."""
    port = _port()
    t0 = time.time()
    r = subprocess.run(_cmd(tmp_path / "x", dist=["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                                  "--process-id", "0", "--init-timeout", "3"]),
                       cwd=ROOT, env=_env(2), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and time.time() - t0 < 60
    assert "DEADLINE_EXCEEDED" in r.stderr and "RegisterTask" in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1234"], "needs all three of --coordinator"),
    (["--coordinator", "nohostport", "--num-processes", "2", "--process-id", "0"], "must be HOST:PORT"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "--process-id 2 must be in"),
])
def test_bad_multihost_flags(tmp_path, capsys, flags, message):
    assert main([*flags, "train", CFG, f"output_dir={tmp_path}/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
