"""`jaxllm data prepare`: read -> clean -> exact dedup -> near dedup -> tokenize -> ArrayRecord
shards, as an Apache Beam pipeline, with a drop report.

Stages (every one a Beam transform; nothing collects the corpus in the driver):

1. **Read** -- the sources are cut into *units* (a byte range of about `CHUNK_BYTES` of a JSONL or
   line-per-document text file, one text file, one Parquet row group, an index range of a TFDS
   split or of the embedded corpus). The unit list (O(files + bytes / CHUNK_BYTES)) is the only
   thing made in the driver; units are reshuffled over the workers, which read them through
   `jaxllm.core.storage` (local disk, gs://, s3://). A document's id is (unit index, ordinal in
   the unit) packed in an int: ordering by id is corpus order.
2. **Clean** -- Unicode NFC, control characters removed (newline and tab kept), length filters, a
   repetition filter (fraction of duplicated lines). Malformed records are counted per reason as
   the training readers count them (`sources.parse_json` / `parse_text`).
3. **Exact dedup** -- key: a hash of the whitespace-normalised text; a combiner keeps the smallest
   doc id per key (the first in corpus order) and lists the others as removed.
4. **Near dedup** -- a MinHash signature per document (word 5-gram shingles, `num_perm` hashes);
   each of `bands` LSH bands is a bucket key -> GroupByKey -> the pairs in each bucket are
   candidates; each candidate pair (a < b) is verified against the two full signatures (two
   CoGroupByKey joins on the doc id) and b is removed when the estimated Jaccard >= threshold. So
   a document is kept iff no document before it is a near duplicate of it: one per cluster of
   mutual near duplicates (a chain a~b~c with a!~c keeps a only).
5. **Tokenize + write** -- the removed ids (exact and near) are joined to their units by unit key
   (CoGroupByKey; only ids travel, never text); units go round-robin to `shards` shards; each shard
   is written by one worker, which re-reads its units in order, re-applies the (deterministic)
   cleaning, skips removed ids, tokenizes (tokenizer loaded once per worker in `DoFn.setup`: BOS
   if the tokenizer has one, ..., EOS) and writes the records. The output is therefore the same
   for any number of workers.

Output format (what the `arrayrecord` source reads): `shard-IIIII-of-NNNNN.array_record` files
(ArrayRecord, group_size:1), one record per document = its int32 token ids (`np.frombuffer(raw,
np.int32)`), and `prepared.json` = the summary (documents, tokens, shards, tokenizer, report,
options, seconds). With `pack_windows=N` (> 0) every record is instead a window of exactly N+1
tokens cut from the concatenation of the documents of a shard (in order, stride N+1, no overlap;
the last partial window of each shard is dropped and counted as `packed_dropped_tokens`), and
`prepared.json` has `"packed_windows": N` and `"records"`: ready-made training rows (inputs =
w[:-1], targets = w[1:]) with document boundaries not marked beyond the BOS/EOS tokens.

Drop counts are Beam metrics (counter per reason, plus `read`, `kept`, `tokens`) read back from
the PipelineResult; the first location of each reason (`path:line` in the first unit of a file,
`path:byte N` after, `path:group G row R` for Parquet) is a tiny side output combined to the
minimum doc id. The output directory is written under a temporary name and renamed when complete
(local), or written with `prepared.json` last (gs://: readers treat a directory without it as
unfinished); an existing non-empty output directory is never overwritten.

Runner: locally Beam's DirectRunner in multi-process mode (`workers` processes); any Beam pipeline
options (`beam_args`, e.g. `--runner=DataflowRunner --project=... --region=...
--temp_location=gs://...`) select another runner. Limits: the DirectRunner holds each shuffle
(GroupByKey) in the driver's memory -- here only hashes, ids, LSH band keys and 256-byte
signatures, never text or tokens; a distributed runner spills them.
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
import uuid
import zlib
from typing import Any, Iterator, Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from jaxllm.config import DataConfig
from jaxllm.core import storage
from jaxllm.data.sources import Report, expand_paths, parse_json, parse_text, parquet_row_groups, read_line_range
from jaxllm.errors import DataError

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
CHUNK_BYTES = 8 << 20  # a line-per-record file is read in units of about this many bytes
INDEX_CHUNK = 10_000  # records per unit for indexed sources (TFDS, the embedded corpus)
NS = "jaxllm.prepare"  # Beam metrics namespace
_ID_BITS = 32  # doc id = unit << 32 | ordinal in the unit


@dataclasses.dataclass
class PrepareOptions:
    shards: int = 4
    min_chars: int = 20
    max_chars: int = 1_000_000
    max_repeat_fraction: float = 0.3  # drop docs whose duplicated lines exceed this fraction
    near_dup_threshold: float = 0.8  # MinHash Jaccard estimate; 0 disables near-dup removal
    num_perm: int = 64
    bands: int = 16
    workers: int = 2  # local DirectRunner worker processes (direct_num_workers)
    pack_windows: int = 0  # > 0: records are windows of pack_windows + 1 tokens (see module doc)
    beam_args: list = dataclasses.field(default_factory=list)  # extra Beam pipeline options


# ---- document-level functions (used inside the Beam transforms) ----------------------------------
def clean_text(text: str) -> str:
    return _CONTROL.sub("", unicodedata.normalize("NFC", text))


def repeat_fraction(text: str) -> float:
    lines = [l.strip() for l in text.split("\n") if l.strip()]
    if len(lines) < 2:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def filter_reason(text: str, opts: PrepareOptions) -> Optional[str]:
    """Why a cleaned document is dropped by the length/repetition filters, or None to keep it."""
    if len(text.strip()) < opts.min_chars:
        return f"shorter than {opts.min_chars} chars"
    if len(text) > opts.max_chars:
        return f"longer than {opts.max_chars} chars"
    if repeat_fraction(text) > opts.max_repeat_fraction:
        return "repetitive (duplicated lines)"
    return None


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

    def band_keys(self, sig: np.ndarray) -> list[bytes]:
        r = self.rows
        return [bytes([b]) + hashlib.blake2b(sig[b * r:(b + 1) * r].tobytes(), digest_size=8).digest()
                for b in range(self.bands)]


def jaccard_estimate(sig_a: bytes, sig_b: bytes) -> float:
    return float(np.mean(np.frombuffer(sig_a, np.uint32) == np.frombuffer(sig_b, np.uint32)))


# ---- units: the sources cut into small independently readable pieces ------------------------------
def make_units(cfg: DataConfig) -> list[tuple]:
    """(unit index, kind, path, a, b, field) for every unit of every source; reads no records."""
    units: list[tuple] = []
    for src in cfg.sources:
        field = src.text_field
        if src.kind == "jsonl" or (src.kind == "text" and src.doc_per == "line"):
            kind = "jsonl" if src.kind == "jsonl" else "lines"
            exts = (".jsonl", ".json") if src.kind == "jsonl" else (".txt", ".md", ".text")
            for f in expand_paths(src.path, exts):
                size = storage.path(f).stat().length
                units += [(kind, f, a, min(a + CHUNK_BYTES, size), field) for a in range(0, max(size, 1), CHUNK_BYTES)]
        elif src.kind == "text":
            units += [("file", f, 0, 0, field) for f in expand_paths(src.path, (".txt", ".md", ".text"))]
        elif src.kind == "parquet":
            for f in expand_paths(src.path, (".parquet",)):
                units += [("parquet", f, g, 0, field) for g in range(parquet_row_groups(f, field))]
        elif src.kind in ("tfds", "default"):
            spec = json.dumps({"name": src.name, "split": src.split, "data_dir": src.data_dir or None}) \
                if src.kind == "tfds" else ""
            n = len(_indexed(src.kind, spec))
            units += [(src.kind, spec, a, min(a + INDEX_CHUNK, n), field) for a in range(0, n, INDEX_CHUNK)]
        elif src.kind == "arrayrecord":
            raise DataError(f"source {src.path} is ArrayRecord (already prepared shards, or records): "
                            f"`data prepare` reads jsonl, text, parquet, tfds and the default corpus")
        else:
            raise DataError(f"`data prepare` cannot read source kind {src.kind!r} "
                            f"(jsonl, text, parquet, tfds, default)")
    return [(i, *u) for i, u in enumerate(units)]


_INDEXED: dict = {}


def _indexed(kind: str, spec: str):
    if (kind, spec) not in _INDEXED:
        if kind == "default":
            from jaxllm.data.corpus import default_documents
            _INDEXED[kind, spec] = default_documents()
        else:
            import tensorflow_datasets as tfds
            s = json.loads(spec)
            try:
                _INDEXED[kind, spec] = tfds.data_source(s["name"], split=s["split"], data_dir=s["data_dir"],
                                                        download=False)
            except Exception as e:  # tfds raises many types for a missing dataset/split
                raise DataError(f"TFDS dataset {s['name']!r} split {s['split']!r} not readable "
                                f"({type(e).__name__}); build or download it first") from None
    return _INDEXED[kind, spec]


def _raw_records(unit: tuple, report: Report) -> Iterator[tuple[str, Optional[str]]]:
    """(where, text or None when dropped -- counted in `report`) for each record of a unit."""
    _, kind, path, a, b, field = unit
    if kind in ("jsonl", "lines"):
        for where, raw in read_line_range(path, a, b):
            rec = parse_json(raw, where, report, field) if kind == "jsonl" else parse_text(raw, where, report)
            yield where, None if rec is None else rec["text"]
    elif kind == "file":
        rec = parse_text(storage.read_bytes(path), path, report)
        yield path, None if rec is None else rec["text"]
    elif kind == "parquet":
        import pyarrow.parquet as pq
        with storage.path(path).open("rb") as f:
            table = pq.ParquetFile(f).read_row_group(a, columns=[field])
        for j, value in enumerate(table.column(field).to_pylist()):
            rec = parse_text(value.encode("utf-8", "surrogatepass"), f"{path}:group {a} row {j}", report) \
                if isinstance(value, str) else _bad_field(f"{path}:group {a} row {j}", report, field)
            yield f"{path}:group {a} row {j}", None if rec is None else rec["text"]
    else:  # tfds / default: index ranges
        ds = _indexed(kind, path)
        for i in range(a, b):
            where = f"{json.loads(path)['name'] if path else 'default'}[{i}]"
            value = ds[i].get(field) if kind == "tfds" else ds[i]
            if isinstance(value, (bytes, np.bytes_)):
                rec = parse_text(bytes(value), where, report)
            elif isinstance(value, str):
                rec = parse_text(value.encode("utf-8", "surrogatepass"), where, report)
            else:
                rec = _bad_field(where, report, field)
            yield where, None if rec is None else rec["text"]


def _bad_field(where: str, report: Report, field: str) -> None:
    report.read += 1
    report.drop(f"field {field!r} missing or not text", where)
    return None


def iter_clean(unit: tuple, opts: PrepareOptions, report: Report) -> Iterator[tuple[int, str, Optional[str], Optional[str]]]:
    """(doc id, where, cleaned text or None, drop reason or None) for each record of a unit;
    deterministic, so the writer stage can re-read a unit and get the same ids and decisions."""
    base = unit[0] << _ID_BITS
    for ordinal, (where, text) in enumerate(_raw_records(unit, report)):
        if text is None:
            yield base + ordinal, where, None, None  # counted by the parser
            continue
        text = clean_text(text)
        reason = filter_reason(text, opts)
        yield base + ordinal, where, (None if reason else text), reason


# ---- the Beam pipeline ------------------------------------------------------------------------------
def count(name: str, n: int = 1) -> None:
    if n:
        Metrics.counter(NS, name).inc(n)

@beam.typehints.with_output_types(Any)  # tagged outputs: no inference
class ReadClean(beam.DoFn):
    """unit -> (exact key, (doc id, where, signature)) per kept doc; drops counted; the first
    location of each drop reason to the 'first' output."""

    def __init__(self, opts: PrepareOptions):
        self.opts = opts

    def setup(self):
        self.mh = MinHash(self.opts.num_perm, self.opts.bands) if self.opts.near_dup_threshold > 0 else None

    def process(self, unit):
        report, first = Report(), {}
        for doc_id, where, text, reason in iter_clean(unit, self.opts, report):
            if reason:
                report.drop(reason, where)
            if text is None:
                for r, w in report.examples.items():
                    first.setdefault(r, (doc_id, w))
                continue
            sig = self.mh.signature(text).tobytes() if self.mh else b""
            yield exact_key(text), (doc_id, where, sig)
        count("read", report.read)
        for r, n in report.dropped.items():
            count(r, n)
        for r, v in first.items():
            yield beam.pvalue.TaggedOutput("first", (r, v))

class KeepFirst(beam.CombineFn):
    """Exact dedup per key: the doc with the smallest id, and the other ids (removed)."""

    def create_accumulator(self):
        return None, []

    def add_input(self, acc, doc):
        best, rest = acc
        if best is None:
            return doc, rest
        if doc[0] < best[0]:
            best, doc = doc, best
        rest.append((doc[0], doc[1]))
        return best, rest

    def merge_accumulators(self, accs):
        best, rest = None, []
        for b, r in accs:
            rest += r
            if b is not None:
                best, rest = self.add_input((best, rest), b)
        return best, rest

    def extract_output(self, acc):
        return acc

@beam.typehints.with_output_types(Any)  # tagged outputs: no inference
class SplitExact(beam.DoFn):
    def process(self, kv):
        best, rest = kv[1]
        yield best
        if rest:
            count("exact duplicate", len(rest))
            yield beam.pvalue.TaggedOutput("first", ("exact duplicate", min(rest)))
            for doc_id, _ in rest:
                yield beam.pvalue.TaggedOutput("removed", (doc_id >> _ID_BITS, doc_id))

class Bands(beam.DoFn):
    def __init__(self, opts):
        self.opts = opts

    def setup(self):
        self.mh = MinHash(self.opts.num_perm, self.opts.bands)

    def process(self, doc):
        for key in self.mh.band_keys(np.frombuffer(doc[2], np.uint32)):
            yield key, doc[0]

def bucket_pairs(kv):
    ids = sorted(set(kv[1]))
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            yield a, b

def send_signature(kv):  # (a, {"sig": [(where, sig)], "later": [b, ...]}) -> (b, sig_a) each
    _, g = kv
    for _, sig in g["sig"]:
        for b in g["later"]:
            yield b, sig

@beam.typehints.with_output_types(Any)  # tagged outputs: no inference
class Verify(beam.DoFn):
    """(b, {"sig": [(where, sig_b)], "earlier": [sig_a, ...]}) -> b removed if near a."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def process(self, kv):
        b, g = kv
        for where, sig in g["sig"]:
            if any(jaccard_estimate(sig, s) >= self.threshold for s in g["earlier"]):
                count("near duplicate")
                yield beam.pvalue.TaggedOutput("first", ("near duplicate", (b, where)))
                yield b >> _ID_BITS, b

def to_shard(kv, shards: int):  # (unit idx, {"unit": [unit], "removed": [ids]}) -> (shard, ...)
    _, g = kv
    for unit in g["unit"]:
        yield unit[0] % shards, (unit, sorted(g["removed"]))

class WriteShard(beam.DoFn):
    """(shard, [(unit, removed ids), ...]) -> the shard file: units re-read in order, removed
    and filtered docs skipped, the rest tokenized and written."""

    def __init__(self, tokenizer: str, opts: PrepareOptions, out_dir: str, local_dir: str):
        self.tokenizer, self.opts, self.out_dir, self.local_dir = tokenizer, opts, out_dir, local_dir

    def setup(self):
        from jaxllm.data.tokenizer import Tokenizer
        self.tok = Tokenizer(self.tokenizer)

    def process(self, kv):
        from array_record.python.array_record_module import ArrayRecordWriter
        shard, items = kv
        units = sorted((u for u in items if u is not None), key=lambda u: u[0][0])
        name = f"shard-{shard:05d}-of-{self.opts.shards:05d}.array_record"
        remote = storage.is_remote(self.out_dir)
        tmpdir = tempfile.mkdtemp(prefix="jaxllm-shard-") if remote else None
        path = os.path.join(tmpdir or self.local_dir, name)
        writer = ArrayRecordWriter(path, "group_size:1")
        stats = {"docs": 0, "tokens": 0, "records": 0, "dropped_tail": 0}
        win = self.opts.pack_windows + 1
        buf = np.zeros(0, np.int32)
        try:
            for unit, removed in units:
                removed, batch = set(removed), []
                for doc_id, _, text, _ in iter_clean(unit, self.opts, Report()):
                    if text is not None and doc_id not in removed:
                        batch.append(text)
                for i in range(0, len(batch), 256):
                    for ids in self.tok.encode_batch(batch[i:i + 256], bos=True, eos=True):
                        arr = np.asarray(ids, np.int32)
                        stats["docs"] += 1
                        stats["tokens"] += len(arr)
                        if win == 1:
                            writer.write(arr.tobytes())
                            stats["records"] += 1
                            continue
                        buf = np.concatenate([buf, arr])
                        n = len(buf) // win
                        for j in range(n):
                            writer.write(buf[j * win:(j + 1) * win].tobytes())
                        stats["records"] += n
                        buf = buf[n * win:]
            stats["dropped_tail"] = len(buf) if win > 1 else 0
            writer.close()
            if remote:
                storage.copy_file(path, storage.join(self.out_dir, name))
        finally:
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
        count("kept", stats["docs"])
        count("tokens", stats["tokens"])
        count("records", stats["records"])
        count("packed_dropped_tokens", stats["dropped_tail"])
        yield name

class WriteFirstSeen(beam.DoFn):
    def __init__(self, path: str):
        self.path = path

    def process(self, pairs):
        storage.write_atomic(self.path, json.dumps({r: v[1] for r, v in pairs}))


def pipeline_options(opts: PrepareOptions):
    """Beam options: `opts.beam_args` as given; without a --runner, the DirectRunner with
    `opts.workers` worker processes (in-process when workers == 1)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    args = list(opts.beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append("--runner=DirectRunner")
        if not any(a.startswith("--direct_running_mode") for a in args):
            mode = "multi_processing" if opts.workers > 1 else "in_memory"
            args += [f"--direct_running_mode={mode}", f"--direct_num_workers={max(opts.workers, 1)}"]
    return PipelineOptions(args)


def build(p, units: list[tuple], tokenizer: str, opts: PrepareOptions, out_dir: str, local_dir: str,
          first_seen_path: str):
    """The prepare pipeline on Beam pipeline `p` (see the module docstring)."""
    unit_pc = p | "Units" >> beam.Create(units) | "Spread" >> beam.Reshuffle()
    read = unit_pc | "ReadClean" >> beam.ParDo(ReadClean(opts)).with_outputs("first", main="docs")
    exact = (read.docs | "ExactDedup" >> beam.CombinePerKey(KeepFirst())
             | "SplitExact" >> beam.ParDo(SplitExact()).with_outputs("first", "removed", main="kept"))
    firsts, removed = [read.first, exact.first], [exact.removed]
    if opts.near_dup_threshold > 0:
        kept = exact.kept
        sigs = kept | "SigById" >> beam.Map(lambda d: (d[0], (d[1], d[2])))
        pairs = (kept | "Bands" >> beam.ParDo(Bands(opts)) | "Buckets" >> beam.GroupByKey()
                 | "Pairs" >> beam.FlatMap(bucket_pairs) | "DistinctPairs" >> beam.Distinct())
        refs = ({"sig": sigs, "later": pairs} | "JoinA" >> beam.CoGroupByKey()
                | "SendSig" >> beam.FlatMap(send_signature))
        near = ({"sig": sigs, "earlier": refs} | "JoinB" >> beam.CoGroupByKey()
                | "Verify" >> beam.ParDo(Verify(opts.near_dup_threshold)).with_outputs("first", main="removed"))
        firsts.append(near.first)
        removed.append(near.removed)
    _ = (firsts | "Firsts" >> beam.Flatten() | "FirstPerReason" >> beam.CombinePerKey(min)
         | "AllFirsts" >> beam.combiners.ToList() | "WriteFirsts" >> beam.ParDo(WriteFirstSeen(first_seen_path)))
    removed_pc = removed | "Removed" >> beam.Flatten()
    by_unit = unit_pc | "UnitByIdx" >> beam.Map(lambda u: (u[0], u))
    every_shard = p | "ShardIds" >> beam.Create([(i, None) for i in range(opts.shards)])
    shards = (({"unit": by_unit, "removed": removed_pc} | "JoinUnits" >> beam.CoGroupByKey()
               | "ToShard" >> beam.FlatMap(to_shard, opts.shards), every_shard)
              | "WithEmpty" >> beam.Flatten() | "ByShard" >> beam.GroupByKey())
    return shards | "WriteShards" >> beam.ParDo(WriteShard(tokenizer, opts, out_dir, local_dir))


def _counters(result) -> dict:
    from apache_beam.metrics.metric import MetricsFilter
    out: dict = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(NS))["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out


def prepare(cfg: DataConfig, out_dir: str, opts: PrepareOptions) -> dict:
    from jaxllm.data.tokenizer import Tokenizer

    out_dir = storage.join(out_dir)
    if storage.exists(out_dir) and storage.listdir(out_dir):
        raise DataError(f"output directory {out_dir} already exists and is not empty; choose a new --out")
    if opts.shards < 1 or opts.pack_windows < 0:
        raise DataError(f"--shards must be >= 1 and --pack-windows >= 0 (got {opts.shards}, {opts.pack_windows})")
    tok = Tokenizer(cfg.tokenizer)
    units = make_units(cfg)
    t0 = time.time()
    # local: shards are written into a temporary directory beside out_dir, renamed when complete;
    # remote: each shard is written to a worker-local file and uploaded, prepared.json last
    remote = storage.is_remote(out_dir)
    tmp = None if remote else out_dir + f".tmp-{os.getpid()}"
    first_path = storage.join(out_dir, f"_first_seen-{uuid.uuid4().hex[:8]}.json") if remote \
        else os.path.join(tmp, "_first_seen.json")
    if tmp:
        os.makedirs(tmp, exist_ok=True)
    try:
        with beam.Pipeline(options=pipeline_options(opts)) as p:
            build(p, units, cfg.tokenizer, opts, out_dir, tmp or "", first_path)
        result = p.result
        counts = _counters(result)
        first = json.loads(storage.read_text(first_path))
        storage.path(first_path).unlink()
        report = Report(read=counts.pop("read", 0), kept=counts.pop("kept", 0))
        tokens, records = counts.pop("tokens", 0), counts.pop("records", 0)
        tail = counts.pop("packed_dropped_tokens", 0)
        report.dropped.update({r: n for r, n in counts.items() if n})
        report.examples = {r: first[r] for r in sorted(report.dropped) if r in first}
        if report.kept == 0:
            raise DataError(f"nothing left after cleaning ({report.summary()})")
        summary = {"documents": report.kept, "tokens": tokens, "shards": opts.shards,
                   "tokenizer": tok.describe(), "report": report.as_dict(),
                   "options": dataclasses.asdict(opts), "seconds": round(time.time() - t0, 3)}
        if opts.pack_windows:
            summary.update(packed_windows=opts.pack_windows, records=records, packed_dropped_tokens=tail)
        if remote:
            storage.write_atomic(storage.join(out_dir, "prepared.json"), json.dumps(summary, indent=2))
        else:
            with open(os.path.join(tmp, "prepared.json"), "w") as f:
                json.dump(summary, f, indent=2)
            if os.path.exists(out_dir):
                os.rmdir(out_dir)  # empty (checked above)
            os.replace(tmp, out_dir)
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        elif storage.exists(out_dir):  # a failed remote run leaves nothing half-written
            storage.rmtree(out_dir)
        raise
    return summary
