"""`jaxllm data prepare`: clean -> dedup -> tokenize -> ArrayRecord shards, with a drop report.

Cleaning: Unicode NFC normalization, control characters removed (newline and tab kept), length
filters, a repetition filter (fraction of duplicated lines), exact dedup on normalized text and
near-dup removal with MinHash + LSH banding (Jaccard over word 5-gram shingles). Output records
are int32 token arrays (the tokenizer's BOS if it has one, ..., EOS) that the `arrayrecord` source
reads back for random access. The output directory is written under a temporary name and renamed
when complete; an existing non-empty output directory is never overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import unicodedata

import numpy as np

from jaxllm.config import DataConfig
from jaxllm.core import storage
from jaxllm.data.sources import Report, read_source
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.errors import DataError

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclasses.dataclass
class PrepareOptions:
    shards: int = 4
    min_chars: int = 20
    max_chars: int = 1_000_000
    max_repeat_fraction: float = 0.3  # drop docs whose duplicated lines exceed this fraction
    near_dup_threshold: float = 0.8  # MinHash Jaccard estimate; 0 disables near-dup removal
    num_perm: int = 64
    bands: int = 16


def clean_text(text: str) -> str:
    return _CONTROL.sub("", unicodedata.normalize("NFC", text))


def repeat_fraction(text: str) -> float:
    lines = [l.strip() for l in text.split("\n") if l.strip()]
    if len(lines) < 2:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


class MinHashLSH:
    """MinHash signatures over word 5-gram shingles, bucketed by LSH bands."""

    _PRIME = (1 << 61) - 1

    def __init__(self, num_perm: int = 64, bands: int = 16, threshold: float = 0.8, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, self._PRIME, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, self._PRIME, num_perm, dtype=np.uint64)
        self.bands, self.rows = bands, num_perm // bands
        self.threshold = threshold
        self.buckets: dict = {}
        self.signatures: list = []

    def signature(self, text: str) -> np.ndarray:
        words = text.lower().split()
        shingles = {" ".join(words[i:i + 5]) for i in range(max(len(words) - 4, 1))}
        h = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big") >> 4
                      for s in shingles], dtype=np.uint64)
        # (a*h + b) mod p, vectorized: [num_perm, n_shingles] -> min over shingles
        return ((np.outer(self.a, h) + self.b[:, None]) % np.uint64(self._PRIME)).min(axis=1)

    def is_duplicate_then_add(self, text: str) -> bool:
        sig = self.signature(text)
        candidates = set()
        keys = [(b, sig[b * self.rows:(b + 1) * self.rows].tobytes()) for b in range(self.bands)]
        for key in keys:
            candidates.update(self.buckets.get(key, ()))
        for c in candidates:
            if np.mean(self.signatures[c] == sig) >= self.threshold:
                return True
        idx = len(self.signatures)
        self.signatures.append(sig)
        for key in keys:
            self.buckets.setdefault(key, []).append(idx)
        return False


def clean_and_dedup(records: list[dict], opts: PrepareOptions, report: Report) -> list[str]:
    seen, kept = set(), []
    lsh = MinHashLSH(opts.num_perm, opts.bands, opts.near_dup_threshold) if opts.near_dup_threshold > 0 else None
    for i, r in enumerate(records):
        text = clean_text(r["text"])
        where = f"record {i}"
        if len(text.strip()) < opts.min_chars:
            report.drop(f"shorter than {opts.min_chars} chars", where)
        elif len(text) > opts.max_chars:
            report.drop(f"longer than {opts.max_chars} chars", where)
        elif repeat_fraction(text) > opts.max_repeat_fraction:
            report.drop("repetitive (duplicated lines)", where)
        elif (digest := hashlib.sha256(" ".join(text.split()).encode()).hexdigest()) in seen:
            report.drop("exact duplicate", where)
        elif lsh is not None and lsh.is_duplicate_then_add(text):
            seen.add(digest)
            report.drop("near duplicate", where)
        else:
            seen.add(digest)
            kept.append(text)
    return kept


def prepare(cfg: DataConfig, out_dir: str, opts: PrepareOptions) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    out_dir = storage.join(out_dir)
    if storage.exists(out_dir) and storage.listdir(out_dir):
        raise DataError(f"output directory {out_dir} already exists and is not empty; choose a new --out")
    tok = Tokenizer(cfg.tokenizer)
    report, records = Report(), []
    for src in cfg.sources:
        data = read_source(src)
        if data.kind != "records":
            raise DataError(f"source {src.path} is already prepared (token shards)")
        report.merge(data.report)
        records += data.records
    t0 = time.time()
    texts = clean_and_dedup(records, opts, report)
    report.kept = len(texts)
    if not texts:
        raise DataError(f"nothing left after cleaning ({report.summary()})")
    # shards are written on the local disk (array_record writes local files), then renamed into
    # place, or uploaded with prepared.json last (readers take a directory without it as unfinished)
    remote = storage.is_remote(out_dir)
    tmp = tempfile.mkdtemp(prefix="jaxllm-prepare-") if remote else out_dir + f".tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    try:
        n_tokens = 0
        writers = [ArrayRecordWriter(os.path.join(tmp, f"shard-{i:05d}-of-{opts.shards:05d}.array_record"),
                                     "group_size:1") for i in range(opts.shards)]
        for i, ids in enumerate(tok.encode_batch(texts, bos=True, eos=True)):
            arr = np.asarray(ids, np.int32)
            n_tokens += len(arr)
            writers[i % opts.shards].write(arr.tobytes())
        for w in writers:
            w.close()
        summary = {"documents": len(texts), "tokens": n_tokens, "shards": opts.shards,
                   "tokenizer": tok.describe(), "report": report.as_dict(),
                   "options": dataclasses.asdict(opts), "seconds": round(time.time() - t0, 3)}
        if remote:
            for name in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, name), "rb") as src, storage.path(out_dir, name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
            storage.write_atomic(storage.join(out_dir, "prepared.json"), json.dumps(summary, indent=2))
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with open(os.path.join(tmp, "prepared.json"), "w") as f:
                json.dump(summary, f, indent=2)
            if os.path.exists(out_dir):
                os.rmdir(out_dir)  # empty (checked above)
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
