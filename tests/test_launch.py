"""Launchers: the exact commands of --dry-run, the generated sbatch script, and bad arguments that
stop before anything runs. Nothing here calls gcloud, sbatch or ssh."""

import os
import subprocess

import pytest

from launch import common, multinode, slurm, tpu

from .conftest import ROOT

CFG = "configs/runs/pretrain_70b_v5p256.yaml"
MESH = "configs/meshes/v5p_256.yaml"
GPU_CFG = "configs/runs/pretrain_1b_h100x8.yaml"
GPU_MESH = "configs/meshes/h100x8.yaml"
LOC = ["--zone", "us-east5-a", "--project", "proj"]


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    """Paths as a user types them from the repo root; and a subprocess.run that fails the test."""
    monkeypatch.chdir(ROOT)

    def forbidden(*a, **k):
        raise AssertionError(f"a launcher ran a command in a test: {a}")
    monkeypatch.setattr(subprocess, "run", forbidden)


def launch(capsys, module, *argv):
    code = common.guarded(module.main, list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), [line for line in err.splitlines() if line.strip()]


# ---- TPU VMs ------------------------------------------------------------------------------------
def test_tpu_create(capsys):
    code, out, _ = launch(capsys, tpu, "create", "llm", "--accelerator-type", "v5p-256", *LOC, "--spot", "--dry-run")
    assert code == 0 and out == [
        "gcloud compute tpus queued-resources create llm --zone=us-east5-a --project=proj "
        "--accelerator-type=v5p-256 --runtime-version=v2-alpha-tpuv5 --node-id=llm --spot"]
    _, out, _ = launch(capsys, tpu, "create", "llm", "--accelerator-type", "v5p-512", *LOC, "--node-count", "2",
                       "--reserved", "--dry-run")
    assert out == ["gcloud compute tpus queued-resources create llm --zone=us-east5-a --project=proj "
                   "--accelerator-type=v5p-512 --runtime-version=v2-alpha-tpuv5 --node-count=2 --node-prefix=llm "
                   "--reserved"]
    _, out, _ = launch(capsys, tpu, "create", "small", "--accelerator-type", "v6e-8", *LOC, "--direct", "--dry-run")
    assert out == ["gcloud compute tpus tpu-vm create small --zone=us-east5-a --project=proj "
                   "--accelerator-type=v6e-8 --version=v2-alpha-tpuv6e"]


def test_tpu_setup_ships_this_checkout(capsys):
    code, out, _ = launch(capsys, tpu, "setup", "llm", *LOC, "--node-count", "2", "--dry-run")
    install = ("'--command=set -e && mkdir -p ~/jaxllm && tar -xzf ~/jaxllm.tar.gz -C ~/jaxllm && "
               "python3 -m venv ~/jaxllm-venv && ~/jaxllm-venv/bin/pip install -q --upgrade pip && cd ~/jaxllm && "
               "~/jaxllm-venv/bin/pip install -q -e '\"'\"'.[tpu]'\"'\"' && ~/jaxllm-venv/bin/python -c "
               "'\"'\"'import jax; print(jax.process_index(), jax.device_count())'\"'\"''")
    assert code == 0 and out == [
        f"git -C {common.REPO} archive --format=tar.gz --output=/tmp/jaxllm-llm.tar.gz HEAD",
        "gcloud compute tpus tpu-vm scp /tmp/jaxllm-llm.tar.gz 'llm-0:~/jaxllm.tar.gz' --worker=all "
        "--zone=us-east5-a --project=proj",
        f"gcloud compute tpus tpu-vm ssh llm-0 --worker=all --zone=us-east5-a --project=proj {install}",
        "gcloud compute tpus tpu-vm scp /tmp/jaxllm-llm.tar.gz 'llm-1:~/jaxllm.tar.gz' --worker=all "
        "--zone=us-east5-a --project=proj",
        f"gcloud compute tpus tpu-vm ssh llm-1 --worker=all --zone=us-east5-a --project=proj {install}"]


def test_tpu_setup_from_git(capsys):
    code, out, _ = launch(capsys, tpu, "setup", "llm", *LOC, "--git", "https://example.com/jaxllm.git@v1", "--dry-run")
    assert code == 0 and len(out) == 1
    assert out[0].startswith("gcloud compute tpus tpu-vm ssh llm --worker=all --zone=us-east5-a --project=proj "
                             "'--command=set -e && (test -d ~/jaxllm/.git || git clone "
                             "https://example.com/jaxllm.git ~/jaxllm) && git -C ~/jaxllm fetch -q origin && "
                             "git -C ~/jaxllm checkout -q v1 && python3 -m venv ~/jaxllm-venv")


def test_tpu_run_logs_stop_delete(capsys):
    code, out, _ = launch(capsys, tpu, "run", "llm", CFG, "train.steps=10", "output_dir=gs://bucket/run 1",
                          "--mesh", MESH, *LOC, "--dry-run")
    assert code == 0 and out == [
        "gcloud compute tpus tpu-vm ssh llm --worker=all --zone=us-east5-a --project=proj "
        "'--command=mkdir -p ~/jaxllm-logs && cd ~/jaxllm && nohup ~/jaxllm-venv/bin/jaxllm train "
        "configs/runs/pretrain_70b_v5p256.yaml mesh=configs/meshes/v5p_256.yaml train.steps=10 "
        "'\"'\"'output_dir=gs://bucket/run 1'\"'\"' > ~/jaxllm-logs/pretrain_70b_v5p256.$(hostname).log 2>&1 "
        "< /dev/null & echo $! > ~/jaxllm-logs/pretrain_70b_v5p256.pid'"]
    _, out, _ = launch(capsys, tpu, "logs", "llm", "--run-name", "pretrain_70b_v5p256", *LOC, "--dry-run")
    assert out == ["gcloud compute tpus tpu-vm ssh llm --worker=0 --zone=us-east5-a --project=proj "
                   "'--command=tail -n 100 -F ~/jaxllm-logs/pretrain_70b_v5p256.*.log'"]
    _, out, _ = launch(capsys, tpu, "logs", "llm", "--run-name", "r", "--worker", "all", "--node-count", "2",
                       "--node", "1", "--no-follow", *LOC, "--dry-run")
    assert out == ["gcloud compute tpus tpu-vm ssh llm-1 --worker=all --zone=us-east5-a --project=proj "
                   "'--command=tail -n 100 ~/jaxllm-logs/r.*.log'"]
    _, out, _ = launch(capsys, tpu, "stop", "llm", "--run-name", "r", *LOC, "--dry-run")
    assert out == ["gcloud compute tpus tpu-vm ssh llm --worker=all --zone=us-east5-a --project=proj "
                   "'--command=if [ -f ~/jaxllm-logs/r.pid ]; then kill $(cat ~/jaxllm-logs/r.pid) 2>/dev/null "
                   "|| true; rm -f ~/jaxllm-logs/r.pid; fi'"]
    _, out, _ = launch(capsys, tpu, "delete", "llm", *LOC, "--dry-run")
    assert out == ["gcloud compute tpus queued-resources delete llm --zone=us-east5-a --project=proj --force --quiet"]
    _, out, _ = launch(capsys, tpu, "delete", "small", *LOC, "--direct", "--dry-run")
    assert out == ["gcloud compute tpus tpu-vm delete small --zone=us-east5-a --project=proj --quiet"]


# ---- SLURM --------------------------------------------------------------------------------------
SBATCH_HEAD = """#!/bin/bash
#SBATCH --job-name=llm1b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node={tasks}
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=slurm-logs/%x-%j.out
#SBATCH --partition=gpu
set -euo pipefail
"""


def test_slurm_one_process_per_gpu(capsys):
    code, out, _ = launch(capsys, slurm, GPU_CFG, "--mesh", GPU_MESH, "mesh.fsdp=-1", "--nodes", "4",
                          "--partition", "gpu", "--time", "48:00:00", "--job-name", "llm1b", "--dry-run")
    assert code == 0
    assert "\n".join(out) + "\n" == SBATCH_HEAD.format(tasks=8) + (
        "srun --ntasks-per-node=8 --kill-on-bad-exit=1 jaxllm train configs/runs/pretrain_1b_h100x8.yaml "
        "mesh=configs/meshes/h100x8.yaml mesh.fsdp=-1\n"
        "sbatch slurm-logs/llm1b.sbatch\n")


def test_slurm_one_process_per_node(capsys):
    code, out, _ = launch(capsys, slurm, GPU_CFG, "--mesh", GPU_MESH, "mesh.fsdp=32", "--nodes", "4", "--per-node",
                          "--partition", "gpu", "--time", "48:00:00", "--job-name", "llm1b", "--venv", "/opt/venv",
                          "--port", "9000", "--dry-run")
    assert code == 0
    assert "\n".join(out) + "\n" == SBATCH_HEAD.format(tasks=1) + (
        "source /opt/venv/bin/activate\n"
        'export JAXLLM_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):9000"\n'
        'export JAXLLM_NUM_PROCESSES="$SLURM_NTASKS"\n'
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'JAXLLM_PROCESS_ID=$SLURM_PROCID exec jaxllm train "
        "configs/runs/pretrain_1b_h100x8.yaml mesh=configs/meshes/h100x8.yaml mesh.fsdp=32'\n"
        "sbatch slurm-logs/llm1b.sbatch\n")


def test_slurm_script_is_valid_bash(tmp_path, capsys):
    _, out, _ = launch(capsys, slurm, GPU_CFG, "--mesh", GPU_MESH, "mesh.fsdp=32", "--nodes", "4", "--per-node",
                       "--dry-run")
    path = tmp_path / "job.sbatch"
    path.write_text("\n".join(out[:-1]) + "\n")
    import shutil
    if shutil.which("bash") is None:
        pytest.skip("no bash to syntax-check the script")
    check = subprocess.Popen(["bash", "-n", str(path)], stderr=subprocess.PIPE, text=True)
    assert check.wait() == 0, check.stderr.read()


# ---- plain multi-node ----------------------------------------------------------------------------
def test_multinode_commands(capsys):
    code, out, _ = launch(capsys, multinode, GPU_CFG, "--mesh", GPU_MESH, "mesh.fsdp=-1", "--hosts",
                          "10.0.0.2,10.0.0.3,10.0.0.4", "--port", "9000", "--dry-run")
    assert code == 0 and out == [
        f"jaxllm --coordinator 10.0.0.2:9000 --num-processes 3 --process-id {i} train "
        f"configs/runs/pretrain_1b_h100x8.yaml mesh=configs/meshes/h100x8.yaml mesh.fsdp=-1" for i in range(3)]


# ---- mistakes: one line, exit 2, nothing run ------------------------------------------------------
@pytest.mark.parametrize("module,argv,words", [
    (tpu, ["run", "llm", "configs/runs/missing.yaml", "--mesh", MESH, *LOC], "run config not found: configs/runs/missing.yaml"),
    (tpu, ["run", "llm", CFG, "--mesh", "configs/meshes/missing.yaml", *LOC], "mesh config not found"),
    (tpu, ["run", "llm", CFG, "train.stpes=3", "--mesh", MESH, *LOC], "unknown config key train.stpes"),
    (tpu, ["run", "llm", CFG, "objective.name=dpoo", "--mesh", MESH, *LOC], "did you mean 'dpo'"),
    (tpu, ["run", "llm", CFG, "--mesh", MESH, *LOC], "output_dir=runs/pretrain_70b is a local path"),
    (tpu, ["create", "llm", "--accelerator-type", "v9-8", *LOC], "--accelerator-type 'v9-8'"),
    (tpu, ["create", "llm", "--accelerator-type", "v5p-8", "--direct", "--node-count", "2", *LOC], "queued resource"),
    (slurm, ["configs/runs/missing.yaml", "--mesh", GPU_MESH, "--nodes", "2"], "run config not found"),
    (slurm, [GPU_CFG, "--mesh", GPU_MESH, "--nodes", "4"], "but there are 32 devices"),
    (multinode, ["configs/runs/missing.yaml", "--mesh", GPU_MESH, "--hosts", "a,b"], "run config not found"),
    (multinode, [GPU_CFG, "--mesh", GPU_MESH, "--hosts", "a,a"], "lists a host twice"),
])
def test_bad_arguments_run_nothing(capsys, module, argv, words):
    code, out, err = launch(capsys, module, *argv)  # no --dry-run: subprocess.run would fail the test
    assert code == 2 and out == []
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_tpu_config_outside_repo_is_refused(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(open(os.path.join(ROOT, CFG)).read().replace("../models/", f"{ROOT}/configs/models/")
                   .replace("../meshes/", f"{ROOT}/configs/meshes/"))
    code, _, err = launch(capsys, tpu, "run", "llm", str(cfg), "--mesh", MESH, *LOC, "--dry-run")
    assert code == 2 and "outside the repo" in err[0]
