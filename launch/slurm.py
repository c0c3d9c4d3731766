"""SLURM GPU clusters: write an sbatch script for a jaxllm run and submit it.

    python -m launch.slurm configs/runs/pretrain_1b_h100x8.yaml --mesh configs/meshes/h100x8.yaml \\
        --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00 [--per-node] [--dry-run]

Two process layouts:
  one process per GPU (default): `srun --ntasks-per-node=GPUS`; each task joins through JAX's SLURM
    auto-detection (jaxllm.core.distributed: SLURM_JOB_ID with SLURM_NTASKS > 1), which takes the
    coordinator from the first node of SLURM_STEP_NODELIST and binds each task to the GPU numbered
    SLURM_LOCALID.
  one process per node (--per-node): `srun --ntasks-per-node=1`; the script sets
    JAXLLM_COORDINATOR (first host of the job, --port), JAXLLM_NUM_PROCESSES and, per task,
    JAXLLM_PROCESS_ID from SLURM_PROCID. These explicit values matter: JAX's SLURM auto-detection
    would bind the single task of a node to GPU 0 only (local_device_ids=[SLURM_LOCALID]).
--dry-run prints the script, then the sbatch command; otherwise the script is written to --out
(default: the log directory) and submitted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from launch.common import parse_args, LaunchError, check_run, execute, guarded, train_argv


def sbatch_script(args) -> str:
    tasks = 1 if args.per_node else args.gpus_per_node
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={args.job_name}",
             f"#SBATCH --nodes={args.nodes}",
             f"#SBATCH --ntasks-per-node={tasks}",
             f"#SBATCH --gpus-per-node={args.gpus_per_node}",
             "#SBATCH --exclusive",
             f"#SBATCH --time={args.time}",
             f"#SBATCH --output={args.log_dir}/%x-%j.out"]
    lines += [f"#SBATCH --partition={args.partition}"] * bool(args.partition)
    lines += [f"#SBATCH --account={args.account}"] * bool(args.account)
    lines += ["set -euo pipefail"]
    if args.venv:
        lines.append(f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}")
    train = shlex.join(train_argv(args.config, args.mesh, args.overrides))
    srun = f"srun --ntasks-per-node={tasks} --kill-on-bad-exit=1"
    if args.per_node:
        lines += ['export JAXLLM_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):'
                  f'{args.port}"',
                  'export JAXLLM_NUM_PROCESSES="$SLURM_NTASKS"',
                  # SLURM_PROCID differs per task, so it is read inside each task's shell.
                  f"{srun} bash -c {shlex.quote('JAXLLM_PROCESS_ID=$SLURM_PROCID exec ' + train)}"]
    else:
        lines.append(f"{srun} {train}")
    return "\n".join(lines) + "\n"


def script_path(args) -> str:
    return args.out or os.path.join(args.log_dir, f"{args.job_name}.sbatch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--mesh", required=True, help="mesh config YAML (its sizes must cover nodes*GPUs)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--per-node", action="store_true", help="one process per node instead of per GPU")
    p.add_argument("--job-name", default="jaxllm")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--port", type=int, default=8476, help="coordinator port (--per-node)")
    p.add_argument("--venv", help="virtualenv to activate on the nodes")
    p.add_argument("--log-dir", default="slurm-logs")
    p.add_argument("--out", help="where to write the sbatch script (default LOG_DIR/JOB_NAME.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command, run nothing")
    return p


def main(argv: list[str]) -> int:
    args = parse_args(build_parser(), argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise LaunchError("--nodes and --gpus-per-node must be >= 1")
    check_run(args.config, args.mesh, args.overrides, n_devices=args.nodes * args.gpus_per_node)
    script, path = sbatch_script(args), script_path(args)
    submit = [["sbatch", path]]
    if args.dry_run:
        print(script, end="")
        return execute(submit, dry_run=True)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    os.makedirs(args.log_dir, exist_ok=True)  # sbatch does not create the --output directory
    with open(path, "w") as f:
        f.write(script)
    return execute(submit, dry_run=False)


if __name__ == "__main__":
    sys.exit(guarded(main))
