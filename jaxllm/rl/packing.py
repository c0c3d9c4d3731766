"""First-fit packing of rollout sequences for the RL train step (`data.packing=first_fit`).

A rollout mini-batch is b sequences laid out [b, P+M-1] (left-padded prompt + completion, see
`rollout.layout`); most of a row is padding when prompts and completions vary in length. Packing
moves each sequence's real span (contiguous: the prompt's real tokens, then the generated ones)
into rows of `width` (= train.seq_len) by first fit, keeping every per-token array aligned
(old/ref log-probs, advantages, values, returns). `segment_ids` number the sequences in a row
(no token attends across them), `positions` restart at 0 for each, and `sequence_ids` give each
token its sequence's index in the mini-batch (b on padding), so sequence-level reductions (GSPO's
ratio, sequence-mean aggregation, Dr. GRPO's count) stay exactly the padded ones
(`algorithms.Sequences`).

The row count is rounded up to `row_multiple` times a power of two (row_multiple = the batch
axis's device count), so the train step compiles for a few shapes, not one per mini-batch.
"""

from __future__ import annotations

import numpy as np

from jaxllm.errors import ConfigError


def spans(segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[b, T] segment ids (1 on real tokens) -> (start, length) of each row's one real span."""
    real = segment_ids > 0
    length = real.sum(1)
    start = np.where(length > 0, real.argmax(1), 0)
    ends = np.where(length > 0, real.shape[1] - real[:, ::-1].argmax(1), 0)
    if np.any(ends - start != length):
        raise ValueError("rollout rows must hold one contiguous real span (prompt, then completion)")
    return start, length


def first_fit(lengths: np.ndarray, width: int) -> list[list[int]]:
    """Sequence indices, in order, each into the first row with room -> rows of indices."""
    rows, free = [], []
    for i, n in enumerate(lengths):
        if n > width:
            raise ConfigError(f"a rollout sequence of {n} tokens does not fit train.seq_len={width}")
        for r, room in enumerate(free):
            if room >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(width - n)
    return rows


def bucket(n_rows: int, row_multiple: int) -> int:
    """Rows rounded up to row_multiple * 2^k (a few compiled shapes)."""
    units = -(-max(n_rows, 1) // row_multiple)
    return row_multiple * (1 << (units - 1).bit_length())


def pack_rollout(batch: dict, width: int, row_multiple: int = 1) -> dict:
    """A mini-batch {key: [b, T]} of per-token arrays -> packed {key: [R, width]} + sequence_ids."""
    start, length = spans(batch["segment_ids"])
    rows = first_fit(length, width)
    R = bucket(len(rows), row_multiple)
    b = len(length)
    out = {k: np.zeros((R, width), v.dtype) for k, v in batch.items()}
    out["sequence_ids"] = np.full((R, width), b, np.int32)
    for r, members in enumerate(rows):
        at = 0
        for k, i in enumerate(members):
            n, s = length[i], start[i]
            for key, v in batch.items():
                out[key][r, at:at + n] = v[i, s:s + n]
            out["segment_ids"][r, at:at + n] = k + 1
            out["sequence_ids"][r, at:at + n] = i
            at += n
    return out


def padding_fraction(batch: dict) -> float:
    return float((batch["segment_ids"] == 0).mean())
