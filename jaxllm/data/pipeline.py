"""Grain input pipelines: streamed units -> records -> examples -> packed rows -> per-process batches.

Nothing is read up front. Each source is a list of small units (`sources.Source`); the training
stream of source i is `range(units).shuffle(seed + i).repeat()`, sliced `[p::P]` for process p, so
processes read disjoint units whose union is every epoch. A unit is read, parsed, split off the
held-out set (content hash), shuffled within itself by (seed, stream index) and converted to
examples (tokenized text, rendered chat, preference completions, prompts) inside the grain
pipeline: in `data.workers` worker processes (grain `mp_prefetch`; 0 = the training process, with
`data.num_threads` read threads). Sources are mixed by `weight` (in examples), then packed:

- text: concatenate-and-split into rows of seq_len + 1 tokens (grain ConcatThenSplit; never pads);
- chat (`data.packing`, default first_fit) and preference (default none): first-fit packing of whole
  examples into rows of `train.seq_len`; `segment_ids` number the examples (for preference, the
  K completions of an example are consecutive segments of one row) and `positions` restart at
  each, so no token attends across examples and the loss is the unpacked loss;
- unpacked chat/preference: one right-padded example per row (preference rows are [K, T]);
- prompt: one left-padded prompt per row.

Data order is a pure function of (seed, step, process index, data.workers). The iterator state
(grain's: unit indices, packer buffers, each worker's state, and the running drop report) goes
into every checkpoint, so a restored iterator continues exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Optional

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset

from jaxllm.config import DataConfig
from jaxllm.data.sources import Report, Source, open_source
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.errors import DataError

REPORT_KEY = "jaxllm_report"  # the running drop report inside grain iterator states


def holdout(key: str, fraction: float) -> bool:
    """Deterministic document-level split by content hash."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=8).digest(), "big")
    return (h % 1_000_000) < fraction * 1_000_000



def record_key(r) -> str:
    if isinstance(r, np.ndarray):
        return r.tobytes().hex()[:256]
    return r.get("text") or repr(sorted(r.items()))


# ---- units -> examples, with the drop report in the iterator state --------------------------------
def _report_state(rep: Report) -> dict:
    return {"read": rep.read, "kept": rep.kept, "dropped": dict(rep.dropped), "first_seen": dict(rep.examples)}


def _report_of(state: dict) -> Report:
    rep = Report(state["read"], state["kept"])
    rep.dropped.update(state["dropped"])
    rep.examples.update(state["first_seen"])
    return rep


@dataclasses.dataclass(frozen=True)
class UnitReader:
    """(stream index, unit) -> (examples, drop report of that unit): read, parse, hold out,
    shuffle within the unit, convert. Runs in grain read threads / worker processes."""
    source: Source
    convert: Callable  # (records: list, report) -> examples
    seed: int
    heldout: Optional[bool]  # True: held-out records only; False: training records only; None: all
    eval_fraction: float

    def __call__(self, item) -> tuple:
        index, unit = item
        rep = Report()
        records = self.source.read(int(unit), rep)
        if self.heldout is not None and self.eval_fraction > 0:
            keep = [holdout(record_key(r), self.eval_fraction) == self.heldout for r in records]
            records = [r for r, k in zip(records, keep) if k]
        if self.seed >= 0 and len(records) > 1:
            order = np.random.default_rng([self.seed, int(index)]).permutation(len(records))
            records = [records[j] for j in order]
        return self.convert(records, rep), _report_state(rep)


class _Flatten(grain.IterDataset):
    """(examples, unit report) -> examples, one at a time; the running report rides in the state."""

    def __init__(self, parent, units: int, name: str):
        super().__init__(parent)
        self.units, self.name = units, name

    def __iter__(self):
        return _FlattenIterator(self._parent.__iter__(), self.units, self.name)


class _FlattenIterator(grain.DatasetIterator):
    def __init__(self, parent, units: int, name: str):
        super().__init__(parent)
        self._units, self._name, self._empty = units, name, 0
        self._buffer, self._next = [], 0
        self._before = Report()  # everything before the unit in the buffer
        self._unit = Report()
        self._parent_state = self._parent.get_state()

    def __next__(self):
        while self._next >= len(self._buffer):
            self._before.merge(self._unit)
            self._parent_state = self._parent.get_state()
            examples, rep = next(self._parent)
            self._buffer, self._next, self._unit = examples, 0, _report_of(rep)
            self._empty = 0 if examples else self._empty + 1
            if self._empty > self._units:  # a whole epoch of units gave nothing: never spin forever
                raise DataError(f"data source {self._name} has no usable records ({self._before.summary()})")
        self._next += 1
        return self._buffer[self._next - 1]

    def get_state(self):
        # the report counts the unit in the buffer too; a restored iterator re-reads that unit
        # without counting it again
        so_far = _report_of(_report_state(self._before)).merge(self._unit)
        return {"parent": self._parent_state, "next": self._next, REPORT_KEY: _report_state(so_far)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._parent_state = state["parent"]
        self._before, self._unit = _report_of(state[REPORT_KEY]), Report()
        self._buffer, self._next = [], 0
        try:
            examples, _ = next(self._parent)
            self._buffer, self._next = examples, state["next"]
        except StopIteration:
            pass


def report_in_state(state: Any) -> Report:
    """The drop report of every source (and every worker) found in an iterator state."""
    total = Report()
    stack = [state]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            if REPORT_KEY in x:
                total.merge(_report_of(x[REPORT_KEY]))
            stack += [v for k, v in x.items() if k != REPORT_KEY]
        elif isinstance(x, (list, tuple)):
            stack += list(x)
    return total


def example_stream(source: Source, reader: UnitReader, *, shuffle_seed: Optional[int], process_index: int = 0,
                   process_count: int = 1, num_threads: int = 2, prefetch: int = 4) -> grain.IterDataset:
    """One source's examples: shuffled and repeated forever (training) or once in order (eval)."""
    ds = grain.MapDataset.range(len(source))
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed).repeat(None)
    ds = ds.map_with_index(lambda i, u: (i, u))[process_index::process_count].map(reader)
    read = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    return _Flatten(read, len(source), source.name)


# ---- converters: records -> unpacked examples ------------------------------------------------------
def _guarded(fn: Callable, where: str) -> Callable:
    """Per-record conversion; a record the kind cannot use is dropped and counted, not fatal."""
    def convert(records: list, rep: Report) -> list:
        out = []
        for r in records:
            try:
                out.append(fn(r))
            except DataError as e:
                rep.drop(str(e), where)
                rep.kept -= 1
        return out
    return convert


def tokenize_docs(records: list, tok: Tokenizer, kind: str) -> list[np.ndarray]:
    """Text records -> [BOS] ids EOS (BOS if the tokenizer has one); prepared token records as they are."""
    if kind == "tokens":
        return [np.asarray(r, np.int32) for r in records]
    if not records:
        return []
    return [np.asarray(x, np.int32) for x in tok.encode_batch([r["text"] for r in records], bos=True, eos=True)]


def _tokenize(tok: Tokenizer, kind: str) -> Callable:
    def convert(records: list, rep: Report) -> list:
        return [{"tokens": ids} for ids in tokenize_docs(records, tok, kind)]
    return convert


def _text_window(vocab_size: int) -> Callable:
    def window(ex: dict) -> dict:
        toks, seg, pos = ex["tokens"], ex["tokens_segment_ids"], ex["tokens_positions"]
        if toks.size and int(toks.max()) >= vocab_size:
            raise DataError(f"token id {int(toks.max())} in the data is >= the tokenizer's vocab size "
                            f"{vocab_size}: the data was prepared with another tokenizer")
        return {"inputs": toks[:-1], "targets": toks[1:], "segment_ids": seg[:-1], "positions": pos[:-1],
                # never predict the first token of the next document from the previous one
                "loss_mask": ((seg[:-1] == seg[1:]) & (seg[:-1] != 0)).astype(np.int32)}
    return window


def unpadded_sequence(ids: np.ndarray, out_mask: np.ndarray, cap: int, pad_id: int) -> dict:
    """ids/out_mask [N] -> next-token example of its first m = min(N, cap) tokens, the same real
    tokens `sequence_example` puts in a padded row (the last one is an input with no target)."""
    m = min(len(ids), cap)
    ids, mask = ids.astype(np.int32), out_mask.astype(np.int32)
    return {"inputs": ids[:m], "targets": _pad_to(ids[1:m + 1], m, pad_id), "loss_mask": _pad_to(mask[1:m + 1], m, 0)}


def chat_sequence(rec: dict, tok: Tokenizer, seq_len: int) -> dict:
    """Unpadded next-token example [m <= seq_len]: inputs, targets, loss_mask (1 on output tokens)."""
    from jaxllm.data.chat import messages_of, render
    return unpadded_sequence(*render(tok, messages_of(rec)), seq_len, tok.pad_id)


def preference_sequences(rec: dict, tok: Tokenizer, seq_len: int) -> dict:
    """One preference example as one packable element: its K completions (each prompt + completion)
    end to end, with `positions` restarting per completion and `sub` = completion rank + 1. When
    the K together exceed seq_len, each is cut to seq_len // K tokens."""
    from jaxllm.data.chat import pair
    prompt, comps = _completions(rec)
    seqs = [pair(tok, prompt, c) for c in comps]
    cap = seq_len if sum(min(len(ids), seq_len) for ids, _ in seqs) <= seq_len else seq_len // len(seqs)
    parts = []
    for k, (ids, mask) in enumerate(seqs):
        part = unpadded_sequence(ids, mask, cap, tok.pad_id)
        n = len(part["inputs"])
        parts.append({**part, "positions": np.arange(n, dtype=np.int32), "sub": np.full(n, k + 1, np.int32)})
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _pad_chat(seq_len: int, pad_id: int) -> Callable:
    def pad(ex: dict) -> dict:
        n = len(ex["inputs"])
        seg = (np.arange(seq_len) < n).astype(np.int32)
        return {"inputs": _pad_to(ex["inputs"], seq_len, pad_id), "targets": _pad_to(ex["targets"], seq_len, pad_id),
                "loss_mask": _pad_to(ex["loss_mask"], seq_len, 0), "segment_ids": seg,
                "positions": np.arange(seq_len, dtype=np.int32)}
    return pad


def _packed_chat(ex: dict) -> dict:
    return {"inputs": ex["inputs"], "targets": ex["targets"], "loss_mask": ex["loss_mask"],
            "segment_ids": ex["inputs_segment_ids"], "positions": ex["inputs_positions"]}


def _packed_preference(K: int) -> Callable:
    def row(ex: dict) -> dict:
        seg = ex["inputs_segment_ids"]
        return {"inputs": ex["inputs"], "targets": ex["targets"], "loss_mask": ex["loss_mask"],
                "positions": ex["positions"], "segment_ids": np.where(seg > 0, (seg - 1) * K + ex["sub"], 0).astype(np.int32)}
    return row


# ---- pipelines ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Pipeline:
    """Train stream (checkpointable) + fixed eval batches + what the eval read dropped."""
    train_dataset: Any  # grain.IterDataset of per-process batches, in step order
    eval_batches: list  # list of per-process batch dicts (numpy)
    report: Report
    stats: dict

    @staticmethod
    def drop_report(state: dict) -> Report:
        return report_in_state(state)

    def iterator(self, state: Optional[dict] = None, *_):
        it = self.train_dataset.__iter__()
        if state is not None:
            it.set_state(state)
        return it


def _stack(examples: list[dict]) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def packing_on(cfg: DataConfig) -> bool:
    if cfg.packing == "auto":
        return cfg.kind in ("text", "chat")
    return cfg.packing == "first_fit"


class _Plan:
    """How one data kind becomes rows: the per-record converter and the packing/padding stage."""

    def __init__(self, cfg: DataConfig, tok: Tokenizer, seq_len: int, kind: str, rows: int):
        self.cfg, self.tok, self.T, self.rows = cfg, tok, seq_len, rows
        packed = packing_on(cfg)
        if cfg.kind == "text":
            self.convert = _tokenize(tok, kind)
        else:
            fn = {"chat": (lambda r: chat_sequence(r, tok, seq_len)) if packed else (lambda r: chat_example(r, tok, seq_len)),
                  "preference": (lambda r: preference_sequences(r, tok, seq_len)) if packed
                  else (lambda r: preference_example(r, tok, seq_len)),
                  "prompt": lambda r: prompt_example(r, tok, cfg.max_prompt_len)}[cfg.kind]
            self.convert = _guarded(fn, f"{cfg.kind} record")
        self.packed = packed and cfg.kind in ("chat", "preference")

    def rows_of(self, ds: grain.IterDataset) -> grain.IterDataset:
        T, cfg = self.T, self.cfg
        if cfg.kind == "text":
            ds = ConcatThenSplitIterDataset(ds, length_struct={"tokens": T + 1})
            return ds.map(_text_window(self.tok.vocab_size))
        if cfg.kind == "chat" and self.packed:
            ds = FirstFitPackIterDataset(ds, length_struct={k: T for k in ("inputs", "targets", "loss_mask")},
                                         num_packing_bins=max(self.rows, 1), shuffle_bins=False)
            return ds.map(_packed_chat)
        if cfg.kind == "preference" and self.packed:
            K = 2
            ds = FirstFitPackIterDataset(ds, length_struct={k: T for k in ("inputs", "targets", "loss_mask", "positions", "sub")},
                                         num_packing_bins=max(self.rows, 1), shuffle_bins=False,
                                         max_sequences_per_bin=cfg.max_examples_per_row)
            return ds.map(_packed_preference(K))
        return ds  # padded chat/preference rows and prompts are made whole by the converter


def _sources(specs) -> list:
    return [_probe(open_source(s), s) for s in specs]


def _probe(source: Source, spec) -> Source:
    """Reads the first units until one has a record: a source with none fails here, in one line,
    instead of in a worker. Costs one unit for any usable source."""
    rep = Report()
    for i in range(min(len(source), 64)):
        if source.read(i, rep):
            return source
    if len(source) <= 64:
        raise DataError(f"data source {spec.kind}:{spec.path or spec.name} has no usable records ({rep.summary()})")
    return source


def _kind_of(sources: list) -> str:
    kinds = {s.kind for s in sources}
    if len(kinds) > 1:
        raise DataError("data.sources mixes prepared token shards with raw text; prepare all or none")
    return kinds.pop()


def _check_prepared(sources: list, tok: Tokenizer, seq_len: int) -> None:
    for s in sources:
        windows = s.meta.get("packed_windows") if isinstance(s.meta, dict) else None
        if windows and windows != seq_len:
            raise DataError(f"data source {s.name} holds windows pre-packed for seq_len {windows} (`data prepare "
                            f"--pack-windows {windows}`) but train.seq_len={seq_len}; set train.seq_len={windows} "
                            f"or prepare without --pack-windows")
        made_with = s.meta.get("tokenizer", {}) if isinstance(s.meta, dict) else {}
        sha = made_with.get("sha256") if isinstance(made_with, dict) else None
        if sha and getattr(tok, "sha256", None) and sha != tok.sha256:
            raise DataError(f"data source {getattr(s, 'pattern', '?')} was prepared with tokenizer "
                            f"{made_with.get('path', '?')} (sha256 {sha[:12]}), not {tok.path}; prepare it again "
                            f"or set data.tokenizer to the one it was prepared with")


def _with_workers(ds: grain.IterDataset, cfg: DataConfig) -> grain.IterDataset:
    if cfg.workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain reads absl flags in its worker machinery
            flags.FLAGS.mark_as_parsed()
        return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers, per_worker_buffer_size=cfg.prefetch))
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)


def build_pipeline(cfg: DataConfig, tok: Tokenizer, seq_len: int, global_batch: int, seed: int,
                   eval_batches: int, process_index: int = 0, process_count: int = 1) -> Pipeline:
    """Any data kind -> Pipeline (see the module docstring)."""
    if global_batch % process_count:
        raise DataError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
    local = global_batch // process_count
    train_sources = _sources(cfg.sources)
    kind = _kind_of(train_sources)
    _check_prepared(train_sources, tok, seq_len)
    plan = _Plan(cfg, tok, seq_len, kind, local)
    split = None if cfg.eval_sources or cfg.eval_fraction == 0 else False
    streams = [example_stream(src, UnitReader(src, plan.convert, seed * 1000 + i, split, cfg.eval_fraction),
                              shuffle_seed=seed * 1000 + i, process_index=process_index,
                              process_count=process_count, num_threads=cfg.num_threads, prefetch=cfg.prefetch)
               for i, src in enumerate(train_sources)]
    mixed = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, [s.weight for s in cfg.sources])
    train_ds = _with_workers(plan.rows_of(mixed).batch(local, drop_remainder=True, batch_fn=_stack), cfg)

    eval_list, report = _eval_batches(cfg, plan, train_sources, eval_batches, global_batch, local, process_index)
    stats = {"sources": len(train_sources), "units": [len(s) for s in train_sources], "kind": kind,
             "packing": "concat-split" if cfg.kind == "text" else "first-fit" if plan.packed else "none",
             "eval_sequences": len(eval_list) * global_batch, "workers": cfg.workers}
    if eval_list and "segment_ids" in eval_list[0]:
        stats["padding_fraction"] = padding_fraction(eval_list)
    return Pipeline(train_ds, eval_list, report, stats)


def _eval_batches(cfg: DataConfig, plan: _Plan, train_sources: list, n_batches: int, global_batch: int,
                  local: int, process_index: int) -> tuple[list, Report]:
    """The first `n_batches` global batches of held-out rows (every process reads the same ones
    and keeps its own rows): read in order until enough, never the whole corpus."""
    if cfg.eval_sources:
        sources, split = _sources(cfg.eval_sources), None
    elif cfg.eval_fraction > 0:
        sources, split = train_sources, True
    else:
        return [], Report()
    if n_batches <= 0:
        return [], Report()
    streams = [example_stream(src, UnitReader(src, plan.convert, -1, split, cfg.eval_fraction), shuffle_seed=None,
                              num_threads=cfg.num_threads, prefetch=cfg.prefetch) for src in sources]
    chained = streams[0] if len(streams) == 1 else grain.experimental.InterleaveIterDataset(streams, cycle_length=1)
    it = plan.rows_of(chained).batch(global_batch, drop_remainder=True, batch_fn=_stack).__iter__()
    out = []
    for b in it:
        out.append({k: v[process_index * local:(process_index + 1) * local] for k, v in b.items()})
        if len(out) == n_batches:
            break
    report = report_in_state(it.get_state())
    if not out:
        what = "sequences" if cfg.kind == "text" else "examples"
        raise DataError(f"held-out split has fewer {what} than one batch of {global_batch}; raise "
                        f"data.eval_fraction, add data.eval_sources or lower train.batch_size ({report.summary()})")
    return out, report


def heldout_records(cfg: DataConfig, n: int) -> list:
    """The first `n` held-out records (dicts) in source order: for generation evals."""
    if n <= 0:
        return []
    specs, split = (cfg.eval_sources, None) if cfg.eval_sources else (cfg.sources, True)
    if split and cfg.eval_fraction <= 0:
        return []
    out = []
    for src in _sources(specs):
        reader = UnitReader(src, lambda recs, rep: recs, -1, split, cfg.eval_fraction)
        for u in range(len(src)):
            out += reader((u, u))[0]
            if len(out) >= n:
                return out[:n]
    return out


def first_records(cfg: DataConfig, n: int = 0) -> list:
    """Training records (dicts) in source order, at most n (0 = all): for small-data tools."""
    out = []
    for src in _sources(cfg.sources):
        reader = UnitReader(src, lambda recs, rep: recs, -1, None if cfg.eval_fraction == 0 else False, cfg.eval_fraction)
        for u in range(len(src)):
            out += reader((u, u))[0]
            if n and len(out) >= n:
                return out[:n]
    return out


def padding_fraction(batches: list) -> float:
    segs = [b["segment_ids"] for b in batches if "segment_ids" in b]
    if not segs:
        return 0.0
    total = sum(s.size for s in segs)
    return float(1.0 - sum(int((s != 0).sum()) for s in segs) / total)


# ---- chat, preference and prompt examples -------------------------------------------------
def _pad_to(x: np.ndarray, n: int, value: int = 0) -> np.ndarray:
    return np.concatenate([x[:n], np.full(max(n - len(x), 0), value, x.dtype)])


def sequence_example(ids: np.ndarray, out_mask: np.ndarray, seq_len: int, pad_id: int) -> dict:
    """ids/out_mask [N] -> right-padded next-token example of length seq_len.
    loss_mask[t] = 1 iff targets[t] is an output (assistant/completion) token; segment_ids are 0 on
    padding, so the pad value (tokenizer.pad_id, possibly equal to EOS) is never learned or attended."""
    n = min(len(ids), seq_len + 1)
    toks = _pad_to(ids.astype(np.int32), seq_len + 1, pad_id)
    mask = _pad_to(out_mask.astype(np.int32), seq_len + 1, 0)
    seg = (np.arange(seq_len + 1) < n).astype(np.int32)
    return {"inputs": toks[:-1], "targets": toks[1:], "loss_mask": mask[1:] * seg[1:],
            "segment_ids": seg[:-1], "positions": np.arange(seq_len, dtype=np.int32)}


def chat_example(rec: dict, tok: Tokenizer, seq_len: int) -> dict:
    from jaxllm.data.chat import messages_of, render
    ids, mask = render(tok, messages_of(rec))
    return sequence_example(ids, mask, seq_len, tok.pad_id)


def _completions(rec: dict) -> tuple[Any, list]:
    """-> (prompt, completions ranked best first)."""
    if "completions" in rec:
        comps = rec["completions"]
    elif "chosen" in rec and "rejected" in rec:
        comps = [rec["chosen"], rec["rejected"]]
    elif "answer" in rec and "rejected" in rec:  # generated tasks
        comps = [rec["answer"], rec["rejected"]]
    else:
        raise DataError("preference record needs prompt with chosen/rejected or a ranked completions list")
    if not isinstance(comps, list) or len(comps) < 2 or not all(isinstance(c, str) for c in comps):
        raise DataError("preference record: need at least 2 completion strings")
    if not isinstance(rec.get("prompt"), (str, list)):
        raise DataError("preference record: prompt missing or not text/messages")
    return rec["prompt"], comps


def preference_example(rec: dict, tok: Tokenizer, seq_len: int) -> dict:
    """-> arrays [K, seq_len], K completions ranked best first (K=2: chosen, rejected)."""
    from jaxllm.data.chat import pair
    prompt, comps = _completions(rec)
    rows = [sequence_example(*pair(tok, prompt, c), seq_len, tok.pad_id) for c in comps]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def prompt_example(rec: dict, tok: Tokenizer, max_prompt_len: int) -> dict:
    """Left-padded prompt ids, prompt_mask (1 on real tokens: the sampler's segment ids, so the pad
    value never matters), and the reference answer text (kept on the host)."""
    from jaxllm.data.chat import prompt_ids
    prompt = rec.get("prompt")
    if not isinstance(prompt, (str, list)):
        raise DataError("prompt record: field 'prompt' missing or not text/messages")
    ids = prompt_ids(tok, prompt)[-max_prompt_len:]
    pad = max_prompt_len - len(ids)
    padded = np.concatenate([np.full(pad, tok.pad_id, np.int32), ids])
    mask = np.r_[np.zeros(pad, np.int32), np.ones(len(ids), np.int32)]
    return {"prompt": padded, "prompt_mask": mask,
            "prompt_text": np.str_(prompt if isinstance(prompt, str) else repr(prompt)),
            "answer": np.str_(rec.get("answer", "") or "")}


