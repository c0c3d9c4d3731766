"""Run logging (process 0 only): metrics.jsonl, TensorBoard events and an optional Weights & Biases
run; progress bar, MFU.

`output_dir` may be local or remote (`gs://...`, see jaxllm.core.storage). Locally metrics.jsonl is
appended and flushed line by line, so a killed process loses at most the line it was writing.
Object stores have no append: for a remote output_dir the lines are kept in memory (the existing
object's lines read at start, so a resumed run appends) and the whole object is rewritten at most
every SYNC_EVERY_S seconds and on close, so a killed process loses at most that much.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Optional

import jax

from jaxllm.config import WandbConfig
from jaxllm.core import storage
from jaxllm.errors import ConfigError

SYNC_EVERY_S = 10.0  # remote output_dir: seconds between whole-object rewrites of the logs

# Dense bf16 peak FLOP/s per device, by substring of jax's device_kind (lower-case).
PEAK_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12, "h100": 989e12, "h200": 989e12, "h800": 989e12,
    "a100": 312e12, "l4": 121e12, "b200": 2250e12,
}


def peak_flops_per_device(device: Optional[jax.Device] = None) -> Optional[float]:
    kind = (device or jax.devices()[0]).device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in kind:
            return PEAK_FLOPS[key]
    return None  # CPUs and unknown accelerators: no MFU


class _LocalLines:
    """metrics.jsonl on a local disk: appended and flushed line by line."""

    def __init__(self, path: str):
        torn = _torn(storage.path(path))
        self._file = storage.path(path).open("a")  # epath's local backend: the builtin open
        if torn:  # the previous process was killed mid-line: start ours on a fresh line
            self._file.write("\n")

    def write(self, line: str) -> None:
        self._file.write(line)
        self._file.flush()

    def sync(self) -> None:
        pass  # every line is flushed as it is written

    def close(self) -> None:
        self._file.close()


def _torn(path) -> bool:
    """True when the file's last line has no newline."""
    if not path.exists():
        return False
    with path.open("rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class _RemoteLines:
    """metrics.jsonl on an object store: every sync rewrites the whole object with all lines so far
    (one upload, published whole). Costs O(file) per sync; a metrics file stays a few MB."""

    def __init__(self, path: str):
        self.path = path
        text = storage.read_text(path) if storage.exists(path) else ""
        if text and not text.endswith("\n"):
            text += "\n"  # a torn last line (a file copied up from a killed local run): ours start fresh
        self._text, self._new = text, []

    def write(self, line: str) -> None:
        self._new.append(line)

    def sync(self) -> None:
        if self._new:
            self._text += "".join(self._new)
            self._new = []
            storage.write_atomic(self.path, self._text)

    def close(self) -> None:
        self.sync()


class _TensorBoard:
    """tensorboardX events under {output_dir}/tensorboard. tensorboardX reaches gs:// and s3:// only
    through google-cloud-storage / boto3 (extra dependencies, other credentials than fsspec's), so for
    a remote output_dir the events go to a local temp dir and each sync copies the changed event
    files up through jaxllm.core.storage."""

    def __init__(self, output_dir: str):
        from tensorboardX import SummaryWriter
        target = storage.join(output_dir, "tensorboard")
        self.remote = target if storage.is_remote(output_dir) else None
        self.local = tempfile.mkdtemp(prefix="jaxllm-tensorboard-") if self.remote else target
        # event files are named by the second and host; a suffix keeps a quick restart's upload from
        # overwriting the previous process's file under the same name
        self.writer = SummaryWriter(self.local, filename_suffix=f".{uuid.uuid4().hex[:8]}" if self.remote else "")
        self._uploaded: dict[str, int] = {}  # event file name -> size when last copied up

    def add(self, step: int, clean: dict) -> None:
        for k, v in clean.items():
            if _finite_number(v):
                self.writer.add_scalar(k, v, step)

    def sync(self) -> None:
        if self.remote is not None:
            self.writer.flush()
            self._upload()

    def _upload(self) -> None:
        for name in sorted(os.listdir(self.local)):
            size = os.path.getsize(os.path.join(self.local, name))
            if self._uploaded.get(name) != size:
                storage.copy_file(os.path.join(self.local, name), storage.join(self.remote, name))
                self._uploaded[name] = size

    def close(self) -> None:
        self.writer.close()
        if self.remote is not None:
            self._upload()
            shutil.rmtree(self.local, ignore_errors=True)


class _Wandb:
    """A Weights & Biases run. Its id is kept in {output_dir}/wandb_run_id, so a restarted (resumed)
    run logs into the same W&B run rather than starting a new one."""

    def __init__(self, wandb, cfg: WandbConfig, output_dir: str, run_config: dict):
        id_path = storage.join(output_dir, "wandb_run_id")
        if storage.exists(id_path):
            run_id = storage.read_text(id_path).strip()
        else:  # chosen and stored before init, so a crash inside init still reuses it
            run_id = uuid.uuid4().hex[:12]
            storage.write_atomic(id_path, run_id + "\n")
        self.run = wandb.init(project=cfg.project, entity=cfg.entity or None,
                              name=cfg.name or storage.path(output_dir).name, tags=list(cfg.tags) or None,
                              mode=cfg.mode or None, dir=_wandb_dir(output_dir), config=run_config,
                              id=run_id, resume="allow")

    def log(self, step: int, clean: dict) -> None:
        # NaN/inf arrive as strings ("nan"), other strings are not chartable: metrics.jsonl keeps them
        data = {k: v for k, v in clean.items() if _finite_number(v)}
        if data:
            self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("log.wandb.project is set but wandb is not installed: pip install 'jaxllm[wandb]' "
                          "(or leave log.wandb.project empty)") from None
    return wandb


def _wandb_dir(output_dir: str) -> str:
    """wandb's local files (offline runs, its logs) live in the run's output_dir when that is local;
    wandb writes only to a local disk, so for a remote output_dir: WANDB_DIR or a temp dir."""
    if not storage.is_remote(output_dir):
        return output_dir
    return os.environ.get("WANDB_DIR") or tempfile.mkdtemp(prefix="jaxllm-wandb-")


class MetricsLogger:
    """One JSON line per `log` call in metrics.jsonl, plus TensorBoard scalars and W&B (when
    `wandb.project` is set). `run_config` (the resolved config as a dict) becomes the W&B run config."""

    def __init__(self, output_dir: str, enabled: bool = True, tensorboard: bool = True,
                 wandb: Optional[WandbConfig] = None, run_config: Optional[dict] = None):
        self.enabled = enabled
        self.path = storage.join(output_dir, "metrics.jsonl")
        self.remote = storage.is_remote(output_dir)
        self._tb = self._wandb = None
        if not enabled:
            return
        wandb_module = _import_wandb() if wandb is not None and wandb.project else None  # fail before writing
        if not self.remote:  # object stores have no directories to create
            storage.makedirs(output_dir)
        self._lines = (_RemoteLines if self.remote else _LocalLines)(self.path)
        if tensorboard:
            self._tb = _TensorBoard(output_dir)
        if wandb_module is not None:
            self._wandb = _Wandb(wandb_module, wandb, output_dir, run_config or {})
        self._synced = time.monotonic()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        self._lines.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self._tb is not None:
            self._tb.add(step, clean)
        if self._wandb is not None:
            self._wandb.log(step, clean)
        if self.remote and time.monotonic() - self._synced >= SYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        """Publishes what was logged so far (a remote output_dir is otherwise written every SYNC_EVERY_S)."""
        if self.enabled:
            self._lines.sync()
            if self._tb is not None:
                self._tb.sync()
            self._synced = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self._lines.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def read_metrics(output_dir: str) -> list[dict]:
    path = storage.join(output_dir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    out = []
    for line in storage.read_text(path).split("\n"):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a killed process
            continue
    return out


class Progress:
    """tqdm bar on interactive terminals; plain periodic lines otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")

    def update(self, n: int, text: str) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(text, refresh=False)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
