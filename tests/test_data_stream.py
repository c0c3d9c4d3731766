"""Streaming input at scale: units read by byte range, packed SFT/preference losses equal the padded
ones, exact resume with grain worker processes, two OS processes reading disjoint halves of each
epoch, and a training run on a corpus several times its memory budget."""

import json
import os
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import DataConfig, ModelConfig, ObjectiveConfig, SourceConfig
from jaxllm.data import tasks
from jaxllm.data.pipeline import _Plan, build_pipeline, chat_example, preference_example
from jaxllm.data.sources import Report, open_source
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.train.objective import LossContext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_line_units_read_every_line_exactly_once(tmp_path):
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": "w" * int(n)}) for n in rng.integers(1, 40, 200)]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for chunk in (1, 7, 64, 500, 1 << 20):
        src = open_source(SourceConfig(kind="jsonl", path=str(path), chunk_bytes=chunk))
        rep = Report()
        got = [r["text"] for i in range(len(src)) for r in src.read(i, rep)]
        assert got == [json.loads(l)["text"] for l in lines], chunk
        assert rep.read == rep.kept == 200


def _rows(cfg, tok, seq_len, examples, rows):
    """Finite list of unpacked examples -> the pipeline's packed rows (stacked)."""
    plan = _Plan(cfg, tok, seq_len, "records", rows)
    out = list(plan.rows_of(grain.MapDataset.source(examples).to_iter_dataset()))
    return {k: np.stack([o[k] for o in out]) for k in out[0]}


def _loss(fn, model, batch, frozen=None):
    ctx = LossContext(rng=jax.random.key(0), cfg=ObjectiveConfig(), frozen=frozen)
    out = fn(model, {k: jnp.asarray(v) for k, v in batch.items()}, ctx)
    return float(out.loss_sum), float(out.denom), {k: float(v[0]) for k, v in out.metrics.items()}


def test_packed_sft_loss_equals_padded(tok):
    from jaxllm.core.model import Transformer
    from jaxllm.data.pipeline import chat_sequence
    from jaxllm.objectives.lm import causal_lm_loss
    T = 64
    recs = tasks.generate("mix", "train", 24)
    padded = {k: np.stack([chat_example(r, tok, T)[k] for r in recs]) for k in ("inputs", "targets", "loss_mask",
                                                                               "segment_ids", "positions")}
    cfg = DataConfig(kind="chat", packing="first_fit")
    packed = _rows(cfg, tok, T, [chat_sequence(r, tok, T) for r in recs], rows=4)
    assert len(packed["inputs"]) < len(recs) / 2  # several examples per row
    assert packed["segment_ids"].max() > 2
    model = Transformer(ModelConfig(n_layers=2, vocab_size=tok.vocab_size), nnx.Rngs(0))
    a, b = _loss(causal_lm_loss, model, padded), _loss(causal_lm_loss, model, packed)
    assert a[1] == b[1] and a[1] > 0  # same target tokens
    np.testing.assert_allclose(a[0], b[0], rtol=2e-5)


@pytest.mark.parametrize("name", ["dpo", pytest.param("reward_bt", marks=pytest.mark.slow)])
def test_packed_preference_loss_equals_padded(tok, name):
    from jaxllm.objectives import REGISTRY, model_class
    from jaxllm.data.pipeline import preference_sequences
    T = 128
    recs = tasks.generate("add", "train", 20)
    padded = {k: np.stack([preference_example(r, tok, T)[k] for r in recs]) for k in ("inputs", "targets", "loss_mask",
                                                                                     "segment_ids", "positions")}
    cfg = DataConfig(kind="preference", packing="first_fit", max_examples_per_row=8)
    packed = _rows(cfg, tok, T, [preference_sequences(r, tok, T) for r in recs], rows=3)
    assert len(packed["inputs"]) < len(recs) / 2
    mcfg = ModelConfig(n_layers=2, vocab_size=tok.vocab_size)
    model = model_class(name)(mcfg, nnx.Rngs(0))
    frozen = None
    if name == "dpo":  # a reference that differs from the policy, so the loss is not log 2
        frozen = {"reference": nnx.state(model_class(name)(mcfg, nnx.Rngs(1)))}
    fn = REGISTRY[name].loss
    a, b = _loss(fn, model, padded, frozen), _loss(fn, model, packed, frozen)
    assert a[1] == b[1]  # same number of examples (pairs)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-4)
    for k in a[2]:
        np.testing.assert_allclose(a[2][k], b[2][k], rtol=1e-4, atol=1e-5)


def _jsonl(path, n, width=128, fields=lambda i: {"text": f"document {i} " + "lorem ipsum dolor sit amet " * 3}):
    """n JSONL lines all exactly `width` bytes (so a unit of k*width bytes holds k records)."""
    with open(path, "w") as f:
        for i in range(n):
            line = json.dumps(fields(i))
            assert len(line) < width
            f.write(line + " " * (width - 1 - len(line)) + "\n")


def test_resume_is_exact_with_worker_processes(tmp_path, tok):
    _jsonl(tmp_path / "c.jsonl", 400)
    cfg = DataConfig(sources=[SourceConfig(kind="jsonl", path=str(tmp_path / "c.jsonl"), chunk_bytes=1024)],
                     eval_fraction=0.05, workers=1)
    take = lambda it, n: [next(it) for _ in range(n)]  # noqa: E731
    straight = build_pipeline(cfg, tok, 32, 4, seed=1, eval_batches=1).iterator()
    full = take(straight, 6)
    straight.close()
    first = build_pipeline(cfg, tok, 32, 4, seed=1, eval_batches=1).iterator()
    take(first, 3)
    state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
    first.close()
    resumed = build_pipeline(cfg, tok, 32, 4, seed=1, eval_batches=1).iterator(state)
    rest = take(resumed, 3)
    resumed.close()
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(full[3:], rest) for k in x)
    from jaxllm.data.pipeline import report_in_state
    assert report_in_state(state).read > 0  # the worker's running drop report rides in the state


_SHARD = textwrap.dedent("""
    import json, sys
    from jaxllm.config import DataConfig, SourceConfig
    from jaxllm.data.pipeline import build_pipeline
    from jaxllm.data.tokenizer import Tokenizer
    if __name__ == "__main__":
        path, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        cfg = DataConfig(kind="prompt", sources=[SourceConfig(kind="jsonl", path=path, text_field="*", chunk_bytes=512)],
                         eval_fraction=0.0, workers=int(sys.argv[4]))
        it = build_pipeline(cfg, Tokenizer(), 32, 8, seed=5, eval_batches=0, process_index=pid, process_count=2).iterator()
        seen = [str(t) for _ in range(8) for t in next(it)["prompt_text"]]  # 8 steps x 4 rows = its half of an epoch
        it.close()
        json.dump(seen, open(out, "w"))
""")


def test_two_processes_read_disjoint_halves_of_each_epoch(tmp_path):
    # 64 records in 16 units of 4: each process owns 8 units, i.e. 32 records = 8 steps of 4 rows
    _jsonl(tmp_path / "p.jsonl", 64, fields=lambda i: {"prompt": f"{i}+1=", "answer": str(i + 1)})
    (tmp_path / "shard.py").write_text(_SHARD)
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "shard.py"), str(tmp_path / "p.jsonl"), str(pid),
                               str(tmp_path / f"seen{pid}.json"), str(pid)], cwd=ROOT) for pid in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    seen = [json.load(open(tmp_path / f"seen{pid}.json")) for pid in range(2)]
    assert len(set(seen[0])) == len(seen[0]) == 32 and len(set(seen[1])) == 32
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {f"{i}+1=" for i in range(64)}


_MEASURE = textwrap.dedent("""
    import resource, subprocess, sys
    rc = subprocess.run(sys.argv[1:]).returncode
    print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "RC", rc)
""")


def test_training_on_a_corpus_larger_than_its_memory_budget(tmp_path):
    """3.3 GB of JSONL (50 links to one 64 MiB file) against a 1.25 GiB budget for the whole
    training process: the corpus is streamed, never held."""
    block = []
    rng = np.random.default_rng(0)
    words = np.array("the of and a to in is was for on that with by as at from it his an were".split())
    for i in range(4000):
        block.append(json.dumps({"text": f"{i} " + " ".join(rng.choice(words, 40))}) + "\n")
    block = "".join(block).encode()
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "part-000.jsonl", "wb") as f:
        for _ in range((64 << 20) // len(block)):
            f.write(block)
    for i in range(1, 50):
        os.symlink(data / "part-000.jsonl", data / f"part-{i:03d}.jsonl")
    corpus = sum(os.path.getsize(p) for p in data.iterdir())
    assert corpus > 3e9
    budget = 1.25 * (1 << 30)
    (tmp_path / "measure.py").write_text(_MEASURE)
    cmd = [sys.executable, str(tmp_path / "measure.py"), sys.executable, "-m", "jaxllm.app.cli", "train",
           "configs/runs/pretrain_tiny.yaml", f"output_dir={tmp_path / 'run'}",
           f"data.sources=[{{kind: jsonl, path: '{data}/*.jsonl'}}]", "train.steps=4", "eval.every=0",
           "eval.batches=1", "checkpoint.every=0", "train.progress=false"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    line = [l for l in out.stdout.splitlines() if l.startswith("MAXRSS_KB")][0].split()
    assert line[3] == "0", out.stderr[-2000:]
    peak = int(line[1]) * 1024
    assert peak < budget, f"peak RSS {peak / 2**30:.2f} GiB >= budget {budget / 2**30:.2f} GiB"
    metrics = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert max(m.get("step", 0) for m in metrics) == 4
