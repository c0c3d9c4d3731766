"""Cloud TPU VMs: create, set up, run, watch, stop and delete a jaxllm training job with gcloud.

    python -m launch.tpu create NAME --accelerator-type v5p-256 --zone us-east5-a --project P [--spot]
    python -m launch.tpu setup  NAME --zone us-east5-a --project P
    python -m launch.tpu run    NAME configs/runs/pretrain_70b_v5p256.yaml --mesh configs/meshes/v5p_256.yaml ...
    python -m launch.tpu logs   NAME ...            # follow worker 0's log (--worker all: every worker)
    python -m launch.tpu stop   NAME ...            # end the training processes (by their pid files)
    python -m launch.tpu delete NAME ...

A slice is requested as a queued resource (the recommended path, and the only one for multi-slice:
`--node-count N` makes nodes NAME-0..NAME-{N-1} joined over DCN); `--direct` uses `tpu-vm create`
instead. Later subcommands take the same NAME/--node-count/--direct and address every node with
`gcloud compute tpus tpu-vm ssh/scp NODE --worker=all`. Every subcommand has --dry-run.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from launch.common import parse_args, REPO, LaunchError, check_run, execute, guarded, repo_relative, train_argv

# Default TPU VM runtime (software image) per generation, as Cloud TPU documents them.
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5e": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "~/jaxllm"  # the repo on every worker
REMOTE_VENV = "~/jaxllm-venv"
REMOTE_LOGS = "~/jaxllm-logs"


def gcloud_base(args) -> list[str]:
    return [f"--zone={args.zone}", f"--project={args.project}"]


def node_names(args) -> list[str]:
    """Queued-resource multi-slice nodes are NAME-0..NAME-{N-1}; a single slice is NAME."""
    if args.node_count > 1:
        return [f"{args.name}-{i}" for i in range(args.node_count)]
    return [args.name]


def ssh(args, node: str, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, f"--worker={worker}", *gcloud_base(args),
            f"--command={command}"]


# ---- create -----------------------------------------------------------------------------------
def runtime_for(accelerator: str) -> str:
    m = re.fullmatch(r"(v4|v5litepod|v5e|v5p|v6e)-[0-9]+", accelerator)
    if not m:
        raise LaunchError(f"--accelerator-type {accelerator!r}: expected e.g. v4-8, v5litepod-16, v5p-256, v6e-64")
    return RUNTIMES[m.group(1)]


def cmd_create(args) -> list[list[str]]:
    version = args.version or runtime_for(args.accelerator_type)
    if args.spot and args.reserved:
        raise LaunchError("--spot and --reserved exclude each other")
    pricing = ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
    if args.direct:
        if args.node_count > 1:
            raise LaunchError("multi-slice (--node-count > 1) needs a queued resource: drop --direct")
        return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *gcloud_base(args),
                 f"--accelerator-type={args.accelerator_type}", f"--version={version}", *pricing]]
    nodes = ([f"--node-count={args.node_count}", f"--node-prefix={args.name}"] if args.node_count > 1
             else [f"--node-id={args.name}"])
    return [["gcloud", "compute", "tpus", "queued-resources", "create", args.name, *gcloud_base(args),
             f"--accelerator-type={args.accelerator_type}", f"--runtime-version={version}", *nodes, *pricing]]


# ---- setup ------------------------------------------------------------------------------------
def install_script(source_step: str) -> str:
    """Remote shell: put the repo in ~/jaxllm, then a venv with jaxllm[tpu] (jax + libtpu)."""
    return " && ".join([
        "set -e", source_step,
        f"python3 -m venv {REMOTE_VENV}",
        f"{REMOTE_VENV}/bin/pip install -q --upgrade pip",
        f"cd {REMOTE_DIR} && {REMOTE_VENV}/bin/pip install -q -e '.[tpu]'",
        f"{REMOTE_VENV}/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'",
    ])


def cmd_setup(args) -> list[list[str]]:
    if args.git:
        url, _, ref = args.git.partition("@")
        fetch = (f"(test -d {REMOTE_DIR}/.git || git clone {shlex.quote(url)} {REMOTE_DIR}) && "
                 f"git -C {REMOTE_DIR} fetch -q origin && git -C {REMOTE_DIR} checkout -q {shlex.quote(ref or 'HEAD')}")
        return [ssh(args, node, install_script(fetch)) for node in node_names(args)]
    # Ship the committed tree of this checkout (uncommitted edits are not included: commit first).
    tarball = args.tarball or f"/tmp/jaxllm-{args.name}.tar.gz"
    commands = [["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={tarball}", args.ref]]
    unpack = f"mkdir -p {REMOTE_DIR} && tar -xzf ~/jaxllm.tar.gz -C {REMOTE_DIR}"
    for node in node_names(args):
        commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{node}:~/jaxllm.tar.gz",
                         "--worker=all", *gcloud_base(args)])
        commands.append(ssh(args, node, install_script(unpack)))
    return commands


# ---- run / logs / stop ------------------------------------------------------------------------
def run_name(args) -> str:
    """Names the log and pid files; `run` defaults it to the config's file name."""
    return args.run_name or os.path.splitext(os.path.basename(args.config))[0]


def cmd_run(args) -> list[list[str]]:
    cfg = check_run(args.config, args.mesh, args.overrides)
    config, mesh = repo_relative(args.config, "run config"), repo_relative(args.mesh, "mesh config")
    if "://" not in cfg.output_dir and not args.local_output:
        # every host writes its shards of each checkpoint into output_dir: it must be storage all
        # hosts share, and outlive the TPU VMs
        raise LaunchError(f"output_dir={cfg.output_dir} is a local path; TPU runs write checkpoints from every "
                          f"host, so pass output_dir=gs://BUCKET/PATH (or --local-output for a single-host "
                          f"scratch run)")
    name = run_name(args)
    # The executable stays unquoted so the remote shell expands its ~; the rest is quoted.
    train = f"{REMOTE_VENV}/bin/" + shlex.join(train_argv(config, mesh, args.overrides))
    # One log per worker ($(hostname) tells them apart once collected); nohup + pid file so the job
    # outlives the ssh session and `stop` can end exactly this process.
    log = f"{REMOTE_LOGS}/{name}.$(hostname).log"
    remote = (f"mkdir -p {REMOTE_LOGS} && cd {REMOTE_DIR} && "
              f"nohup {train} > {log} 2>&1 < /dev/null & echo $! > {REMOTE_LOGS}/{name}.pid")
    return [ssh(args, node, remote) for node in node_names(args)]


def cmd_logs(args) -> list[list[str]]:
    """Follows one node's log(s): worker N's, or with --worker all every worker's, interleaved."""
    nodes = node_names(args)
    if not 0 <= args.node < len(nodes):
        raise LaunchError(f"--node {args.node} must be in [0, {len(nodes)})")
    tail = ["tail", "-n", str(args.lines)] + ([] if args.no_follow else ["-F"])
    command = " ".join(tail) + f" {REMOTE_LOGS}/{run_name(args)}.*.log"
    return [ssh(args, nodes[args.node], command, worker=args.worker)]


def cmd_stop(args) -> list[list[str]]:
    pid = f"{REMOTE_LOGS}/{run_name(args)}.pid"
    remote = f"if [ -f {pid} ]; then kill $(cat {pid}) 2>/dev/null || true; rm -f {pid}; fi"
    return [ssh(args, node, remote) for node in node_names(args)]


def cmd_delete(args) -> list[list[str]]:
    if args.direct:
        return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *gcloud_base(args), "--quiet"]]
    # --force also deletes the queued resource's nodes.
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *gcloud_base(args),
             "--force", "--quiet"]]


# ---- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, run_args: bool = False):
        sp.add_argument("name", help="TPU (queued resource) name")
        if run_args:
            sp.add_argument("config", help="run config YAML (inside this repo)")
            sp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
            sp.add_argument("--mesh", required=True, help="mesh config YAML (inside this repo)")
        sp.add_argument("--zone", required=True)
        sp.add_argument("--project", required=True)
        sp.add_argument("--node-count", type=int, default=1, help="slices of a multi-slice queued resource")
        sp.add_argument("--direct", action="store_true", help="plain `tpu-vm create`, not a queued resource")
        sp.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
        return sp

    c = common(sub.add_parser("create", help="request the slice(s)"))
    c.add_argument("--accelerator-type", required=True, help="v4-8, v5litepod-16, v5p-256, v6e-64, ...")
    c.add_argument("--version", help="TPU VM runtime (default per generation: " +
                   ", ".join(f"{k}: {v}" for k, v in RUNTIMES.items()) + ")")
    c.add_argument("--spot", action="store_true")
    c.add_argument("--reserved", action="store_true")

    s = common(sub.add_parser("setup", help="install jaxllm[tpu] on every worker"))
    s.add_argument("--git", help="clone URL[@REF] on the workers instead of shipping this checkout")
    s.add_argument("--ref", default="HEAD", help="commit of this checkout to ship (git archive)")
    s.add_argument("--tarball", help="local path for the archive (default /tmp/jaxllm-NAME.tar.gz)")

    r = common(sub.add_parser("run", help="start `jaxllm train` on every worker (nohup, one log per worker)"),
               run_args=True)
    r.add_argument("--run-name", help="log/pid file name (default: the config's file name)")
    r.add_argument("--local-output", action="store_true",
                   help="allow a local output_dir (single-host scratch runs; lost with the VM)")

    lg = common(sub.add_parser("logs", help="follow the run's log"))
    lg.add_argument("--run-name", required=True, help="as given to (or derived by) `run`")
    lg.add_argument("--node", type=int, default=0, help="which slice's node (multi-slice)")
    lg.add_argument("--worker", default="0", help="worker index, or 'all'")
    lg.add_argument("--lines", type=int, default=100)
    lg.add_argument("--no-follow", action="store_true")

    st = common(sub.add_parser("stop", help="end the run's processes on every worker"))
    st.add_argument("--run-name", required=True)

    common(sub.add_parser("delete", help="delete the slice(s)"))
    return p


COMMANDS = {"create": cmd_create, "setup": cmd_setup, "run": cmd_run, "logs": cmd_logs, "stop": cmd_stop,
            "delete": cmd_delete}


def main(argv: list[str]) -> int:
    args = parse_args(build_parser(), argv)
    if args.node_count < 1:
        raise LaunchError(f"--node-count {args.node_count} must be >= 1")
    return execute(COMMANDS[args.command](args), args.dry_run)


if __name__ == "__main__":
    sys.exit(guarded(main))
