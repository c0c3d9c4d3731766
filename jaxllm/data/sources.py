"""Data sources -> random-access lists of records (dicts), with malformed records counted.

Every reader returns a `SourceData`: the good records plus a `Report` of what was skipped and
why. Nothing bad crashes a run and nothing vanishes silently: the report is printed and saved.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass
class SourceData:
    records: list  # list of dicts
    report: Report
    kind: str = "records"  # "records" (dicts with fields) or "tokens" (prepared int32 arrays)


def expand_paths(pattern: str, exts: tuple = ()) -> list[str]:
    files = storage.expand(pattern, exts)
    if not files:
        raise DataError(f"data path {pattern!r} matches no files; check data.sources[i].path")
    return files


def read_source(src: SourceConfig) -> SourceData:
    readers = {"default": _read_default, "text": _read_text, "jsonl": _read_jsonl,
               "parquet": _read_parquet, "arrayrecord": _read_arrayrecord, "tfds": _read_tfds,
               "generated": _read_generated}
    data = readers[src.kind](src)
    if not data.records:
        raise DataError(f"data source {src.kind}:{src.path or src.name} has no usable records "
                        f"({data.report.summary()})")
    return data


def _read_default(src: SourceConfig) -> SourceData:
    from jaxllm.data.corpus import default_documents
    docs = default_documents()
    return SourceData([{"text": d} for d in docs], Report(read=len(docs), kept=len(docs)))


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


def _read_text(src: SourceConfig) -> SourceData:
    report, records = Report(), []
    for path in expand_paths(src.path, (".txt", ".md", ".text")):
        raw = storage.read_bytes(path)
        if src.doc_per == "file":
            report.read += 1
            text = _decode_utf8(raw, path, report)
            if text is not None and (r := _keep_text(text, path, report, "text")):
                records.append(r)
        else:
            for i, line in enumerate(raw.split(b"\n")):
                if not line.strip():
                    continue  # blank separator lines are not documents
                report.read += 1
                text = _decode_utf8(line, f"{path}:{i + 1}", report)
                if text is not None and (r := _keep_text(text, f"{path}:{i + 1}", report, "text")):
                    records.append(r)
    return SourceData(records, report)


def iter_jsonl(path: str, report: Report):
    """Yields (location, dict) for each good JSON object line; counts the bad ones."""
    with storage.path(path).open("rb") as f:
        for i, raw in enumerate(f):
            where = f"{path}:{i + 1}"
            if not raw.strip():
                continue
            report.read += 1
            line = _decode_utf8(raw, where, report)
            if line is None:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                report.drop("invalid JSON", where)
                continue
            if not isinstance(obj, dict):
                report.drop("JSON line is not an object", where)
                continue
            yield where, obj


def _read_jsonl(src: SourceConfig) -> SourceData:
    report, records = Report(), []
    for path in expand_paths(src.path, (".jsonl", ".json")):
        for where, obj in iter_jsonl(path, report):
            if src.text_field == "*":  # structured examples (chat, preference, prompt)
                report.kept += 1
                records.append(obj)
            elif r := _keep_text(obj.get(src.text_field), where, report, src.text_field):
                records.append(r)
    return SourceData(records, report)


def _read_parquet(src: SourceConfig) -> SourceData:
    import pyarrow.parquet as pq
    report, records = Report(), []
    for path in expand_paths(src.path, (".parquet",)):
        try:
            with storage.path(path).open("rb") as f:
                table = pq.read_table(f)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
        if src.text_field != "*" and src.text_field not in table.column_names:
            raise DataError(f"{path}: no column {src.text_field!r} (columns: "
                            f"{', '.join(table.column_names)}); set data.sources[i].text_field")
        for i, row in enumerate(table.to_pylist()):
            report.read += 1
            if src.text_field == "*":
                report.kept += 1
                records.append(row)
            elif r := _keep_text(row.get(src.text_field), f"{path}:row {i}", report, src.text_field):
                records.append(r)
    return SourceData(records, report)


def _read_arrayrecord(src: SourceConfig) -> SourceData:
    """Prepared shards (`jaxllm data prepare`, int32 token records) or JSON/UTF-8 text records."""
    import grain
    paths = expand_paths(src.path, (".array_record", ".arrayrecord"))
    meta_path = storage.join(src.path if storage.isdir(src.path) else str(storage.path(paths[0]).parent),
                             "prepared.json")
    prepared = storage.exists(meta_path)
    # array_record's reader takes local files only: remote shards are fetched to a local cache
    paths = [storage.local_copy(p, suffix=".array_record") for p in paths]
    for path in paths:  # open each shard alone so the error names the bad one
        try:
            grain.sources.ArrayRecordDataSource([path]).__len__()
        except Exception as e:  # array_record raises RuntimeError/ValueError for damaged files
            raise DataError(f"{path}: not a readable ArrayRecord file ({str(e).strip().splitlines()[0][:120]}); "
                            f"re-create it with `jaxllm data prepare`") from None
    ds = grain.sources.ArrayRecordDataSource(paths)
    report, records = Report(), []
    for i in range(len(ds)):
        raw = ds[i]
        report.read += 1
        if prepared:
            report.kept += 1
            records.append(np.frombuffer(raw, dtype=np.int32))
            continue
        text = _decode_utf8(raw, f"{src.path}#{i}", report)
        if text is None:
            continue
        try:
            obj = json.loads(text)
            value = obj.get(src.text_field) if isinstance(obj, dict) else None
        except json.JSONDecodeError:
            value = text
        if r := _keep_text(value, f"{src.path}#{i}", report, src.text_field):
            records.append(r)
    return SourceData(records, report, kind="tokens" if prepared else "records")


def _read_tfds(src: SourceConfig) -> SourceData:
    import tensorflow_datasets as tfds
    try:
        ds = tfds.data_source(src.name, split=src.split, data_dir=src.data_dir or None,
                              download=False)
    except Exception as e:  # tfds raises many types for a missing dataset/split
        raise DataError(f"TFDS dataset {src.name!r} split {src.split!r} not readable from data_dir="
                        f"{src.data_dir or '~/tensorflow_datasets'} ({type(e).__name__}); build "
                        f"or download it first") from None
    report, records = Report(), []
    for i in range(len(ds)):
        ex = ds[i]
        report.read += 1
        value = ex.get(src.text_field)
        if isinstance(value, (bytes, np.bytes_)):
            value = _decode_utf8(bytes(value), f"{src.name}[{i}]", report)
            if value is None:
                continue
        if r := _keep_text(value, f"{src.name}[{i}]", report, src.text_field):
            records.append(r)
    return SourceData(records, report)


def _read_generated(src: SourceConfig) -> SourceData:
    from jaxllm.data import tasks
    records = tasks.generate(src.name, src.split, src.size)
    return SourceData(records, Report(read=len(records), kept=len(records)))


def texts_for_tokenizer(inputs: list[str], field: str = "text") -> list[str]:
    """Texts to train a tokenizer on: files by pattern (kind from the extension), or the embedded corpus."""
    if not inputs:
        return [r["text"] for r in read_source(SourceConfig(kind="default")).records]
    texts = []
    for pattern in inputs:
        kind = "jsonl" if pattern.endswith((".jsonl", ".json")) else "parquet" if pattern.endswith(".parquet") else "text"
        texts += [r["text"] for r in read_source(SourceConfig(kind=kind, path=pattern, text_field=field)).records]
    return texts
