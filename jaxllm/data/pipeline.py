"""Grain pipelines: records -> tokens -> fixed-length examples -> per-process batches.

Data order is a pure function of (seed, step, process index): the training set is a grain
`MapDataset` of examples, shuffled per epoch by `seed`, repeated, sliced `[p::P]` for process p,
and batched; batch `s` of process `p` is `dataset[s]`. The iterator state saved in checkpoints is
grain's `{"next_index": s}`, so a restored iterator continues exactly.

Text is packed by concatenate-and-split: documents ([BOS] ... EOS, the tokenizer's ids; no BOS
when it has none) are laid end to end and cut into windows of seq_len + 1 tokens. `segment_ids`
number the documents inside a window and `positions` restart at each document, so attention never
crosses a document boundary (model.attention_mask) and no padding is needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Iterator, Optional

import grain
import jax
import numpy as np

from jaxllm.config import DataConfig
from jaxllm.data.sources import Report, SourceData, read_source
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.errors import DataError


# ---- text packing -------------------------------------------------------------------------
class PackedWindows:
    """Random-access windows over concatenated documents. Item i -> dict of [T] int32 arrays."""

    def __init__(self, docs: list[np.ndarray], seq_len: int):
        if not docs:
            raise DataError("no documents to pack")
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        self.stream = np.concatenate(docs).astype(np.int32)
        self.doc_of = np.repeat(np.arange(len(docs), dtype=np.int32), lengths)
        self.doc_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.seq_len = seq_len
        self.n = (len(self.stream) - 1) // seq_len
        if self.n == 0:
            raise DataError(f"only {len(self.stream)} tokens of data: fewer than one sequence of "
                            f"train.seq_len={seq_len}; add data or lower train.seq_len")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        T = self.seq_len
        a = int(i) * T
        toks = self.stream[a:a + T + 1]
        docs = self.doc_of[a:a + T + 1]
        seg = (docs - docs[0] + 1).astype(np.int32)
        idx = np.arange(a, a + T + 1)
        pos = (idx - np.maximum(self.doc_start[docs], a)).astype(np.int32)
        return {
            "inputs": toks[:-1], "targets": toks[1:], "segment_ids": seg[:-1], "positions": pos[:-1],
            # never predict the first token of the next document from the previous one
            "loss_mask": (seg[:-1] == seg[1:]).astype(np.int32),
        }


def holdout(key: str, fraction: float) -> bool:
    """Deterministic document-level split by content hash."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=8).digest(), "big")
    return (h % 1_000_000) < fraction * 1_000_000


@dataclasses.dataclass
class Splits:
    train: list  # per source: list of examples (records or token arrays)
    eval: list
    weights: list
    report: Report
    kind: str  # "records" or "tokens"


def load_splits(cfg: DataConfig) -> Splits:
    """Reads every source; holds out `eval_fraction` of documents unless eval_sources are given."""
    report = Report()
    train, evals, weights, kinds = [], [], [], set()
    for src in cfg.sources:
        data = read_source(src)
        report.merge(data.report)
        kinds.add(data.kind)
        if cfg.eval_sources or cfg.eval_fraction == 0:
            train.append(data.records)
        else:
            keys = [_record_key(r) for r in data.records]
            train.append([r for r, k in zip(data.records, keys) if not holdout(k, cfg.eval_fraction)])
            evals.append([r for r, k in zip(data.records, keys) if holdout(k, cfg.eval_fraction)])
        weights.append(src.weight)
    for src in cfg.eval_sources:
        evals.append(read_source(src).records)
    if len(kinds) > 1:
        raise DataError("data.sources mixes prepared token shards with raw text; prepare all or none")
    if not any(len(t) for t in train):
        raise DataError("every record was held out or dropped: no training data left")
    return Splits(train, [e for e in evals if len(e)], weights, report, kinds.pop())


def _record_key(r) -> str:
    if isinstance(r, np.ndarray):
        return r.tobytes().hex()[:256]
    return r.get("text") or repr(sorted(r.items()))


def tokenize_docs(records: list, tok: Tokenizer, kind: str) -> list[np.ndarray]:
    if kind == "tokens":
        return [np.asarray(r, np.int32) for r in records]
    return [np.asarray(x, np.int32) for x in tok.encode_batch([r["text"] for r in records], bos=True, eos=True)]


# ---- datasets -----------------------------------------------------------------------------
@dataclasses.dataclass
class Pipeline:
    """Train iterator (checkpointable) + fixed eval batches + what was dropped."""
    train_dataset: Any  # grain.MapDataset of per-process batches, index = step
    eval_batches: list  # list of per-process batch dicts (numpy)
    report: Report
    stats: dict
    examples: list = dataclasses.field(default_factory=list)  # structured kinds: per-source example dicts
    _iter: Any = None

    def iterator(self, state: Optional[dict] = None, num_threads: int = 2, prefetch: int = 4):
        it = self.train_dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)).__iter__()
        if state is not None:
            it.set_state(state)
        self._iter = it
        return it


def _stack(examples: list[dict]) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def make_batched(example_sets: list, weights: list, seed: int, local_batch: int,
                 process_index: int, process_count: int, shuffle: bool = True):
    """Per-source MapDatasets -> (weighted mix) -> shuffle/repeat -> process slice -> batch."""
    sets = []
    for ex in example_sets:
        ds = grain.MapDataset.source(ex)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        sets.append(ds.repeat(None))
    ds = sets[0] if len(sets) == 1 else grain.MapDataset.mix(sets, weights=weights)
    ds = ds[process_index::process_count]
    return ds.batch(local_batch, batch_fn=_stack)


def build_text_pipeline(cfg: DataConfig, tok: Tokenizer, seq_len: int, global_batch: int, seed: int,
                        eval_batches: int, process_index: int = 0, process_count: int = 1) -> Pipeline:
    """Pretraining pipeline (causal or masked LM): packed windows of `seq_len` tokens."""
    if global_batch % process_count:
        raise DataError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
    local = global_batch // process_count
    splits = load_splits(cfg)
    train_windows = [PackedWindows(tokenize_docs(t, tok, splits.kind), seq_len) for t in splits.train if t]
    _check_vocab(train_windows, tok)
    train_ds = make_batched(train_windows, splits.weights[:len(train_windows)], seed, local,
                            process_index, process_count)
    eval_list = []
    if splits.eval:
        eval_docs = [d for e in splits.eval for d in tokenize_docs(e, tok, splits.kind)]
        eval_windows = PackedWindows(eval_docs, seq_len)
        n_batches = min(eval_batches, len(eval_windows) // global_batch) or 0
        if n_batches == 0:
            raise DataError(f"held-out split has {len(eval_windows)} sequences, fewer than one batch of "
                            f"{global_batch}; raise data.eval_fraction or lower train.batch_size")
        eval_ds = grain.MapDataset.source(eval_windows)[process_index::process_count].batch(local, batch_fn=_stack)
        eval_list = [eval_ds[i] for i in range(n_batches)]
    stats = {"train_sequences": sum(len(w) for w in train_windows),
             "train_tokens": int(sum(len(w.stream) for w in train_windows)),
             "eval_sequences": len(eval_list) * global_batch,
             "padding_fraction": 0.0,  # concatenate-and-split packing never pads
             "sources": len(train_windows)}
    return Pipeline(train_ds, eval_list, splits.report, stats)


def _check_vocab(windows: list, tok: Tokenizer) -> None:
    for w in windows:
        if len(w.stream) and int(w.stream.max()) >= tok.vocab_size:
            raise DataError(f"token id {int(w.stream.max())} in the data is >= the tokenizer's vocab "
                            f"size {tok.vocab_size}: the data was prepared with another tokenizer")


# ---- host -> device -----------------------------------------------------------------------
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


def convert_records(records: list, fn: Callable, report: Report, where: str) -> list:
    out = []
    for i, r in enumerate(records):
        try:
            out.append(fn(r))
        except DataError as e:
            report.drop(str(e), f"{where}[{i}]")
            report.kept -= 1
    return out


def padding_fraction(examples: list) -> float:
    segs = [e["segment_ids"] for e in examples if "segment_ids" in e]
    if not segs:
        return 0.0
    total = sum(s.size for s in segs)
    return float(1.0 - sum(int((s != 0).sum()) for s in segs) / total)


def build_pipeline(cfg: DataConfig, tok: Tokenizer, seq_len: int, global_batch: int, seed: int,
                   eval_batches: int, process_index: int = 0, process_count: int = 1) -> Pipeline:
    """Any data kind -> Pipeline. text: packed windows; chat/preference/prompt: one example each."""
    if cfg.kind == "text":
        return build_text_pipeline(cfg, tok, seq_len, global_batch, seed, eval_batches,
                                   process_index, process_count)
    if global_batch % process_count:
        raise DataError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
    local = global_batch // process_count
    fn = {"chat": lambda r: chat_example(r, tok, seq_len),
          "preference": lambda r: preference_example(r, tok, seq_len),
          "prompt": lambda r: prompt_example(r, tok, cfg.max_prompt_len)}[cfg.kind]
    splits = load_splits(cfg)
    report = splits.report
    train_sets = [convert_records(t, fn, report, f"source {i}") for i, t in enumerate(splits.train)]
    if not any(train_sets):
        raise DataError(f"no usable {cfg.kind} examples ({report.summary()})")
    eval_set = convert_records([r for e in splits.eval for r in e], fn, report, "eval")
    kept = [(s, w) for s, w in zip(train_sets, splits.weights) if s]
    train_ds = make_batched([s for s, _ in kept], [w for _, w in kept], seed, local, process_index, process_count)
    eval_list = []
    if eval_set:
        n_batches = min(eval_batches, len(eval_set) // global_batch)
        if n_batches == 0:
            raise DataError(f"held-out split has {len(eval_set)} examples, fewer than one batch of "
                            f"{global_batch}; add eval data or lower train.batch_size")
        eval_ds = grain.MapDataset.source(eval_set)[process_index::process_count].batch(local, batch_fn=_stack)
        eval_list = [eval_ds[i] for i in range(n_batches)]
    all_train = [e for s in train_sets for e in s]
    stats = {"train_examples": len(all_train), "eval_examples": len(eval_set),
             "padding_fraction": padding_fraction(all_train), "sources": len(kept),
             "truncated": int(sum(1 for e in all_train if "segment_ids" in e and e["segment_ids"].reshape(-1, seq_len)[:, -1].any()))}
    return Pipeline(train_ds, eval_list, report, stats, examples=[s for s, _ in kept])
