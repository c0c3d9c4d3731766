"""What every launcher shares: argument checks, the `jaxllm train` command line, dry-run/execute."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Callable, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LaunchError(Exception):
    """A launcher argument the user can fix; printed as one `error:` line, exit code 2."""


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise LaunchError(f"{what} not found: {path}")
    return path


def check_run(config: str, mesh: str, overrides: Sequence[str], n_devices: Optional[int] = None):
    """Loads the run config with the mesh and overrides, so a typo fails here, on one machine,
    before hundreds of hosts start (jaxllm.config's one-line messages). With `n_devices`, also
    checks that the mesh sizes cover exactly that many devices."""
    require_file(config, "run config")
    require_file(mesh, "mesh config")
    from jaxllm.config import load_config
    from jaxllm.errors import UserError
    try:
        cfg = load_config(config, [f"mesh={mesh}", *overrides])
        from jaxllm.objectives import validate
        validate(cfg)  # objective name, data kind, options, RL settings and reward functions
        if n_devices is not None:
            from jaxllm.core.sharding import mesh_shape
            mesh_shape(cfg.mesh, n_devices)
    except UserError as e:
        raise LaunchError(f"{config}: {e}") from None
    return cfg


def repo_relative(path: str, what: str) -> str:
    """Path inside the repo, relative to its root: TPU workers get the repo, not this machine's paths."""
    rel = os.path.relpath(os.path.abspath(path), REPO)
    if rel.startswith(".."):
        raise LaunchError(f"{what} {path} is outside the repo {REPO}; the workers only get the repo, so put it "
                          f"under configs/")
    return rel


def train_argv(config: str, mesh: str, overrides: Sequence[str], jaxllm: str = "jaxllm",
               dist_flags: Sequence[str] = ()) -> list[str]:
    """`jaxllm [multi-host flags] train CONFIG mesh=MESH [overrides]` (flags precede the subcommand)."""
    return [jaxllm, *dist_flags, "train", config, f"mesh={mesh}", *overrides]


def execute(commands: Sequence[Sequence[str]], dry_run: bool, run: Optional[Callable] = None,
            out=None) -> int:
    """Dry run: print each command shell-quoted, one per line. Otherwise run them in order and stop
    at the first that fails, returning its exit code."""
    out = out or sys.stdout
    if dry_run:
        for cmd in commands:
            print(shlex.join(cmd), file=out)
        return 0
    run = run or subprocess.run
    for cmd in commands:
        print(f"+ {shlex.join(cmd)}", file=out, flush=True)
        try:
            code = run(list(cmd)).returncode
        except FileNotFoundError:
            raise LaunchError(f"{cmd[0]}: command not found; install it or put it on PATH") from None
        if code:
            print(f"error: command failed with exit code {code}: {shlex.join(cmd)}", file=sys.stderr)
            return code
    return 0


def parse_args(parser, argv: Sequence[str]):
    """parse_args that also accepts key=value overrides after the options (argparse alone stops
    filling a positional list once an option has been seen)."""
    args, extra = parser.parse_known_args(list(argv))
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def guarded(main: Callable[[list[str]], int], argv: Optional[list[str]] = None) -> int:
    """Runs a launcher's main with user mistakes as one `error:` line and exit code 2."""
    try:
        return main(list(sys.argv[1:] if argv is None else argv))
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
