"""Every file a run reads or writes goes through here, so `output_dir`, `init_from`, data sources
and tokenizers may be local paths or remote URLs (`gs://bucket/...`, `s3://...`): `etils.epath`
(what orbax and TFDS use) picks the backend — the local disk, or fsspec (gcsfs, s3fs) for a URL.

Small files (configs, reports, `stage_done.json`) are written whole: locally to a temporary name,
then renamed (atomic on a POSIX disk); on an object store as one upload, which is published only
when complete (atomic by itself; object stores have no rename). Checkpoints are orbax's business (its own commit).
"""

from __future__ import annotations

import os
import uuid
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def _no_listing_cache() -> None:
    """gcsfs/s3fs cache directory listings per process, but checkpoint steps are written by
    tensorstore (inside orbax) and by other processes, which that cache never sees: a cached
    listing would hide new steps. Listings are few (per checkpoint/resume), so always ask."""
    try:
        import fsspec.config
    except ImportError:
        return
    for protocol in ("gs", "gcs", "s3", "s3a"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_no_listing_cache()
REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def is_remote(path: PathLike) -> bool:
    """A URL with a scheme (gs://, s3://, memory://, ...) rather than a local path."""
    return "://" in os.fspath(path)


def path(p: PathLike, *parts: str) -> epath.Path:
    """`p` joined with `parts` as an epath.Path; local paths are made absolute (a run's artifacts
    must not depend on the working directory of a later command)."""
    if not is_remote(p):
        p = os.path.abspath(os.fspath(p))
    out = epath.Path(p)
    for part in parts:
        out = out / part
    return out


def join(p: PathLike, *parts: str) -> str:
    """Like os.path.join, for local paths and URLs alike; returns a string."""
    return os.fspath(path(p, *parts))


def exists(p: PathLike) -> bool:
    return path(p).exists()


def isdir(p: PathLike) -> bool:
    return path(p).is_dir()


def makedirs(p: PathLike) -> epath.Path:
    out = path(p)
    out.mkdir(parents=True, exist_ok=True)
    return out


def read_text(p: PathLike) -> str:
    return path(p).read_text()


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def write_atomic(p: PathLike, data: Union[str, bytes]) -> None:
    """Writes a whole small file: to `<name>.tmp-<random>` beside it, then renamed over `p`, so a
    reader sees the old content or the new, never a torn file."""
    dst = path(p)
    if is_remote(dst):  # an object upload is published whole when it completes: atomic already
        dst.write_bytes(data.encode() if isinstance(data, str) else data)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    tmp.replace(dst)


def listdir(p: PathLike) -> list[str]:
    """Names (not paths) of the entries of directory `p`."""
    return sorted(child.name for child in path(p).iterdir())


def rmtree(p: PathLike) -> None:
    target = path(p)
    if target.exists():
        target.rmtree()


def local_copy(p: PathLike, suffix: str = "") -> str:
    """A local filesystem path holding `p`'s bytes, for libraries that only take local paths
    (SentencePiece's model loader): `p` itself when local, else a cached download."""
    if not is_remote(p):
        return os.fspath(p)
    import hashlib
    import tempfile
    key = hashlib.sha1(os.fspath(p).encode()).hexdigest()[:16]
    out = os.path.join(tempfile.gettempdir(), "jaxllm-remote-cache", key + suffix)
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(read_bytes(p))
        os.replace(tmp, out)
    return out


def expand(pattern: PathLike, exts: tuple = ()) -> list[str]:
    """Files under a directory (recursively, filtered by extension) or matching a glob pattern,
    sorted; local or remote (one listing call on an object store, not a walk)."""
    pattern = os.fspath(pattern)
    if is_remote(pattern):
        import fsspec
        fs, root = fsspec.core.url_to_fs(pattern)
        scheme = pattern.split("://", 1)[0]
        if any(c in root for c in "*?["):
            found = fs.glob(root)
        elif fs.isdir(root):
            found = [f for f in fs.find(root) if not exts or f.endswith(exts)]
        else:
            found = [root] if fs.exists(root) else []
        return sorted(f"{scheme}://{f}" for f in found)
    if os.path.isdir(pattern):
        return sorted(os.path.join(dp, f) for dp, _, fs in os.walk(pattern) for f in fs
                      if not exts or f.endswith(exts))
    import glob
    return sorted(glob.glob(pattern))


def move(src: PathLike, dst: PathLike) -> None:
    """Moves a file or directory tree to `dst` (whose parent is created): a rename on a local disk,
    copy-then-delete on an object store."""
    if is_remote(src) or is_remote(dst):
        copy_tree(src, dst)  # object stores have no directories to rename
        rmtree(src)
        return
    os.makedirs(os.path.dirname(os.fspath(path(dst))), exist_ok=True)
    os.rename(os.fspath(path(src)), os.fspath(path(dst)))


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Streams one file from `src` to `dst` (either may be remote)."""
    import shutil
    target = path(dst)
    if not is_remote(target):
        os.makedirs(os.fspath(target.parent), exist_ok=True)
    with path(src).open("rb") as fin, target.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)


def copy_tree(src: PathLike, dst: PathLike) -> None:
    """Copies every file under `src` to the same relative place under `dst` (either may be remote)."""
    root = join(src)
    for f in expand(root):
        copy_file(f, join(dst, os.path.relpath(f, root) if not is_remote(root) else f[len(root) + 1:]))


def local_dir(p: PathLike) -> str:
    """A local directory holding the tree at `p`: `p` itself when local, else a fresh download
    into a temp dir (for readers that need local files: safetensors' memory map)."""
    if not is_remote(p):
        return os.fspath(p)
    import tempfile
    out = tempfile.mkdtemp(prefix="jaxllm-download-")
    copy_tree(p, out)
    return out
