"""The pipeline report: `report.md` + one PNG of training curves per stage, the held-out metric
before/after per stage, greedy samples from every stage's model for the same prompts, wall time
per stage and the checkpoint lineage."""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import numpy as np

from jaxllm.app.inference import load_model
from jaxllm.core import checkpoint as ckpt_lib
from jaxllm.core import storage
from jaxllm.core.monitor import read_metrics
from jaxllm.core.sampler import sample_ids
from jaxllm.data.chat import prompt_ids
from jaxllm.objectives import REGISTRY, build_stage

def unigram_entropy(run_cfg) -> float:
    """Entropy of the held-out tokens' unigram distribution: the loss of a model that ignores context."""
    batches = build_stage(run_cfg).pipeline.eval_batches
    toks = np.concatenate([b["targets"][b["loss_mask"] == 1] for b in batches])
    p = np.bincount(toks).astype(float)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def _evals(rows):
    return [r for r in rows if any(k.startswith("eval_") for k in r)]


def _plot(name: str, rows: list, keys: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    evals = _evals(rows)
    eval_keys = [k for k in ("eval_loss", "eval_reward", "eval_kl", "eval_exact_match", "eval_pair_accuracy",
                             "eval_reward_accuracy") if any(k in r for r in evals)]
    panels = [(k, [(r["step"], r[k]) for r in rows if k in r]) for k in keys]
    panels += [(k, [(r["step"], r[k]) for r in evals if k in r]) for k in eval_keys]
    panels = [(k, pts) for k, pts in panels if pts]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 2.8), squeeze=False)
    for ax, (k, pts) in zip(axes[0], panels):
        x, y = zip(*pts)
        ax.plot(x, y, marker="o" if k.startswith("eval_") else None, ms=3)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    storage.write_atomic(path, buf.getvalue())
    plt.close(fig)


def _samples(stage_out: str, kind: str, rep) -> list[tuple[str, str]]:
    """Greedy completions of the report's prompts: "text" prompts, "chat" prompts, or none."""
    if not kind:
        return []
    model, tok, _ = load_model(stage_out)
    if kind == "text":
        prompts = rep.text_prompts
        ids = [tok.encode(p, bos=True) for p in prompts]
        stop = tok.eos_ids
    else:
        prompts = rep.prompts
        ids = [list(prompt_ids(tok, p)) for p in prompts]
        stop = tok.chat.stop_ids
    outs = sample_ids(model, ids, rep.max_new_tokens, stop_ids=stop, pad_id=tok.pad_id)
    return [(p, tok.decode(o)) for p, o in zip(prompts, outs)]


@dataclasses.dataclass
class StageRun:
    """A finished stage as the report sees it."""
    name: str
    kind: str  # "train" or "tokenizer"
    out_dir: str
    done: dict  # its stage_done.json: wall_s, result
    run_cfg: Any = None  # RunConfig of a train stage


def write_report(output_dir: str, stages: list, rep) -> str:
    """report/report.md (+ PNG curves, verdicts.json) under `output_dir` for the finished `stages`
    (StageRun); `rep`: the pipeline's report section (prompts, text_prompts, max_new_tokens)."""
    out_dir = storage.join(output_dir, "report")
    storage.makedirs(out_dir)
    lines = ["# Pipeline report", "", f"Output: `{storage.join(output_dir)}`", "",
             "| stage | objective | held-out metric | before | after | moved the right way | wall s |",
             "|---|---|---|---|---|---|---|"]
    details, total_wall, verdicts = [], 0.0, {}
    for s in stages:
        done = s.done
        total_wall += done["wall_s"]
        if s.kind == "tokenizer":
            lines.append(f"| {s.name} | tokenizer | vocab size | - | {done['result']['vocab_size']} | - | "
                         f"{done['wall_s']:.0f} |")
            continue
        run_cfg = s.run_cfg
        obj = run_cfg.objective.name
        objective = REGISTRY.pick(obj)
        rows = read_metrics(s.out_dir)
        evals = _evals(rows)
        metric, higher, what = objective.headline
        vals = [r[metric] for r in evals if metric in r]
        before, after = (vals[0], vals[-1]) if vals else (None, None)
        extra = ""
        if metric == "eval_loss":  # a loss in nats/token: compare with a model that ignores context
            base_h = unigram_entropy(run_cfg)
            extra = f" (unigram baseline {base_h:.2f})"
            ok = after is not None and after < base_h
        else:
            ok = vals and ((after > before) if higher else (after < before))
        verdicts[s.name] = bool(ok)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        lines.append(f"| {s.name} | {obj} | {what}{extra} | {fmt(before)} | {fmt(after)} | "
                     f"{'yes' if ok else 'NO'} | {done['wall_s']:.0f} |")
        png = f"{s.name}.png"
        _plot(s.name, rows, list(objective.curves), storage.join(out_dir, png))
        kl = [r["eval_kl"] for r in evals if "eval_kl" in r]
        detail = [f"## {s.name} ({obj})", "", f"![{s.name}]({png})", ""]
        if kl:
            detail.append(f"KL to the reference on held-out prompts (nats/sequence): {kl[0]:.3f} -> {kl[-1]:.3f}")
            detail.append("")
        for prefix, how in (("eval_reward_", "greedy" if run_cfg.rl.eval_temperature == 0 else
                             f"T={run_cfg.rl.eval_temperature}"), ("eval_sampled_reward_", f"sampled at T={run_cfg.rl.temperature}")):
            terms = sorted({k for r in evals for k in r if k.startswith(prefix) and metric == "eval_reward"})
            if terms:  # each reward term on its own: a rising total can hide a falling verifiable term
                detail.append(f"Reward terms (held-out, {how}, before -> after): " + ", ".join(
                    f"{k[len(prefix):]} {evals[0][k]:.3f} -> {evals[-1][k]:.3f}" for k in terms))
                detail.append("")
        samples = _samples(s.out_dir, objective.report_samples, rep)
        if samples:
            detail += ["| prompt | greedy completion |", "|---|---|"]
            detail += [f"| `{p!r}` | `{c!r}` |" for p, c in samples]
            detail.append("")
        chain = ckpt_lib.lineage(s.out_dir)
        detail.append("Lineage: " + " <- ".join(f"{stage or '?'}@{step}" for _, stage, step in chain))
        detail.append("")
        details += detail
    lines += ["", f"Total wall time: {total_wall:.0f} s.", ""] + details
    path = storage.join(out_dir, "report.md")
    storage.write_atomic(path, "\n".join(lines) + "\n")
    storage.write_atomic(storage.join(out_dir, "verdicts.json"), json.dumps(verdicts))
    return path
