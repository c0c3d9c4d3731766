"""Data layer: tokenizer, packing, chat masks, deterministic resume, multi-process shards, TFDS,
bad records, mixtures."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.app.cli import main
from jaxllm.config import DataConfig, ModelConfig, SourceConfig
from jaxllm.data import chat, tasks
from jaxllm.data.pipeline import build_pipeline
from jaxllm.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from jaxllm.errors import DataError
from jaxllm.core.model import Transformer, attention_mask

TEXT = ["The quick brown fox jumps over the lazy dog.\nSecond line\twith a tab.",
        "Numbers 12345 and symbols {}[]() are kept; ünïcödé too — and emoji 🙂."] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_trained_tokenizer_round_trips_and_reserves_specials(tmp_path):
    for model_type in ("bpe", "unigram"):
        from jaxllm.data.corpus import default_documents
        t = train_tokenizer(TEXT + default_documents()[:40], str(tmp_path / model_type), vocab_size=400,
                            model_type=model_type)
        for text in TEXT[:2]:
            assert t.decode(t.encode(text)) == text
        assert [t.specials[s] for s in SPECIAL_TOKENS] == [4, 5, 6, 7, 8]
        assert (t.pad_id, t.unk_id, t.bos_id, t.eos_id) == (0, 1, 2, 3)
        assert t.encode("<|user|>") == [t.specials["<|user|>"]]  # one token, never split


def test_tokenizer_cli(tmp_path, capsys):
    src = tmp_path / "a.txt"
    from jaxllm.data.corpus import default_documents
    src.write_text("\n".join(TEXT + default_documents()[:40]))
    assert main(["tokenizer", "train", "--input", str(src), "--out", str(tmp_path / "tok"),
                 "--vocab-size", "400"]) == 0
    assert Tokenizer(str(tmp_path / "tok.model")).vocab_size == 400


def test_packing_never_attends_across_documents(tok):
    cfg = DataConfig(sources=[SourceConfig(kind="default")], eval_fraction=0.1)
    p = build_pipeline(cfg, tok, seq_len=128, global_batch=8, seed=0, eval_batches=1)
    assert p.stats["padding_fraction"] == 0.0
    batch = next(p.iterator())
    row = next(i for i in range(8) if len(set(batch["segment_ids"][i])) > 1)
    seg = batch["segment_ids"][row]
    mask = np.asarray(attention_mask(jnp.asarray(seg[None]), jnp.asarray(seg[None]), causal=True))[0, 0]
    cross = seg[:, None] != seg[None, :]
    assert not mask[cross].any()  # the model's mask forbids every cross-document pair
    # positions restart at each document boundary, and no target predicts across one
    starts = np.nonzero(np.diff(seg))[0] + 1
    assert all(batch["positions"][row][s] == 0 for s in starts)
    assert all(batch["loss_mask"][row][s - 1] == 0 for s in starts)
    # functional check: changing the first document does not change logits of the second
    model = Transformer(ModelConfig(n_layers=2), nnx.Rngs(0))
    x = jnp.asarray(batch["inputs"][row][None])
    s, pos = jnp.asarray(seg[None]), jnp.asarray(batch["positions"][row][None])
    x2 = x.at[0, : starts[0]].set(5)
    a, b = model(x, pos, s), model(x2, pos, s)
    np.testing.assert_allclose(a[0, starts[0]:], b[0, starts[0]:], atol=1e-5)
    assert not np.allclose(a[0, : starts[0]], b[0, : starts[0]])


def test_chat_loss_mask_is_exactly_the_assistant_turns(tok):
    rec = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="},
                        {"role": "assistant", "content": "4"}, {"role": "user", "content": "reverse ab"},
                        {"role": "assistant", "content": "ba"}]}
    ids, out_mask = chat.render(tok, rec["messages"])
    expected = [t for m in rec["messages"] if m["role"] == "assistant"
                for t in tok.encode(m["content"]) + [tok.specials["<|end|>"]]]
    assert list(ids[out_mask == 1]) == expected
    from jaxllm.data.pipeline import chat_example
    ex = chat_example(rec, tok, seq_len=64)
    assert list(ex["targets"][ex["loss_mask"] == 1]) == expected  # targets aligned, pads excluded
    assert ex["loss_mask"][ex["segment_ids"] == 0].sum() == 0


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_iterator_resume_is_exact(tok, kind):
    src = SourceConfig(kind="default") if kind == "text" else SourceConfig(kind="generated", name="mix", size=300)
    cfg = DataConfig(kind=kind, sources=[src], eval_fraction=0.0)
    p = build_pipeline(cfg, tok, 64, 8, seed=3, eval_batches=1)
    full = _take(p.iterator(), 12)
    it = p.iterator()
    first = _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # as stored in the checkpoint
    rest = _take(build_pipeline(cfg, tok, 64, 8, seed=3, eval_batches=1).iterator(state), 7)
    assert _equal(full, first + rest)
    other_seed = _take(build_pipeline(cfg, tok, 64, 8, seed=4, eval_batches=1).iterator(), 1)
    assert not _equal(full[:1], other_seed)


def test_two_processes_see_disjoint_halves_of_each_epoch(tok):
    cfg = DataConfig(kind="chat", sources=[SourceConfig(kind="generated", name="mix", size=64)], eval_fraction=0.0,
                     packing="none")
    seen = []
    for pid in range(2):
        p = build_pipeline(cfg, tok, 32, 8, seed=0, eval_batches=1, process_index=pid, process_count=2)
        rows = [r.tobytes() for b in _take(p.iterator(), 8) for r in b["inputs"]]  # 8 steps x 8 = one epoch
        seen.append(rows)
    assert len(set(seen[0]) & set(seen[1])) == 0
    everything = build_pipeline(cfg, tok, 32, 8, seed=0, eval_batches=1)
    epoch = {r.tobytes() for b in _take(everything.iterator(), 8) for r in b["inputs"]}
    assert set(seen[0]) | set(seen[1]) == epoch and len(epoch) == 64


def test_tfds_dataset_built_locally_is_read(tmp_path, tok):
    import tensorflow_datasets as tfds

    class TinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, d in enumerate(TEXT * 5):
                yield i, {"text": f"{i}: {d}"}

    TinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = DataConfig(sources=[SourceConfig(kind="tfds", name="tiny_text", data_dir=str(tmp_path))],
                     eval_fraction=0.0)
    p = build_pipeline(cfg, tok, seq_len=32, global_batch=4, seed=0, eval_batches=1)
    it = p.iterator()
    text = tok.decode(next(it)["inputs"].reshape(-1))
    for _ in range(60):
        next(it)
    assert p.drop_report(it.get_state()).read > 30  # read by index, a record at a time
    assert "fox" in text or "Numbers" in text or "line" in text


def test_weighted_mixture(tok):
    a = SourceConfig(kind="generated", name="add", size=200, weight=3.0)
    b = SourceConfig(kind="generated", name="reverse", size=200, weight=1.0)
    p = build_pipeline(DataConfig(kind="prompt", sources=[a, b], eval_fraction=0.0), tok, 32, 20, 0, 1)
    it = p.iterator()
    texts = [t for _ in range(10) for t in next(it)["prompt_text"]]
    share = sum("+" in t for t in texts) / len(texts)
    assert 0.7 <= share <= 0.8


def test_generated_tasks_have_disjoint_splits():
    train = {r["prompt"] for r in tasks.generate("mix", "train")}
    test = {r["prompt"] for r in tasks.generate("mix", "test")}
    assert len(test) == 300 and not train & test
    r = tasks.generate("add", "test", 5)[0]
    a, b = map(int, r["prompt"][:-1].split("+"))
    assert int(r["answer"]) == a + b and r["rejected"] != r["answer"]


def test_demo_noise_rewrites_only_train_demonstrations(tok):
    clean, noisy = tasks.generate("mix", "train"), tasks.generate("mix", "train", demo_noise=0.5)
    assert [{k: r[k] for k in ("task", "prompt", "answer", "rejected")} for r in noisy] == clean
    chatty = [r for r in noisy if "response" in r]
    assert 0.45 < len(chatty) / len(noisy) < 0.55 and not any("response" in r for r in clean)
    assert all(r["response"] == tasks.ANSWER_PREFIX + r["answer"] for r in chatty)
    assert tasks.generate("mix", "test", demo_noise=0.5) == tasks.generate("mix", "test")
    assert tasks.generate("mix", "train", demo_noise=0.5) == noisy  # deterministic
    # SFT imitates the response; the eval answer stays the bare one
    src = SourceConfig(kind="generated", name="mix", size=64, demo_noise=1.0)
    p = build_pipeline(DataConfig(kind="chat", sources=[src], eval_fraction=0.0, packing="none"), tok, 48, 8, 0, 1)
    row = next(p.iterator())
    targets = [tok.decode([int(t) for t, m in zip(ids, mask) if m]) for ids, mask in zip(row["targets"], row["loss_mask"])]
    assert all(t.startswith(tasks.ANSWER_PREFIX.strip()) for t in targets), targets
    # RL prompts from the same noisy source keep the bare reference answer
    p = build_pipeline(DataConfig(kind="prompt", sources=[src], eval_fraction=0.0), tok, 48, 8, 0, 1)
    answers = [str(a) for a in next(p.iterator())["answer"]]
    assert answers and not any(a.startswith(tasks.ANSWER_PREFIX.strip()) for a in answers), answers


def test_missing_and_empty_sources(tmp_path, tok):
    with pytest.raises(DataError, match="matches no files"):
        build_pipeline(DataConfig(sources=[SourceConfig(kind="jsonl", path=str(tmp_path / "none*.jsonl"))]),
                       tok, 32, 4, 0, 1)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no usable records"):
        build_pipeline(DataConfig(sources=[SourceConfig(kind="jsonl", path=str(tmp_path / "empty.jsonl"))]),
                       tok, 32, 4, 0, 1)
