"""The dedup stage of `jaxllm data prepare` (jaxllm/data/prepare.py): MinHash signatures, the
per-unit signature files, and one dedup round -- a Beam pipeline over 1/K of the shuffle key space.

Every unit's kept documents (ordinal in the unit, 16-byte exact key, MinHash signature) are written
once by the scan pass to a *sidecar* file in a work directory (`sig-UUUUUUU.npy`). A round k of K
reads the sidecars and emits only the keys whose hash % K == k: exact keys -> (key, doc id) and
LSH band keys (band index + the band's raw signature rows) -> (key, doc id). Only ids travel
through the two shuffles (GroupByKey); a bucket with two or more ids is verified where it lands
by reading those ids' signatures back from the sidecars. A round's removed ids go to two small
files (`exact-k.npy`, `near-k.npy`); `removed_ids` merges the K rounds.

Exact and near dedup run side by side (not near dedup on the exact survivors, as a single join
would): the same result, because a document and its exact duplicates have the same words and so
the same signature -- if an exact-removed `a` is a near duplicate of a later `b`, so is `a`'s kept
copy (smaller id, same bands, same Jaccard). A document that is both is counted as exact.
"""

from __future__ import annotations

import hashlib
import io
import math
import zlib
from collections import OrderedDict
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from jaxllm.core import storage
from jaxllm.errors import DataError

NS = "jaxllm.prepare"  # Beam metrics namespace
ID_BITS = 32  # doc id = unit << 32 | ordinal in the unit
# the DirectRunner's memory per shuffle entry (an exact key or one LSH band key with its doc id,
# decoded, in the runner's grouping table): measured ~290 bytes on the 200 MB benchmark corpus
# (runner peak 0.87 GB at K = 1 over a 0.22 GB baseline, 133k docs x 17 entries)
ENTRY_BYTES = 288


def count(name: str, n: int = 1) -> None:
    if n:
        Metrics.counter(NS, name).inc(n)


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()


class MinHash:
    """MinHash signatures over word 5-gram shingles (a text shorter than 5 words is one shingle).
    Word hashes are crc32; a shingle's hash is a mixed polynomial of its 5 word hashes (numpy)."""

    _PRIME = (1 << 61) - 1
    _MULT = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5,
                      0xFF51AFD7ED558CCD], dtype=np.uint64)

    def __init__(self, num_perm: int = 64, bands: int = 16, seed: int = 0):
        if num_perm % bands:
            raise DataError(f"num_perm {num_perm} is not a multiple of bands {bands}")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, self._PRIME, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, self._PRIME, num_perm, dtype=np.uint64)
        self.bands, self.rows = bands, num_perm // bands

    def signature(self, text: str) -> np.ndarray:
        words = text.lower().split() or [""]
        n = max(len(words) - 4, 1)
        wh = np.zeros(n + 4, np.uint64)
        wh[:len(words)] = np.fromiter((zlib.crc32(w.encode()) + 1 for w in words), np.uint64, len(words))
        with np.errstate(over="ignore"):
            h = sum(wh[k:k + n] * self._MULT[k] for k in range(5))
            h ^= h >> np.uint64(29)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(32)
            h >>= np.uint64(4)
            sig = ((np.outer(self.a, h) + self.b[:, None]) % np.uint64(self._PRIME)).min(axis=1)
        return sig.astype(np.uint32)  # the low 32 bits: equality tests only, 256 bytes per doc


def jaccard_estimate(sig_a: bytes, sig_b: bytes) -> float:
    return float(np.mean(np.frombuffer(sig_a, np.uint32) == np.frombuffer(sig_b, np.uint32)))


# ---- sidecars ----------------------------------------------------------------------------------------
def sidecar_path(work: str, unit: int) -> str:
    return storage.join(work, f"sig-{unit:07d}.npy")


def write_sidecar(work: str, unit: int, ords: list, keys: list, sigs: list, num_perm: int) -> None:
    """One record per kept doc of the unit: ordinal (uint32), exact key (16 bytes), signature
    (num_perm uint32), as one .npy of a structured dtype (memory-mappable)."""
    rec = np.zeros(len(ords), [("ord", "<u4"), ("key", "u1", (16,)), ("sig", "<u4", (num_perm,))])
    rec["ord"] = ords
    rec["key"] = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16)
    if num_perm:
        rec["sig"] = np.asarray(sigs, np.uint32).reshape(len(ords), num_perm)
    buf = io.BytesIO()
    np.save(buf, rec)
    storage.write_atomic(sidecar_path(work, unit), buf.getvalue())


def read_sidecar(work: str, unit: int, mmap: bool = False) -> np.ndarray:
    """A unit's sidecar records (fields ord, key, sig); `mmap`: memory-mapped when local."""
    path = sidecar_path(work, unit)
    if storage.is_remote(path):
        return np.load(io.BytesIO(storage.read_bytes(path)))
    return np.load(path, mmap_mode="r" if mmap else None)


# ---- partitions ----------------------------------------------------------------------------------------
def is_local_runner(beam_args: list) -> bool:
    """No --runner in the Beam options, or a DirectRunner: shuffles held in memory."""
    name = ""
    for i, a in enumerate(beam_args):
        if a.startswith("--runner="):
            name = a.split("=", 1)[1]
        elif a == "--runner" and i + 1 < len(beam_args):
            name = beam_args[i + 1]
    return not name or "direct" in name.lower()


def choose_partitions(docs: int, bands: int, budget: int, forced: int, beam_args: list) -> int:
    """K: `forced` when > 0; 1 on a distributed runner (it spills its shuffles to disk); else as
    many as keep one round's shuffles (docs x (1 + bands) entries / K) within `budget` bytes."""
    if forced > 0:
        return forced
    if not is_local_runner(beam_args):
        return 1
    return max(1, math.ceil(docs * (1 + bands) * ENTRY_BYTES / max(budget, 1)))


def _part(h: np.ndarray, k: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return ((h.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)) % np.uint64(k)


def exact_partition(keys: np.ndarray, k: int) -> np.ndarray:
    return _part(keys[:, :8].copy().view(np.uint64)[:, 0], k)


def band_partition(rows: np.ndarray, k: int) -> np.ndarray:
    """rows (n, bands, r) uint32 -> the partition of each (doc, band) key, (n, bands)."""
    with np.errstate(over="ignore"):
        h = np.arange(rows.shape[1], dtype=np.uint64)[None, :] + np.uint64(1)
        for j in range(rows.shape[2]):
            h = h * np.uint64(0xC2B2AE3D27D4EB4F) + rows[:, :, j].astype(np.uint64)
        h ^= h >> np.uint64(31)
    return _part(h, k)


# ---- one round -------------------------------------------------------------------------------------
@beam.typehints.with_output_types(Any)  # tagged outputs: no inference
class RoundKeys(beam.DoFn):
    """unit index -> its sidecar's keys of partition k: (exact key, id) and tagged 'bands'
    (band index byte + band rows, id)."""

    def __init__(self, work: str, k: int, parts: int, bands: int):
        self.work, self.k, self.parts, self.bands = work, k, parts, bands

    def process(self, unit: int):
        rec = read_sidecar(self.work, unit)
        keys, sigs = np.ascontiguousarray(rec["key"]), np.ascontiguousarray(rec["sig"])
        ids = (unit << ID_BITS) + rec["ord"].astype(np.int64)
        sel = np.flatnonzero(exact_partition(keys, self.parts) == self.k)
        buf = keys[sel].tobytes()
        for j, doc in enumerate(ids[sel].tolist()):
            yield buf[16 * j:16 * (j + 1)], doc
        if sigs.shape[1] == 0 or not self.bands or not len(ids):
            return
        # every (doc, band) key as bytes: band index + the band's rows; those of partition k sent
        rows = sigs.reshape(len(ids), self.bands, -1)
        keyarr = np.empty((len(ids), self.bands, 1 + 4 * rows.shape[2]), np.uint8)
        keyarr[:, :, 0] = np.arange(self.bands, dtype=np.uint8)
        keyarr[:, :, 1:] = rows.view(np.uint8).reshape(len(ids), self.bands, -1)
        sel = np.flatnonzero(band_partition(rows, self.parts).ravel() == self.k)
        size = keyarr.shape[2]
        buf = keyarr.reshape(-1, size)[sel].tobytes()
        for j, doc in enumerate(np.repeat(ids, self.bands)[sel].tolist()):
            yield beam.pvalue.TaggedOutput("bands", (buf[size * j:size * (j + 1)], doc))


def later_copies(kv):
    """(exact key, ids) -> every id but the smallest (the first in corpus order is kept)."""
    yield from sorted(kv[1])[1:]


class Verify(beam.DoFn):
    """(band key, ids) -> each id b with an earlier id a in the bucket whose signature's estimated
    Jaccard with b's is >= threshold. Signatures are read from the sidecars: memory-mapped when
    local (the page cache holds them), else whole files, the last `cache` units kept."""

    def __init__(self, work: str, threshold: float):
        self.work, self.threshold = work, threshold

    def setup(self):
        self.cache: OrderedDict = OrderedDict()

    def signature(self, doc_id: int) -> np.ndarray:
        unit = doc_id >> ID_BITS
        if unit in self.cache:
            self.cache.move_to_end(unit)
        else:
            rec = read_sidecar(self.work, unit, mmap=True)
            self.cache[unit] = rec["ord"], rec["sig"]
            if len(self.cache) > (64 if storage.is_remote(self.work) else 4096):
                self.cache.popitem(last=False)
        ords, sigs = self.cache[unit]
        return np.asarray(sigs[np.searchsorted(ords, doc_id & ((1 << ID_BITS) - 1))])

    def process(self, kv):
        ids = sorted(set(kv[1]))
        if len(ids) < 2:
            return
        s = np.stack([self.signature(i) for i in ids])
        for j in range(1, len(ids)):
            if ((s[:j] == s[j]).mean(axis=1) >= self.threshold).any():
                yield ids[j]


class WriteIds(beam.DoFn):
    def __init__(self, path: str):
        self.path = path

    def process(self, ids):
        buf = io.BytesIO()
        np.save(buf, np.asarray(sorted(ids), np.int64))
        storage.write_atomic(self.path, buf.getvalue())


def build_round(units, work: str, k: int, parts: int, bands: int, threshold: float) -> None:
    """Round k of `parts` on `units` (a PCollection of unit indices whose sidecars are written):
    exact and near-duplicate candidates of partition k to `exact-k.npy` / `near-k.npy` in `work`."""
    keys = units | f"Keys{k}" >> beam.ParDo(RoundKeys(work, k, parts, bands if threshold > 0 else 0)) \
        .with_outputs("bands", main="exact")
    _ = (keys.exact | "ExactGroups" >> beam.GroupByKey() | "LaterCopies" >> beam.FlatMap(later_copies)
         | "ExactIds" >> beam.combiners.ToList() | "WriteExact" >> beam.ParDo(WriteIds(ids_path(work, "exact", k))))
    _ = (keys.bands | "Buckets" >> beam.GroupByKey() | "Verify" >> beam.ParDo(Verify(work, threshold))
         | "NearIds" >> beam.combiners.ToList() | "WriteNear" >> beam.ParDo(WriteIds(ids_path(work, "near", k))))


def build_later_round(p, units: list[int], work: str, k: int, parts: int, bands: int, threshold: float) -> None:
    """Round k on pipeline `p`, the sidecars written by an earlier pipeline."""
    build_round(p | "Units" >> beam.Create(units) | "Spread" >> beam.Reshuffle(), work, k, parts, bands, threshold)


def ids_path(work: str, kind: str, k: int) -> str:
    return storage.join(work, f"{kind}-{k}.npy")


def removed_ids(work: str, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """(exact-removed ids, near-removed ids not exact-removed), each sorted, over the K rounds."""
    def load(kind):
        arrs = [np.load(io.BytesIO(storage.read_bytes(ids_path(work, kind, k)))) for k in range(parts)]
        return np.unique(np.concatenate(arrs)) if arrs else np.zeros(0, np.int64)
    exact = load("exact")
    return exact, np.setdiff1d(load("near"), exact)
