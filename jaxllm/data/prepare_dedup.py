"""The dedup stage of `jaxllm data prepare` (jaxllm/data/prepare.py): MinHash signatures, the
per-unit signature files, and one dedup round -- Beam transforms over 1/K of the shuffle key space.

Every unit's kept documents (ordinal in the unit, 16-byte exact key, MinHash signature) are written
once by the scan pass to a *sidecar* file in a work directory (`sig-UUUUUUU.npy`). A round k of K
reads the sidecars and takes only the keys whose hash % K == k: exact keys and LSH band keys (band
index + the band's raw signature rows), each with its doc id. The keys are batched: another hash
puts each in one of G shuffle groups, and a unit sends one element per group, (group, packed
records), through one GroupByKey, so the shuffle moves units x G elements rather than one per key.
A group's worker sorts its records (numpy) and finds the exact keys and band buckets held by two
or more ids; a bucket is verified where it lands by reading its ids' signatures back from the
sidecars. A round's removed ids go to two small files (`exact-k.npy`, `near-k.npy`); `removed_ids`
merges the K rounds. Every key of a round lands in one group, so the result does not depend on K
or G.

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
# 24 / 28 bytes packed in a group's batch; the runner holds the batches as received, again as
# partitioned for the workers, and in gRPC buffers while sending, for a fraction of a second):
# measured ~200 bytes on the 200 MB benchmark corpus (runner peak 0.67 GB at K = 1 over a 0.22 GB
# baseline, 2 workers, 129k docs x 17 entries; 0.61-0.65 GB at K = 2)
ENTRY_BYTES = 200
GROUPS = 64  # shuffle groups per round at least (the keys of a round are batched per unit and group)
GROUP_ENTRIES = 1 << 20  # ... and more groups when a round has more than GROUPS x this many keys


def count(name: str, n: int = 1) -> None:
    if n:
        Metrics.counter(NS, name).inc(n)


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()


def _crc32_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> np.uint32(1)) ^ np.uint32(0xEDB88320), t >> np.uint32(1)).astype(np.uint32)
    return t


_CRC = _crc32_table()
_LONG_WORD = 48  # words longer than this (UTF-8 bytes) are hashed one by one (zlib), the rest in numpy


def word_hashes(data: bytes) -> np.ndarray:
    """zlib.crc32(w) + 1 (uint64) for every word w of `data`, words separated by single b" " (so
    b"a  b" is "a", "", "b"): a table-driven CRC-32 over all words at once, one step per byte
    position, the words sorted by length so each step works on the words still that long."""
    b = np.frombuffer(data, np.uint8)
    sp = np.flatnonzero(b == 32)
    starts = np.concatenate([[0], sp + 1])
    lens = np.concatenate([sp, [len(b)]]) - starts
    crc = np.full(len(starts), 0xFFFFFFFF, np.uint32)
    long_ = np.flatnonzero(lens > _LONG_WORD)
    for i in long_.tolist():
        crc[i] = zlib.crc32(data[starts[i]:starts[i] + lens[i]]) ^ 0xFFFFFFFF
    short = np.flatnonzero(lens <= _LONG_WORD) if len(long_) else np.arange(len(lens))
    order = short[np.argsort(lens[short].astype(np.uint8), kind="stable")]  # radix sort, by length
    slen, pos, c = lens[order], starts[order], crc[order]
    first = np.searchsorted(slen, np.arange(_LONG_WORD + 1), side="right")  # words longer than j: [first[j]:]
    for j in range(int(slen[-1]) if len(slen) else 0):
        lo = first[j]
        cj = c[lo:]
        c[lo:] = _CRC[(cj ^ b[pos[lo:] + j]) & np.uint32(0xFF)] ^ (cj >> np.uint32(8))
    crc[order] = c
    return (crc ^ np.uint32(0xFFFFFFFF)).astype(np.uint64) + np.uint64(1)


class MinHash:
    """MinHash signatures over word 5-gram shingles (a text shorter than 5 words is one shingle).
    Word hashes are crc32; a shingle's hash is a mixed polynomial of its 5 word hashes; the
    permutations are (a h + b) mod (2^61 - 1). All in numpy, over a batch of texts at once."""

    _PRIME = (1 << 61) - 1
    _MULT = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5,
                      0xFF51AFD7ED558CCD], dtype=np.uint64)
    CHUNK = 1 << 17  # shingles per block of the permutation loop (a longer document: its own block)

    def __init__(self, num_perm: int = 64, bands: int = 16, seed: int = 0):
        if num_perm % bands:
            raise DataError(f"num_perm {num_perm} is not a multiple of bands {bands}")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, self._PRIME, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, self._PRIME, num_perm, dtype=np.uint64)
        self.bands, self.rows = bands, num_perm // bands

    def signature(self, text: str) -> np.ndarray:
        return self.signatures([text])[0]

    def shingle_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(hashes of every text's shingles, concatenated (uint64, < 2^60); shingles per text)."""
        lens, joined = [], []
        for t in texts:
            words = t.lower().split()
            lens.append(len(words) or 1)  # no words: the one (empty) word ""
            joined.append(" ".join(words))
        lens = np.asarray(lens, np.int64)
        wh = word_hashes(" ".join(joined).encode())
        n = np.maximum(lens - 4, 1)  # shingles per text
        seg = n + 4  # a text's words, then zeros up to 5 words
        seg_start = np.cumsum(seg) - seg
        flat = np.zeros(int(seg.sum()), np.uint64)
        flat[np.arange(len(wh)) + np.repeat(seg_start - (np.cumsum(lens) - lens), lens)] = wh
        m = len(flat) - 4
        with np.errstate(over="ignore"):
            h = flat[:m] * self._MULT[0]
            for k in range(1, 5):
                h += flat[k:k + m] * self._MULT[k]
            h = h[np.arange(int(n.sum())) + np.repeat(seg_start - (np.cumsum(n) - n), n)]
            h ^= h >> np.uint64(29)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(32)
            h >>= np.uint64(4)
        return h, n

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32, the signature of each text (as `signature`)."""
        if not texts:
            return np.empty((0, len(self.a)), np.uint32)
        return self.minhash(*self.shingle_hashes(texts))

    def minhash(self, h: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Shingle hashes `h` (< 2^60) of texts with `n` shingles each -> (len(n), num_perm) uint32:
        per permutation the minimum over a text's shingles of (a h + b) mod (2^61 - 1) (uint64
        arithmetic, wrapping), its low 32 bits (equality tests only, 256 bytes per doc). The mod is
        the Mersenne fold (x & P) + (x >> 61), exact unless a value reaches P: that permutation's
        block is then redone with %."""
        out = np.empty((len(n), len(self.a)), np.uint32)
        offs = np.concatenate([[0], np.cumsum(n)])
        p, s61 = np.uint64(self._PRIME), np.uint64(61)
        d = 0
        while d < len(n):
            e = max(int(np.searchsorted(offs, offs[d] + self.CHUNK, side="right")) - 1, d + 1)
            hh = h[offs[d]:offs[e]]
            at = offs[d:e] - offs[d]
            x, r = np.empty_like(hh), np.empty_like(hh)
            with np.errstate(over="ignore"):
                for j, (a, b) in enumerate(zip(self.a, self.b)):
                    np.multiply(hh, a, out=x)
                    x += b
                    np.bitwise_and(x, p, out=r)
                    x >>= s61
                    r += x
                    if r.max() >= p:  # a value in [P, P + 7]: needs the subtraction, rare
                        r = (hh * a + b) % p
                    out[d:e, j] = np.minimum.reduceat(r, at)  # low 32 bits
            d = e
        return out


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


def choose_groups(docs: int, bands: int, parts: int) -> int:
    """Shuffle groups per round: at least GROUPS, and at most ~GROUP_ENTRIES keys in a group."""
    return max(GROUPS, math.ceil(docs * (1 + bands) / max(parts, 1) / GROUP_ENTRIES))


def _mix(h: np.ndarray, mult: int, shift: int, k: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return ((h.astype(np.uint64) * np.uint64(mult)) >> np.uint64(shift)) % np.uint64(k)


def _part(h: np.ndarray, k: int) -> np.ndarray:
    """The round of a key hash."""
    return _mix(h, 0x9E3779B97F4A7C15, 33, k)


def _group(h: np.ndarray, g: int) -> np.ndarray:
    """The shuffle group of a key hash within its round (another multiplier: independent of _part)."""
    return _mix(h, 0xD6E8FEB86659FD93, 29, g)


def exact_hash(keys: np.ndarray) -> np.ndarray:
    return keys[:, :8].copy().view(np.uint64)[:, 0]


def exact_partition(keys: np.ndarray, k: int) -> np.ndarray:
    return _part(exact_hash(keys), k)


def band_hash(rows: np.ndarray) -> np.ndarray:
    """rows (n, bands, r) uint32 -> a hash of each (doc, band) key, (n, bands) uint64."""
    with np.errstate(over="ignore"):
        h = np.arange(rows.shape[1], dtype=np.uint64)[None, :] + np.uint64(1)
        for j in range(rows.shape[2]):
            h = h * np.uint64(0xC2B2AE3D27D4EB4F) + rows[:, :, j].astype(np.uint64)
        h ^= h >> np.uint64(31)
    return h


def band_partition(rows: np.ndarray, k: int) -> np.ndarray:
    """rows (n, bands, r) uint32 -> the partition of each (doc, band) key, (n, bands)."""
    return _part(band_hash(rows), k)


EXACT = np.dtype([("key", "<u8", (2,)), ("id", "<i8")])  # an exact key (16 bytes) and its doc id


def band_dtype(rows: int) -> np.dtype:
    """A band key (band index, the band's `rows` signature values) and its doc id, packed."""
    return np.dtype([("band", "<u4"), ("rows", "<u4", (rows,)), ("id", "<i8")])


# ---- one round -------------------------------------------------------------------------------------
class RoundKeys(beam.DoFn):
    """unit index -> its sidecar's keys of round k of `parts`, batched: one element per shuffle
    group g (of `groups`): (g, (exact records, band records)), the records as bytes (EXACT,
    band_dtype). `parts` and `groups` may come from a side input (known only after the scan)."""

    def __init__(self, work: str, k: int, bands: int):
        self.work, self.k, self.bands = work, k, bands

    def process(self, unit: int, plan):
        parts, groups = plan
        rec = read_sidecar(self.work, unit)
        if not len(rec):
            return
        keys, sigs = np.ascontiguousarray(rec["key"]), np.ascontiguousarray(rec["sig"])
        ids = (unit << ID_BITS) + rec["ord"].astype(np.int64)
        h = exact_hash(keys)
        sel = np.flatnonzero(_part(h, parts) == self.k)
        ex = np.zeros(len(sel), EXACT)
        ex["key"] = keys[sel].view(np.uint64).reshape(-1, 2)
        ex["id"] = ids[sel]
        ex_group = _group(h[sel], groups).astype(np.int64)
        if sigs.shape[1] and self.bands:
            rows = sigs.reshape(len(ids), self.bands, -1)
            bh = band_hash(rows).ravel()
            sel = np.flatnonzero(_part(bh, parts) == self.k)
            bd = np.zeros(len(sel), band_dtype(rows.shape[2]))
            bd["band"] = sel % self.bands
            bd["rows"] = rows.reshape(-1, rows.shape[2])[sel]
            bd["id"] = ids[sel // self.bands]
            bd_group = _group(bh[sel], groups).astype(np.int64)
        else:
            bd, bd_group = np.zeros(0, band_dtype(1)), np.zeros(0, np.int64)
        ex, bd = ex[np.argsort(ex_group, kind="stable")], bd[np.argsort(bd_group, kind="stable")]
        ex_at = np.searchsorted(np.sort(ex_group), np.arange(groups + 1))
        bd_at = np.searchsorted(np.sort(bd_group), np.arange(groups + 1))
        for g in np.flatnonzero((np.diff(ex_at) > 0) | (np.diff(bd_at) > 0)).tolist():
            yield g, (ex[ex_at[g]:ex_at[g + 1]].tobytes(), bd[bd_at[g]:bd_at[g + 1]].tobytes())


def _runs(cols: list[np.ndarray]) -> np.ndarray:
    """Start of every run of equal rows in sorted columns (plus the end)."""
    n = len(cols[0])
    new = np.ones(n, bool)
    if n > 1:
        same = np.ones(n - 1, bool)
        for c in cols:
            same &= c[1:] == c[:-1]
        new[1:] = ~same
    return np.append(np.flatnonzero(new), n)


@beam.typehints.with_output_types(Any)  # tagged outputs: no inference
class DedupGroup(beam.DoFn):
    """(g, [(exact records, band records) per unit]) -> tagged 'exact': the ids of every exact key
    but its smallest (the first in corpus order is kept); tagged 'near': each id b of a band bucket
    (the ids of one band key) with an earlier id a in the bucket whose signature's estimated
    Jaccard with b's is >= threshold. Both as int64 arrays. Signatures are read from the sidecars:
    memory-mapped when local (the page cache holds them), else whole files, the last `cache`
    units kept."""

    def __init__(self, work: str, threshold: float, rows: int):
        self.work, self.threshold, self.rows = work, threshold, rows

    def setup(self):
        self.cache: OrderedDict = OrderedDict()

    def sidecar(self, unit: int):
        if unit in self.cache:
            self.cache.move_to_end(unit)
        else:
            rec = read_sidecar(self.work, unit, mmap=True)
            self.cache[unit] = rec["ord"], rec["sig"]
            if len(self.cache) > (64 if storage.is_remote(self.work) else 4096):
                self.cache.popitem(last=False)
        return self.cache[unit]

    def signatures(self, ids: np.ndarray) -> np.ndarray:
        """Signatures of `ids` (sorted, unique), (len(ids), num_perm)."""
        units = ids >> ID_BITS
        out = None
        at = _runs([units])
        for s, e in zip(at[:-1].tolist(), at[1:].tolist()):
            ords, sigs = self.sidecar(int(units[s]))
            rows = np.asarray(sigs[np.searchsorted(ords, ids[s:e] & ((1 << ID_BITS) - 1))])
            if out is None:
                out = np.empty((len(ids), rows.shape[1]), rows.dtype)
            out[s:e] = rows
        return out

    def process(self, kv):
        _, parts = kv
        parts = list(parts)
        ex = np.frombuffer(b"".join(p[0] for p in parts), EXACT)
        if len(ex) > 1:
            ex = ex[np.lexsort((ex["id"], ex["key"][:, 1], ex["key"][:, 0]))]
            at = _runs([ex["key"][:, 0], ex["key"][:, 1]])
            later = np.ones(len(ex), bool)
            later[at[:-1]] = False
            if later.any():
                yield beam.pvalue.TaggedOutput("exact", ex["id"][later])
        bd = np.frombuffer(b"".join(p[1] for p in parts), band_dtype(self.rows))
        if len(bd) < 2 or self.threshold <= 0:
            return
        cols = [bd["band"]] + [bd["rows"][:, j] for j in range(self.rows)]
        bd = bd[np.lexsort([bd["id"]] + cols[::-1])]
        cols = [bd["band"]] + [bd["rows"][:, j] for j in range(self.rows)]
        at = _runs(cols + [bd["id"]])  # the same (key, id) twice counts once, as a set
        ids, key_at = bd["id"][at[:-1]], _runs([c[at[:-1]] for c in cols])
        size = np.diff(key_at)
        if not (size > 1).any():
            return
        in_bucket = np.repeat(size > 1, size)
        cand = np.unique(ids[in_bucket])
        sig = self.signatures(cand)
        pos = np.full(len(ids), -1, np.int64)
        pos[in_bucket] = np.searchsorted(cand, ids[in_bucket])
        removed = []
        pairs = key_at[:-1][size == 2]  # buckets of two, all at once
        if len(pairs):
            a, b = sig[pos[pairs]], sig[pos[pairs + 1]]
            removed.append(ids[pairs + 1][(a == b).mean(axis=1) >= self.threshold])
        for s, e in zip(key_at[:-1][size > 2].tolist(), key_at[1:][size > 2].tolist()):
            s_ = sig[pos[s:e]]
            for j in range(1, e - s):
                if ((s_[:j] == s_[j]).mean(axis=1) >= self.threshold).any():
                    removed.append(ids[s + j:s + j + 1])
        removed = np.concatenate(removed) if removed else np.zeros(0, np.int64)
        if len(removed):
            yield beam.pvalue.TaggedOutput("near", removed)


class WriteIds(beam.DoFn):
    """[int64 arrays] -> their ids, sorted and unique, to `path` (.npy); yields them."""

    def __init__(self, path: str):
        self.path = path

    def process(self, arrays):
        ids = np.unique(np.concatenate([np.zeros(0, np.int64), *arrays]).astype(np.int64))
        buf = io.BytesIO()
        np.save(buf, ids)
        storage.write_atomic(self.path, buf.getvalue())
        yield ids


def build_round(units, work: str, k: int, plan, num_perm: int, bands: int, threshold: float):
    """Round k on `units` (a PCollection of unit indices whose sidecars are written); `plan` =
    (K, groups), or a side input giving it: exact and near-duplicate candidates of partition k to
    `exact-k.npy` / `near-k.npy` in `work`. Returns the two PCollections of one array each."""
    bands = bands if threshold > 0 else 0
    out = (units | f"Keys{k}" >> beam.ParDo(RoundKeys(work, k, bands), plan)
           | f"Groups{k}" >> beam.GroupByKey()
           | f"Dedup{k}" >> beam.ParDo(DedupGroup(work, threshold, num_perm // bands if bands else 1))
           .with_outputs("exact", "near"))
    exact = (out.exact | f"ExactIds{k}" >> beam.combiners.ToList()
             | f"WriteExact{k}" >> beam.ParDo(WriteIds(ids_path(work, "exact", k))))
    near = (out.near | f"NearIds{k}" >> beam.combiners.ToList()
            | f"WriteNear{k}" >> beam.ParDo(WriteIds(ids_path(work, "near", k))))
    return exact, near


def build_later_round(p, units: list[int], work: str, k: int, plan: tuple, num_perm: int, bands: int,
                      threshold: float) -> None:
    """Round k on pipeline `p`, the sidecars written by an earlier pipeline."""
    build_round(p | "Units" >> beam.Create(units) | "Spread" >> beam.Reshuffle(), work, k, plan, num_perm, bands,
                threshold)


def ids_path(work: str, kind: str, k: int) -> str:
    return storage.join(work, f"{kind}-{k}.npy")


def removed_ids(work: str, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """(exact-removed ids, near-removed ids not exact-removed), each sorted, over the K rounds."""
    def load(kind):
        arrs = [np.load(io.BytesIO(storage.read_bytes(ids_path(work, kind, k)))) for k in range(parts)]
        return np.unique(np.concatenate(arrs)) if arrs else np.zeros(0, np.int64)
    exact = load("exact")
    return exact, np.setdiff1d(load("near"), exact)
