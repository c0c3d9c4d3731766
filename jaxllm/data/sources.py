"""Data sources as random-access *units*, read lazily, with malformed records counted.

A source is never read whole. It is a list of small units that any process can read by index:
one record (ArrayRecord, TFDS `data_source`, in-memory generated data), one Parquet row group,
one text file (doc_per=file), or a byte range of a line-per-record file (JSONL, text lines:
`CHUNK_BYTES` per unit; a line belongs to the unit holding its first byte). The input pipeline
shuffles unit indices, gives each process its own units and reads them in grain workers, so host
memory is O(unit), not O(corpus). Every reader counts what it skipped and why in a `Report`;
nothing bad crashes a run and nothing vanishes silently.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter
from typing import Any, Optional

import numpy as np

from jaxllm.config import SourceConfig
from jaxllm.core import storage
from jaxllm.errors import DataError


@dataclasses.dataclass
class Report:
    read: int = 0
    kept: int = 0
    dropped: Counter = dataclasses.field(default_factory=Counter)  # reason -> count
    examples: dict = dataclasses.field(default_factory=dict)  # reason -> first location seen

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, where)

    def merge(self, other: "Report") -> "Report":
        self.read += other.read
        self.kept += other.kept
        self.dropped.update(other.dropped)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)
        return self

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "dropped": dict(self.dropped),
                "first_seen": self.examples}

    def summary(self) -> str:
        parts = [f"read {self.read}, kept {self.kept}"]
        for reason, n in sorted(self.dropped.items()):
            parts.append(f"dropped {n} ({reason}, first at {self.examples[reason]})")
        return "; ".join(parts)


CHUNK_BYTES = 1 << 20  # line-per-record files are read in units of about this many bytes


@dataclasses.dataclass
class SourceData:
    records: list  # list of dicts (or int32 token arrays for prepared shards)
    report: Report
    kind: str = "records"  # "records" (dicts with fields) or "tokens" (prepared int32 arrays)


def expand_paths(pattern: str, exts: tuple = ()) -> list[str]:
    files = storage.expand(pattern, exts)
    if not files:
        raise DataError(f"data path {pattern!r} matches no files; check data.sources[i].path")
    return files


# ---- record parsing (shared with `jaxllm data prepare`) ----------------------------------------
def _decode_utf8(raw: bytes, where: str, report: Report) -> Optional[str]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.drop("invalid UTF-8", where)
        return None


def _keep_text(text: Any, where: str, report: Report, field: str) -> Optional[dict]:
    if not isinstance(text, str):
        report.drop(f"field {field!r} missing or not text", where)
        return None
    if not text.strip():
        report.drop("empty document", where)
        return None
    report.kept += 1
    return {"text": text}


def parse_text(raw: bytes, where: str, report: Report) -> Optional[dict]:
    """One raw text document (a file or a line) -> {"text": ...} or None (counted in `report`)."""
    report.read += 1
    text = _decode_utf8(raw, where, report)
    return None if text is None else _keep_text(text, where, report, "text")


def parse_json(raw: bytes, where: str, report: Report, field: str = "text") -> Optional[dict]:
    """One raw JSON line -> {"text": ...} (field "*": the whole object) or None (counted in `report`).
    Blank lines are not records: callers skip them before calling."""
    report.read += 1
    line = _decode_utf8(raw, where, report)
    if line is None:
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        report.drop("invalid JSON", where)
        return None
    if not isinstance(obj, dict):
        report.drop("JSON line is not an object", where)
        return None
    if field == "*":  # structured examples (chat, preference, prompt)
        report.kept += 1
        return obj
    return _keep_text(obj.get(field), where, report, field)



# ---- sources ------------------------------------------------------------------------------------
class Source:
    """Unit i -> its good records (dicts, or int32 arrays when `kind == "tokens"`), drops counted.
    Picklable (grain worker processes get a copy); open file handles are re-made on first use."""
    kind = "records"
    meta: dict = {}
    name = "?"

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int, report: Report) -> list:
        raise NotImplementedError

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_open")}


class MemorySource(Source):
    """Small in-memory data (the embedded corpus, generated tasks): one record per unit."""

    def __init__(self, records: list):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def read(self, i: int, report: Report) -> list:
        report.read += 1
        report.kept += 1
        return [self.records[i]]


def read_line_range(path: str, start: int, end: int):
    """(where, raw line without its newline) for every non-blank line of `path` whose first byte
    is in [start, end): byte ranges that tile a file read each line exactly once. `where` is
    path:line in a file's first range, path:byte N after it."""
    with storage.path(path).open("rb") as f:
        pos = start
        if start > 0:  # the line holding byte start-1 belongs to the previous range
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())
        line_no = 0
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            line_no += 1
            where = f"{path}:{line_no}" if start == 0 else f"{path}:byte {pos}"
            pos += len(raw)
            if raw.strip():
                yield where, raw.rstrip(b"\r\n")


class LinesSource(Source):
    """JSONL or line-per-document text, as byte ranges of about CHUNK_BYTES."""

    def __init__(self, files: list[str], parse, chunk_bytes: int):
        self.files, self.parse = files, parse
        sizes = [storage.path(f).stat().length for f in files]
        units = [(fi, a, min(a + chunk_bytes, n)) for fi, n in enumerate(sizes)
                 for a in range(0, max(n, 1), chunk_bytes)]
        self.units = np.asarray(units, dtype=np.int64).reshape(-1, 3)  # [U, (file, start, end)]

    def __len__(self) -> int:
        return len(self.units)

    def read(self, i: int, report: Report) -> list:
        fi, start, end = (int(x) for x in self.units[i])
        return [rec for where, raw in read_line_range(self.files[fi], start, end)
                if (rec := self.parse(raw, where, report)) is not None]


class FilesSource(Source):
    """Text, one document per file."""

    def __init__(self, files: list[str]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int, report: Report) -> list:
        rec = parse_text(storage.read_bytes(self.files[i]), self.files[i], report)
        return [] if rec is None else [rec]


def parquet_row_groups(path: str, field: str) -> int:
    """Number of row groups of a Parquet file (its footer only), after checking it has `field`."""
    import pyarrow.parquet as pq
    try:
        with storage.path(path).open("rb") as f:
            pf = pq.ParquetFile(f)
            names, groups = pf.schema_arrow.names, pf.num_row_groups
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
    if field != "*" and field not in names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(names)}); set data.sources[i].text_field")
    return groups


class ParquetSource(Source):
    """Parquet, one row group per unit (only the needed column is read)."""

    def __init__(self, files: list[str], field: str):
        self.files, self.field, units = files, field, []
        for fi, path in enumerate(files):
            units += [(fi, g) for g in range(parquet_row_groups(path, field))]
        self.units = np.asarray(units, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.units)

    def read(self, i: int, report: Report) -> list:
        import pyarrow.parquet as pq
        fi, g = (int(x) for x in self.units[i])
        path, out = self.files[fi], []
        with storage.path(path).open("rb") as f:
            table = pq.ParquetFile(f).read_row_group(g, columns=None if self.field == "*" else [self.field])
        for j, row in enumerate(table.to_pylist()):
            report.read += 1
            if self.field == "*":
                report.kept += 1
                out.append(row)
            elif r := _keep_text(row.get(self.field), f"{path}:group {g} row {j}", report, self.field):
                out.append(r)
        return out


class ArrayRecordSource(Source):
    """Prepared shards (`jaxllm data prepare`: int32 token records) or JSON/UTF-8 text records,
    one record per unit, read by index."""

    def __init__(self, pattern: str, field: str):
        import grain
        paths = expand_paths(pattern, (".array_record", ".arrayrecord"))
        meta_path = storage.join(pattern if storage.isdir(pattern) else str(storage.path(paths[0]).parent),
                                 "prepared.json")
        self.meta = json.loads(storage.read_text(meta_path)) if storage.exists(meta_path) else {}
        self.kind = "tokens" if self.meta else "records"
        # array_record's reader takes local files only: remote shards are fetched to a local cache
        self.paths = [storage.local_copy(p, suffix=".array_record") for p in paths]
        self.pattern, self.field, n = pattern, field, 0
        for path in self.paths:  # open each shard alone so the error names the bad one
            try:
                n += len(grain.sources.ArrayRecordDataSource([path]))
            except Exception as e:  # array_record raises RuntimeError/ValueError for damaged files
                raise DataError(f"{path}: not a readable ArrayRecord file ({str(e).strip().splitlines()[0][:120]}); "
                                f"re-create it with `jaxllm data prepare`") from None
        self.n = n

    def __len__(self) -> int:
        return self.n

    def _ds(self):
        if getattr(self, "_open_ds", None) is None:
            import grain
            self._open_ds = grain.sources.ArrayRecordDataSource(self.paths)
        return self._open_ds

    def read(self, i: int, report: Report) -> list:
        raw = self._ds()[i]
        report.read += 1
        if self.kind == "tokens":
            report.kept += 1
            return [np.frombuffer(raw, dtype=np.int32)]
        where = f"{self.pattern}#{i}"
        text = _decode_utf8(raw, where, report)
        if text is None:
            return []
        try:
            obj = json.loads(text)
            value = obj.get(self.field) if isinstance(obj, dict) else None
        except json.JSONDecodeError:
            value = text
        r = _keep_text(value, where, report, self.field)
        return [] if r is None else [r]


class TfdsSource(Source):
    """A TFDS dataset through `tfds.data_source` (random access by index, ArrayRecord-backed)."""

    def __init__(self, src: SourceConfig):
        self.src = src
        self.n = len(self._ds())

    def _ds(self):
        if getattr(self, "_open_ds", None) is None:
            import tensorflow_datasets as tfds
            src = self.src
            try:
                self._open_ds = tfds.data_source(src.name, split=src.split, data_dir=src.data_dir or None,
                                                 download=False)
            except Exception as e:  # tfds raises many types for a missing dataset/split
                raise DataError(f"TFDS dataset {src.name!r} split {src.split!r} not readable from data_dir="
                                f"{src.data_dir or '~/tensorflow_datasets'} ({type(e).__name__}); build "
                                f"or download it first") from None
        return self._open_ds

    def __len__(self) -> int:
        return self.n

    def read(self, i: int, report: Report) -> list:
        ex, where, field = self._ds()[i], f"{self.src.name}[{i}]", self.src.text_field
        report.read += 1
        value = ex.get(field)
        if isinstance(value, (bytes, np.bytes_)):
            value = _decode_utf8(bytes(value), where, report)
            if value is None:
                return []
        r = _keep_text(value, where, report, field)
        return [] if r is None else [r]


def open_source(src: SourceConfig, chunk_bytes: int = 0) -> Source:
    """SourceConfig -> Source (lists files and unit boundaries; reads no records)."""
    chunk = chunk_bytes or src.chunk_bytes or CHUNK_BYTES
    if src.kind == "default":
        from jaxllm.data.corpus import default_documents
        source = MemorySource([{"text": d} for d in default_documents()])
    elif src.kind == "generated":
        from jaxllm.data import tasks
        source = MemorySource(tasks.generate(src.name, src.split, src.size, demo_noise=src.demo_noise))
    elif src.kind == "jsonl":
        field = src.text_field
        source = LinesSource(expand_paths(src.path, (".jsonl", ".json")),
                             functools.partial(_parse_json_field, field=field), chunk)
    elif src.kind == "text" and src.doc_per == "line":
        source = LinesSource(expand_paths(src.path, (".txt", ".md", ".text")), parse_text, chunk)
    elif src.kind == "text":
        source = FilesSource(expand_paths(src.path, (".txt", ".md", ".text")))
    elif src.kind == "parquet":
        source = ParquetSource(expand_paths(src.path, (".parquet",)), src.text_field)
    elif src.kind == "arrayrecord":
        source = ArrayRecordSource(src.path, src.text_field)
    else:
        source = TfdsSource(src)
    if len(source) == 0:
        raise DataError(f"data source {src.kind}:{src.path or src.name} is empty")
    source.name = f"{src.kind}:{src.path or src.name}"
    return source


def _parse_json_field(raw: bytes, where: str, report: Report, field: str) -> Optional[dict]:
    return parse_json(raw, where, report, field)


def iter_records(source: Source, report: Report):
    """Every record of a source, in order (tools and small data; training reads by unit)."""
    for i in range(len(source)):
        yield from source.read(i, report)


def read_source(src: SourceConfig) -> SourceData:
    """A whole source in memory: for small data (tools, tests), never for training input."""
    source, report = open_source(src), Report()
    records = list(iter_records(source, report))
    if not records:
        raise DataError(f"data source {src.kind}:{src.path or src.name} has no usable records "
                        f"({report.summary()})")
    return SourceData(records, report, kind=source.kind)


def texts_for_tokenizer(inputs: list[str], field: str = "text", max_bytes: int = 1 << 30) -> list[str]:
    """Texts to train a tokenizer on: files by pattern (kind from the extension), or the embedded
    corpus; at most `max_bytes` of text (SentencePiece samples its input anyway)."""
    if not inputs:
        return [r["text"] for r in read_source(SourceConfig(kind="default")).records]
    texts, total = [], 0
    for pattern in inputs:
        kind = "jsonl" if pattern.endswith((".jsonl", ".json")) else "parquet" if pattern.endswith(".parquet") else "text"
        for r in iter_records(open_source(SourceConfig(kind=kind, path=pattern, text_field=field)), Report()):
            texts.append(r["text"])
            total += len(r["text"])
            if total >= max_bytes:
                return texts
    if not texts:
        raise DataError(f"no usable text in {', '.join(inputs)}")
    return texts
