"""Multi-host start-up: JAX's own multi-controller runtime, configured from flags or the environment.

One process per host (TPU VM worker, GPU node) or per GPU runs the same command. Where the
coordinator, the process count and this process's index come from, first match wins:
  1. explicit flags (`jaxllm --coordinator HOST:PORT --num-processes N --process-id I ...`);
  2. JAXLLM_COORDINATOR / JAXLLM_NUM_PROCESSES / JAXLLM_PROCESS_ID (what `launch/slurm.py --per-node` sets);
  3. SLURM (SLURM_JOB_ID with SLURM_NTASKS > 1) and multi-worker TPU VMs (TPU_WORKER_HOSTNAMES with
     more than one host): JAX's cluster auto-detection fills everything in.
A single host with none of these runs without initialising anything.

Timeouts are always set, so a multi-host run never waits forever: `init_timeout_s` bounds the wait
for every process to join, and `heartbeat_timeout_s` ends the survivors (with the runtime's message
naming the lost task) when a process dies mid-run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from jaxllm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
    coordinator: Optional[str] = None  # "host:port" of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    init_timeout_s: int = 300
    heartbeat_timeout_s: int = 100


def from_env(args: DistributedArgs, env=os.environ) -> DistributedArgs:
    """Fills unset fields from JAXLLM_* variables."""
    def get(name, cast):
        value = env.get(name)
        return cast(value) if value not in (None, "") else None
    return dataclasses.replace(
        args,
        coordinator=args.coordinator or get("JAXLLM_COORDINATOR", str),
        num_processes=args.num_processes if args.num_processes is not None else get("JAXLLM_NUM_PROCESSES", int),
        process_id=args.process_id if args.process_id is not None else get("JAXLLM_PROCESS_ID", int))


def cluster_detected(env=os.environ) -> Optional[str]:
    """'slurm' / 'tpu' when the environment is a multi-process job JAX can configure itself."""
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return "slurm"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
        return "tpu"
    return None


def check(args: DistributedArgs) -> None:
    given = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if any(given) and not all(given):
        raise ConfigError("multi-host start needs all three of --coordinator HOST:PORT, --num-processes N and "
                          "--process-id I (or JAXLLM_COORDINATOR/JAXLLM_NUM_PROCESSES/JAXLLM_PROCESS_ID)")
    if all(given):
        if ":" not in args.coordinator:
            raise ConfigError(f"--coordinator {args.coordinator!r} must be HOST:PORT, e.g. 10.0.0.2:8476")
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            raise ConfigError(f"--process-id {args.process_id} must be in [0, --num-processes "
                              f"{args.num_processes})")


def initialize(args: DistributedArgs = DistributedArgs(), env=os.environ) -> bool:
    """Starts the multi-controller runtime if this is a multi-process job; returns whether it did."""
    args = from_env(args, env)
    check(args)
    explicit = args.coordinator is not None
    if not explicit and cluster_detected(env) is None:
        return False
    import jax
    kwargs = {"initialization_timeout": args.init_timeout_s, "heartbeat_timeout_seconds": args.heartbeat_timeout_s}
    if explicit:
        kwargs.update(coordinator_address=args.coordinator, num_processes=args.num_processes,
                      process_id=args.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - the runtime raises plain RuntimeError/XlaRuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"could not join the multi-host job (coordinator {args.coordinator or 'auto'}, "
                          f"timeout {args.init_timeout_s}s): {first}; check that every process runs and the "
                          f"coordinator address is reachable") from None
    return True


def allgather_json(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order (a collective: all processes call
    it). Used for the per-process input-iterator states that go into one checkpoint."""
    import json

    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:raw.size] = raw
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(every, lengths)]
