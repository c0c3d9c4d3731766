"""RLAIF labelling: sample K completions per prompt from a policy and rank them with an AI judge.

Judges: a reward-model checkpoint (rank by its score), or a judge LM asked which of two answers is
better, its preference read from the log-probs of the choice tokens "A" / "B" (both orders, to
cancel position bias); completions are ranked by their summed win probabilities. The output is a
JSONL preference dataset ({"prompt", "chosen": best, "rejected": worst, "ranking": all distinct
completions best first, "scores"}) that the RM and DPO stages read with
`data.sources=[{kind: jsonl, path: FILE, text_field: "*"}]` (they train on chosen vs rejected).
"""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.app.inference import load_model
from jaxllm.core import storage
from jaxllm.core.arrays import positions_from_segments
from jaxllm.core.loading import single_device_mesh
from jaxllm.core.sampler import completions as completion_tokens
from jaxllm.core.sampler import generate_ids, pad_prompts, prompt_masks
from jaxllm.core.sharding import make_rules
from jaxllm.data.chat import pair, prompt_ids
from jaxllm.errors import ConfigError, DataError
from jaxllm.rl.rewards import _score_last, load_scalar_model

JUDGE_TEMPLATE = ("Question: {prompt}\nAnswer A: {a}\nAnswer B: {b}\n"
                  "Which answer is better? Reply with A or B.")


def _rm_scores(judge_path: str, tok, prompts: list, completions: list) -> np.ndarray:
    graphdef, params = load_scalar_model(judge_path, single_device_mesh(), make_rules(), tok)
    seqs = [pair(tok, p, c)[0] for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    inputs = np.full((len(seqs), width), tok.pad_id, np.int32)  # right-padded; seg marks the real tokens
    seg = np.zeros_like(inputs)
    for i, s in enumerate(seqs):
        inputs[i, :len(s)], seg[i, :len(s)] = s, 1
    pos = positions_from_segments(seg)
    return np.asarray(_score_last(graphdef, params, jnp.asarray(inputs), jnp.asarray(pos), jnp.asarray(seg)))


def _choice_ids(tok) -> tuple[int, int]:
    a, b = tok.encode("A"), tok.encode("B")
    if len(a) != 1 or len(b) != 1:
        raise ConfigError("judge LM tokenizer must encode 'A' and 'B' as single tokens")
    return a[0], b[0]


def lm_preference(model, tok, prompt: str, a: str, b: str) -> float:
    """P(a better than b) from the judge LM, averaged over both presentation orders."""
    id_a, id_b = _choice_ids(tok)
    ids = [prompt_ids(tok, JUDGE_TEMPLATE.format(prompt=prompt, a=x, b=y)) for x, y in ((a, b), (b, a))]
    batch = pad_prompts(ids, pad_id=tok.pad_id)
    seg = prompt_masks(ids)
    pos = positions_from_segments(seg)
    logits = np.asarray(model(jnp.asarray(batch), jnp.asarray(pos), jnp.asarray(seg))[:, -1])
    two = logits[:, [id_a, id_b]]
    p = np.exp(two - two.max(1, keepdims=True))
    p = p / p.sum(1, keepdims=True)
    return float(0.5 * (p[0, 0] + p[1, 1]))


def label(policy: str, prompts: list, out: str, k: int = 4, judge: str = "", judge_kind: str = "rm",
          max_new: int = 16, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
          batch: int = 64) -> dict:
    """Writes `out` (JSONL) and returns a summary. Never overwrites an existing file."""
    if storage.exists(out):
        raise DataError(f"{out} already exists; pick a new --out (labels are never overwritten)")
    if k < 2:
        raise ConfigError(f"--k={k}: need at least 2 completions per prompt to rank")
    if not prompts:
        raise DataError("no prompts to label: the config's data sources gave no records with a 'prompt'")
    model, tok, _ = load_model(policy)
    stops = tok.chat.stop_ids
    graphdef, state = nnx.split(model)
    completions: list[list[str]] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        ids = [prompt_ids(tok, p) for p in chunk for _ in range(k)]
        res = generate_ids(graphdef, state, pad_prompts(ids, pad_id=tok.pad_id), max_new,
                           rng=jax.random.key(seed + start), temperature=temperature, top_p=top_p, eos_id=stops,
                           pad_id=tok.pad_id, prompt_mask=prompt_masks(ids))
        rows = [tok.decode(r) for r in completion_tokens(res.tokens, res.mask, stops)]
        completions += [rows[i * k:(i + 1) * k] for i in range(len(chunk))]

    if judge_kind == "rm":
        flat_p = [p for p, cs in zip(prompts, completions) for _ in cs]
        flat_c = [c for cs in completions for c in cs]
        scores = _rm_scores(judge, tok, flat_p, flat_c).reshape(len(prompts), k)
    elif judge_kind == "lm":
        judge_model, judge_tok, _ = load_model(judge)
        scores = np.zeros((len(prompts), k))
        for n, (p, cs) in enumerate(zip(prompts, completions)):
            for i, j in itertools.combinations(range(k), 2):
                pij = lm_preference(judge_model, judge_tok, p, cs[i], cs[j])
                scores[n, i] += pij
                scores[n, j] += 1 - pij
    else:
        raise ConfigError(f"--judge-kind={judge_kind!r}: use rm or lm")

    written = ties = 0
    lines = []  # one JSON line per prompt, written whole at the end
    for p, cs, sc in zip(prompts, completions, scores):
        # identical texts carry no preference: keep each text once, with its best score
        best: dict = {}
        for c, s in zip(cs, sc):
            best[c] = max(best.get(c, -np.inf), float(s))
        if len(best) < 2:
            ties += 1
            continue
        ranked = sorted(best.items(), key=lambda kv: -kv[1])
        lines.append(json.dumps({"prompt": p, "chosen": ranked[0][0], "rejected": ranked[-1][0],
                                 "ranking": [c for c, _ in ranked], "scores": [s for _, s in ranked]}) + "\n")
        written += 1
    storage.write_atomic(out, "".join(lines))  # the file appears whole or not at all
    return {"prompts": len(prompts), "written": written, "dropped_identical": ties, "out": out}
