"""`jaxllm data prepare`: read -> clean -> exact dedup -> near dedup -> tokenize -> ArrayRecord
shards, as Apache Beam pipelines, with a drop report.

Stages (every one a Beam transform; nothing collects the corpus in the driver):

1. **Read** -- the sources are cut into *units* (a byte range of about `CHUNK_BYTES` of a JSONL or
   line-per-document text file, one text file, one Parquet row group, an index range of a TFDS
   split or of the embedded corpus). The unit list (O(files + bytes / CHUNK_BYTES)) is the only
   thing made in the driver; units are reshuffled over the workers, which read them through
   `jaxllm.core.storage` (local disk, gs://, s3://). A document's id is (unit index, ordinal in
   the unit) packed in an int: ordering by id is corpus order.
2. **Clean** -- Unicode NFC, control characters removed (newline and tab kept), length filters, a
   repetition filter (fraction of duplicated lines). Malformed records are counted per reason as
   the training readers count them (`sources.parse_json` / `parse_text`). The scan writes, per
   unit, a *sidecar* file to a work directory: each kept document's ordinal, exact key (a hash of
   the whitespace-normalised text) and MinHash signature (word 5-gram shingles, `num_perm`
   hashes; computed for all the unit's kept documents at once in numpy, `MinHash.signatures`);
   only counts and the first drop location per reason leave the workers.
3. **Dedup** (`prepare_dedup`) in K rounds; round k reads the sidecars and takes the keys whose
   hash % K == k. **Exact**: exact key -> all but the smallest id (the first in corpus order)
   removed. **Near**: each of `bands` LSH bands (band index + the band's signature rows) is a
   bucket key; in a bucket of two or more, the signatures are read back from the sidecars and b is
   removed when some a < b in the bucket has an estimated Jaccard >= threshold. So a document is
   kept iff no document before it is a near duplicate of it: one per cluster of mutual near
   duplicates (a chain a~b~c with a!~c keeps a only); a document that is both is an exact
   duplicate. Only keys and ids go through the shuffle, batched: a unit's keys of the round are
   split by another hash into G groups (`prepare_dedup.choose_groups`: 64, more when a group
   would exceed ~1M keys) and sent as one element per (unit, group) of packed records; a group's
   worker sorts them and finds the equal keys in numpy. Each round's removed ids go to a small
   file; the driver merges them (8 bytes per removed doc) and re-reads one unit to locate the
   first exact / near duplicate. The result does not depend on K or G.
4. **Tokenize + write** -- units go round-robin to `shards` shards; each shard is written by one
   worker, which loads the sorted removed ids, re-reads its units in order, re-applies the
   (deterministic) cleaning, skips removed ids, tokenizes (tokenizer loaded once per worker in
   `DoFn.setup`, batches of 256 documents; a Hugging Face tokenizer through `encode_batch_fast`:
   BOS if the tokenizer has one, ..., EOS) and writes the records. The output is therefore the
   same for any number of workers.

Pipelines: one when K = 1 -- scan, dedup round 0 (K computed inside the pipeline from the scan's
count of kept documents, a side input) and the write (side input: the removed ids, so it runs
after the dedup); when K > 1 that pipeline writes nothing and the other rounds and the write
follow as pipelines of their own, one after the other. The DirectRunner holds a pipeline's
shuffles in the runner (driver) process's memory: about (1 + bands) entries of
~`prepare_dedup.ENTRY_BYTES` per kept document, split over the K rounds, so locally K =
ceil(docs x (1 + bands) x ENTRY_BYTES / `memory_budget`) (`dedup_partitions` forces K) keeps the
peak near the budget (plus the runner's and each worker's own ~0.2-0.5 GB) at any corpus size; a
round costs one more read of the sidecars (~280 bytes per doc) and a pipeline start. On a
distributed runner (`--runner=...` other than a DirectRunner) K = 1: it spills shuffles to disk;
the work directory is then `_work-*` inside the (gs://) output, removed before `prepared.json` is
written.

Output format (what the `arrayrecord` source reads): `shard-IIIII-of-NNNNN.array_record` files
(ArrayRecord, group_size:1), one record per document = its int32 token ids (`np.frombuffer(raw,
np.int32)`), and `prepared.json` = the summary (documents, tokens, shards, tokenizer, report,
options, seconds). With `pack_windows=N` (> 0) every record is instead a window of exactly N+1
tokens cut from the concatenation of the documents of a shard (in order, stride N+1, no overlap;
the last partial window of each shard is dropped and counted as `packed_dropped_tokens`), and
`prepared.json` has `"packed_windows": N` and `"records"`: ready-made training rows (inputs =
w[:-1], targets = w[1:]) with document boundaries not marked beyond the BOS/EOS tokens.

Drop counts are Beam metrics (counter per reason, plus `read`, `kept`, `tokens`) read back from
the PipelineResults (exact/near counts from the removed ids); the first location of each reason
(`path:line` in the first unit of a file, `path:byte N` after, `path:group G row R` for Parquet) is
that of the minimum doc id. The output directory is written under a temporary name (the local work
directory inside it) and renamed when complete (local), or written with `prepared.json` last
(gs://: readers treat a directory without it as unfinished); an existing non-empty output
directory is never overwritten.

Runner: locally Beam's DirectRunner in multi-process mode (`workers` processes); any Beam pipeline
options (`beam_args`, e.g. `--runner=DataflowRunner --project=... --region=...
--temp_location=gs://...`) select another runner.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import tempfile
import time
import unicodedata
import uuid
from typing import Any, Iterator, Optional

import apache_beam as beam
import numpy as np

from jaxllm.config import DataConfig
from jaxllm.core import storage
from jaxllm.data import prepare_dedup as dedup
from jaxllm.data.prepare_dedup import ID_BITS as _ID_BITS, NS, MinHash, count, exact_key, jaccard_estimate, write_sidecar  # noqa: F401
from jaxllm.data.sources import Report, expand_paths, parse_json, parse_text, parquet_row_groups, read_line_range
from jaxllm.errors import DataError

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
CHUNK_BYTES = 8 << 20  # a line-per-record file is read in units of about this many bytes
INDEX_CHUNK = 10_000  # records per unit for indexed sources (TFDS, the embedded corpus)


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
    memory_budget: int = 2 << 30  # bytes for one dedup round's shuffles on the local runner
    dedup_partitions: int = 0  # K dedup rounds; 0 = from memory_budget (1 on a distributed runner)
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


# ---- the Beam pipelines ------------------------------------------------------------------------------
@beam.typehints.with_output_types(Any)
class Scan(beam.DoFn):
    """unit -> its sidecar file in `work` (kept docs' ordinals, exact keys, MinHash signatures
    computed for the unit's kept docs at once; prepare_dedup.write_sidecar), then (unit index,
    kept docs); tagged 'first': (reason, (doc id, where)) for the first drop of each reason in the
    unit; reads, drops and kept docs ("signed") counted."""

    def __init__(self, opts: PrepareOptions, work: str):
        self.opts, self.work = opts, work

    def setup(self):
        self.mh = MinHash(self.opts.num_perm, self.opts.bands) if self.opts.near_dup_threshold > 0 else None

    def process(self, unit):
        report, first, ords, texts = Report(), {}, [], []
        for doc_id, where, text, reason in iter_clean(unit, self.opts, report):
            if reason:
                report.drop(reason, where)
            if text is None:
                for r, w in report.examples.items():
                    first.setdefault(r, (doc_id, w))
                continue
            ords.append(doc_id & ((1 << _ID_BITS) - 1))
            texts.append(text)
        keys = [exact_key(t) for t in texts]
        sigs = self.mh.signatures(texts) if self.mh else []
        write_sidecar(self.work, unit[0], ords, keys, sigs, self.opts.num_perm if self.mh else 0)
        count("read", report.read)
        count("signed", len(ords))
        for r, n in report.dropped.items():
            count(r, n)
        for r, v in first.items():
            yield beam.pvalue.TaggedOutput("first", (r, v))
        yield unit[0], len(ords)


def _worker_processes(opts: PrepareOptions) -> bool:
    """The local DirectRunner with several worker processes (multi_processing)."""
    from apache_beam.options.pipeline_options import DirectOptions
    if not dedup.is_local_runner(opts.beam_args):
        return False
    o = pipeline_options(opts).view_as(DirectOptions)
    return o.direct_running_mode == "multi_processing" and (o.direct_num_workers or 1) > 1


class WriteShard(beam.DoFn):
    """(shard, [[units]]) -> the shard file: units re-read in order, removed (`removed_path`: all
    removed ids, sorted, .npy) and filtered docs skipped, the rest tokenized and written. An empty
    `removed_path` (a side input: the dedup took more than one round) writes nothing.
    `single_thread`: the worker is one of several local processes sharing the cores -- a Hugging
    Face tokenizer encodes on one thread (TOKENIZERS_PARALLELISM=false in that worker process;
    its own thread pool there only adds contention: ~20% slower measured with 2 workers on 2 cores)."""

    def __init__(self, tokenizer: str, opts: PrepareOptions, out_dir: str, local_dir: str,
                 single_thread: bool = False):
        self.tokenizer, self.opts, self.out_dir, self.local_dir = tokenizer, opts, out_dir, local_dir
        self.single_thread = single_thread

    def setup(self):
        from jaxllm.data.tokenizer import Tokenizer
        if self.single_thread:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.tok = Tokenizer(self.tokenizer)
        self.removed_from = None

    def removed_in(self, unit: tuple) -> set:
        lo, hi = np.searchsorted(self.removed, [unit[0] << _ID_BITS, (unit[0] + 1) << _ID_BITS])
        return set(self.removed[lo:hi].tolist())

    def process(self, kv, removed_path: str):
        from array_record.python.array_record_module import ArrayRecordWriter
        if not removed_path:
            return
        if self.removed_from != removed_path:
            self.removed = np.load(io.BytesIO(storage.read_bytes(removed_path)))
            self.removed_from = removed_path
        shard, (units,) = kv
        units = [(u, self.removed_in(u)) for u in sorted(units, key=lambda u: u[0])]
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
                batch = []
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


class WriteRemoved(beam.DoFn):
    """-> the path of the removed ids (round 0's exact and near ids, .npy) when the dedup is one
    round (the write can follow in the same pipeline), else ""."""

    def __init__(self, path: str):
        self.path = path

    def process(self, _, exact, near, plan):
        if plan[0] != 1:
            yield ""
            return
        buf = io.BytesIO()
        np.save(buf, np.union1d(exact, near).astype(np.int64))
        storage.write_atomic(self.path, buf.getvalue())
        yield self.path


def dedup_plan(docs: int, opts: PrepareOptions) -> tuple[int, int]:
    """(K dedup rounds, shuffle groups per round) for `docs` kept documents."""
    bands = opts.bands if opts.near_dup_threshold > 0 else 0
    parts = dedup.choose_partitions(docs, bands, opts.memory_budget, opts.dedup_partitions, opts.beam_args)
    return parts, dedup.choose_groups(docs, bands, parts)


def build_first(p, units: list[tuple], tokenizer: str, opts: PrepareOptions, out_dir: str, local_dir: str,
                work: str):
    """The first pipeline: read + clean every unit, its sidecar to `work`, the first location of
    each drop reason to `work`/first_seen.json; dedup round 0 of K (K from the scan's count of kept
    documents, a side input); when K = 1, the shards too (the write waits on the removed ids)."""
    scan = (p | "Units" >> beam.Create(units) | "Spread" >> beam.Reshuffle()
            | "Scan" >> beam.ParDo(Scan(opts, work)).with_outputs("first", main="units"))
    _ = (scan.first | "FirstPerReason" >> beam.CombinePerKey(min) | "AllFirsts" >> beam.combiners.ToList()
         | "WriteFirsts" >> beam.ParDo(WriteFirstSeen(storage.join(work, "first_seen.json"))))
    plan = beam.pvalue.AsSingleton(
        scan.units | "Signed" >> beam.Map(lambda u: u[1]) | "Docs" >> beam.CombineGlobally(sum)
        | "Plan" >> beam.Map(dedup_plan, opts))
    exact, near = dedup.build_round(scan.units | "UnitIds" >> beam.Map(lambda u: u[0]), work, 0, plan,
                                    opts.num_perm, opts.bands, opts.near_dup_threshold)
    removed = (p | "Once" >> beam.Create([None])
               | "Removed" >> beam.ParDo(WriteRemoved(storage.join(work, "removed.npy")),
                                         beam.pvalue.AsSingleton(exact), beam.pvalue.AsSingleton(near), plan))
    build_write(p, units, tokenizer, opts, out_dir, local_dir, beam.pvalue.AsSingleton(removed))


def build_write(p, units: list[tuple], tokenizer: str, opts: PrepareOptions, out_dir: str, local_dir: str,
                removed_path):
    """Units round-robin to `opts.shards` shards (grouped by shard so the workers share them), each
    shard written by WriteShard; `removed_path` a path or a side input giving it."""
    by_shard = [(s, [u for u in units if u[0] % opts.shards == s]) for s in range(opts.shards)]
    return (p | "Shards" >> beam.Create(by_shard) | "ByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(WriteShard(tokenizer, opts, out_dir, local_dir, _worker_processes(opts)),
                                          removed_path))


def locate(unit: tuple, doc_id: int, opts: PrepareOptions) -> str:
    """The location (`where`) of document `doc_id` of `unit`, re-read."""
    for i, where, _, _ in iter_clean(unit, opts, Report()):
        if i == doc_id:
            return where
    raise DataError(f"document {doc_id} not found in unit {unit}")


def _counters(result) -> dict:
    from apache_beam.metrics.metric import MetricsFilter
    out: dict = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(NS))["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out


def _run(opts: PrepareOptions, build_fn, *args) -> dict:
    """One Beam pipeline built by `build_fn(p, *args)`, run to completion; its counters."""
    with beam.Pipeline(options=pipeline_options(opts)) as p:
        build_fn(p, *args)
    return _counters(p.result)


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
    # the dedup work files (sidecars, removed ids, first locations) go to `work`, removed at the end
    remote = storage.is_remote(out_dir)
    tmp = None if remote else out_dir + f".tmp-{os.getpid()}"
    work = storage.join(out_dir, f"_work-{uuid.uuid4().hex[:8]}") if remote else os.path.join(tmp, "_work")
    if tmp:
        os.makedirs(work, exist_ok=True)
    try:
        # one pipeline: scan, dedup round 0 of K (K from the scan's count), and the write when K = 1
        counts = _run(opts, build_first, units, cfg.tokenizer, opts, out_dir, tmp or "", work)
        first = json.loads(storage.read_text(storage.join(work, "first_seen.json")))
        parts, groups = dedup_plan(counts.pop("signed", 0), opts)
        for k in range(1, parts):  # K > 1: the other rounds, then the write, one pipeline each
            _run(opts, dedup.build_later_round, [u[0] for u in units], work, k, (parts, groups), opts.num_perm,
                 opts.bands, opts.near_dup_threshold)
        exact, near = dedup.removed_ids(work, parts)
        for reason, ids in (("exact duplicate", exact), ("near duplicate", near)):
            counts[reason] = len(ids)
            if len(ids):
                first[reason] = locate(units[int(ids[0]) >> _ID_BITS], int(ids[0]), opts)
        if parts > 1:
            removed_path = storage.join(work, "removed.npy")
            buf = io.BytesIO()
            np.save(buf, np.union1d(exact, near).astype(np.int64))
            storage.write_atomic(removed_path, buf.getvalue())
            counts.update(_run(opts, build_write, units, cfg.tokenizer, opts, out_dir, tmp or "", removed_path))
        storage.rmtree(work)
        report = Report(read=counts.pop("read", 0), kept=counts.pop("kept", 0))
        tokens, records = counts.pop("tokens", 0), counts.pop("records", 0)
        tail = counts.pop("packed_dropped_tokens", 0)
        report.dropped.update({r: counts[r] for r in sorted(counts) if counts[r]})
        report.examples = {r: first[r] for r in sorted(report.dropped) if r in first}
        if report.kept == 0:
            raise DataError(f"nothing left after cleaning ({report.summary()})")
        summary = {"documents": report.kept, "tokens": tokens, "shards": opts.shards,
                   "tokenizer": tok.describe(), "report": report.as_dict(), "dedup_partitions": parts,
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
