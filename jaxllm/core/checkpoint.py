"""Orbax checkpoints: params, optimizer state, data-iterator state and JSON metadata.

Layout: `{output_dir}/checkpoints/{step}/{params,train_state,data,metadata}`. Orbax writes each
step into a temporary directory and renames it when complete (its commit), so a half-written
step is never listed or loaded. Restores take abstract targets carrying the *current* mesh's
shardings, so a checkpoint saved on one mesh loads onto any other (resharded on read).
Keeping `params` as its own item lets a later stage load params only (`init_from`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from typing import Optional

import jax
import orbax.checkpoint as ocp

from jaxllm.core import storage
from jaxllm.errors import CheckpointError, CheckpointWriteError

ITEMS = ("params", "train_state", "data", "metadata")


def checkpoint_dir(path: str) -> str:
    """Accepts a run's output_dir, its checkpoints/ dir or a single step dir."""
    path = storage.join(path)
    if storage.isdir(storage.join(path, "checkpoints")):
        return storage.join(path, "checkpoints")
    return path


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = storage.join(directory)  # absolute local path or a URL (gs://...)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
            read_only=read_only)
        # PyTree handlers: they allow restoring a subset (new heads, dropped LM head, LoRA merge).
        handlers = {"params": ocp.PyTreeCheckpointHandler(), "train_state": ocp.PyTreeCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params, train_state, data_state: dict, metadata: dict) -> None:
        self.check_free_space(step, (params, train_state))
        args = ocp.args.Composite(
            params=ocp.args.PyTreeSave(params),
            train_state=ocp.args.PyTreeSave(train_state),
            data=ocp.args.JsonSave(data_state),
            metadata=ocp.args.JsonSave(metadata))
        with self._write_errors():  # also raises a failed earlier async save
            self.manager.save(step, args=args, force=True)

    def check_free_space(self, step: int, tree) -> None:
        """Refuses to start a save that cannot fit (before writing anything): the bytes this process
        writes (its replica-0 shards) plus 10% against the free space of the checkpoint filesystem."""
        need = 1.1 * sum(sh.data.nbytes for leaf in jax.tree.leaves(tree) if hasattr(leaf, "addressable_shards")
                         for sh in leaf.addressable_shards if sh.replica_id == 0)
        if storage.is_remote(self.directory):
            return  # object stores report no free space; a failed write is still caught below
        free = shutil.disk_usage(self.directory).free
        if need > free:  # nothing was written: a plain error, the process can exit normally
            good = _latest_complete(self.directory)
            raise CheckpointError(
                f"not enough disk space in {self.directory} for checkpoint step {step}: needs about "
                f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free; free space or move output_dir, then rerun "
                f"to resume from the last complete checkpoint ({'step ' + str(good) if good is not None else 'none yet'})")

    @contextlib.contextmanager
    def _write_errors(self):
        """A failed write (disk full, quota, permissions) -> one line naming the directory and the
        last complete step. The failed step stays a tmp dir that is never listed or loaded."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - orbax wraps OS errors in ValueError/RuntimeError
            if isinstance(e, CheckpointError):
                raise
            good = _latest_complete(self.directory)
            raise CheckpointWriteError(f"could not write a checkpoint in {self.directory} ({_os_reason(e)}); free "
                                  f"disk space or move output_dir, then rerun to resume from the last complete "
                                  f"checkpoint ({'step ' + str(good) if good is not None else 'none yet'})") from None

    def metadata(self, step: Optional[int] = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]

    def restore(self, step: int, abstract_params, abstract_train_state=None, partial: bool = False,
                data: bool = True) -> dict:
        """Restores params (+ train_state and data if targets given) onto the targets' shardings.
        partial=True restores only the leaves the targets name (the checkpoint may hold more)."""
        if abstract_params is not None:
            check_shapes(self.param_shapes(step), abstract_params, f"{self.directory}/{step}")
        items = {"metadata": ocp.args.JsonRestore()}
        if abstract_params is not None:
            items["params"] = _restore_args(abstract_params, partial)
        if abstract_train_state is not None:
            items["train_state"] = _restore_args(abstract_train_state, partial)
            if data:
                items["data"] = ocp.args.JsonRestore()
        return dict(self.manager.restore(step, args=ocp.args.Composite(**items)).items())

    def param_shapes(self, step: int) -> dict:
        meta = self.manager.item_metadata(step)["params"]
        meta = getattr(meta, "tree", meta)
        return {path: tuple(leaf.shape) for path, leaf in _flatten(meta)}

    def wait(self) -> None:
        with self._write_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def _os_reason(e: Exception) -> str:
    text = str(e)
    m = re.search(r"os_error_code='(\d+)'", text)
    if m:
        return f"{os.strerror(int(m.group(1)))}, errno {m.group(1)}"
    if isinstance(e, OSError) and e.errno:
        return f"{os.strerror(e.errno)}, errno {e.errno}"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:160]


def _latest_complete(directory: str) -> Optional[int]:
    """Largest committed step dir: on a local disk orbax renames a step dir into place only once it
    is complete; on an object store (no atomic rename) it marks it with commit_success.txt."""
    try:
        steps = [int(d) for d in storage.listdir(directory) if d.isdigit()]
        if storage.is_remote(directory):
            steps = [s for s in steps if storage.exists(storage.join(directory, str(s), "commit_success.txt"))]
    except OSError:
        return None
    return max(steps) if steps else None


def _restore_args(target, partial: bool):
    return ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=partial)


def _flatten(tree) -> list:
    from jaxllm.core.sharding import path_str
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "shape"):
            out.append((path_str(path), leaf))
    return out


def check_shapes(saved: dict, abstract, where: str) -> None:
    """Names the first tensor whose shape differs (or that is missing) between checkpoint and model."""
    for path, leaf in _flatten(abstract):
        if path not in saved:
            raise CheckpointError(f"checkpoint {where} has no tensor {path!r}; it was written by a "
                                  f"different model architecture")
        if tuple(saved[path]) != tuple(leaf.shape):
            raise CheckpointError(f"checkpoint {where}: tensor {path!r} has shape {tuple(saved[path])} "
                                  f"but the model expects {tuple(leaf.shape)}; the model config differs "
                                  f"from the checkpoint's")


def open_for_read(path: str) -> tuple["Checkpointer", int]:
    """Opens another run's checkpoints (init_from, info, generate). Path: run dir, checkpoints dir,
    or a step dir (then that step)."""
    path = storage.join(path)
    if not storage.exists(path):
        raise CheckpointError(f"checkpoint path not found: {path}")
    step = None
    base = storage.path(path).name
    if base.isdigit() and storage.isdir(storage.join(path, "params")):
        step, path = int(base), str(storage.path(path).parent)
    ckpt = Checkpointer(checkpoint_dir(path), read_only=True)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no complete checkpoint under {path}")
    return ckpt, step


def lineage(path: str) -> list[tuple[str, Optional[str], Optional[int]]]:
    """[(checkpoint path, stage, step)] from `path` back through each metadata `parent`; a parent
    that is not a readable jaxllm checkpoint (moved, deleted, a Hugging Face dir) ends the chain
    with stage None."""
    src, step = open_for_read(path)
    parent, chain, seen = f"{src.directory}/{step}", [], set()
    src.close()
    while parent and parent not in seen:
        seen.add(parent)
        try:
            p_src, p_step = open_for_read(parent)
            meta = p_src.metadata(p_step)
            p_src.close()
        except Exception:  # noqa: BLE001 - anything unreadable ends the chain
            chain.append((parent, None, None))
            break
        chain.append((parent, meta.get("stage"), meta.get("step")))
        parent = meta.get("parent")
    return chain
