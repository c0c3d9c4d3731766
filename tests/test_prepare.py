"""`jaxllm data prepare` on Apache Beam: the drop report (same reasons and counts as the training
readers), exact/near dedup and filters, the shards read back token for token, never-overwrite,
pre-packed windows, the CLI with Beam passthrough options, the multi-process DirectRunner
giving the same documents as the in-process one, the same shards for any number of dedup rounds
and shuffle groups, and the batched MinHash equal to the per-document definition. Shards are read
with grain's ArrayRecordDataSource directly (not through jaxllm.data.sources)."""

import glob
import json
import os
import zlib

import numpy as np
import pytest

from jaxllm.config import DataConfig, SourceConfig
from jaxllm.data import prepare as prep
from jaxllm.data.prepare import PrepareOptions, prepare
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.errors import DataError

BASE = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _jsonl(path, rows) -> DataConfig:
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else json.dumps({"text": r}).encode() + b"\n")
    return DataConfig(sources=[SourceConfig(kind="jsonl", path=str(path))])


def _records(out) -> list[list[np.ndarray]]:
    """Per shard (in shard order), its int32 records."""
    import grain
    shards = sorted(glob.glob(os.path.join(out, "shard-*.array_record")))
    return [[np.frombuffer(ds[i], np.int32) for i in range(len(ds))]
            for ds in (grain.sources.ArrayRecordDataSource([p]) for p in shards)]


def _texts(out, tok) -> list[str]:
    return [tok.decode(r) for shard in _records(out) for r in shard]


def test_bad_records_counted_like_the_readers_and_good_ones_survive(tmp_path, tok):
    good = [f"document number {i} about topic {i * 7} " * 3 for i in range(6)]
    cfg = _jsonl(tmp_path / "d.jsonl", good[:3] + [
        b'{"text": "broken json\n', b'{"body": "no text field here at all"}\n',
        b'{"text": "\xff\xfe invalid utf8"}\n', json.dumps({"text": "   "}).encode() + b"\n", b"[1, 2, 3]\n"]
        + good[3:])
    out = str(tmp_path / "out")
    summary = prepare(cfg, out, PrepareOptions(shards=2, min_chars=5, near_dup_threshold=0, workers=1))
    rep = summary["report"]
    assert rep["read"] == 11 and rep["kept"] == 6 and summary["documents"] == 6
    assert rep["dropped"] == {"invalid JSON": 1, "field 'text' missing or not text": 1, "invalid UTF-8": 1,
                              "empty document": 1, "JSON line is not an object": 1}
    assert rep["first_seen"]["invalid JSON"].endswith("d.jsonl:4")
    assert rep["first_seen"]["JSON line is not an object"].endswith("d.jsonl:8")
    # every good document survives, token for token: BOS + encode(text) + EOS
    recs = [r for shard in _records(out) for r in shard]
    expect = [[tok.bos_id] + tok.encode(g) + [tok.eos_id] for g in good]
    assert sorted(r.tolist() for r in recs) == sorted(expect)
    assert summary["tokens"] == sum(map(len, expect))
    meta = json.load(open(os.path.join(out, "prepared.json")))
    assert meta["documents"] == 6 and meta["shards"] == 2 and "packed_windows" not in meta
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "out"]  # no temp dir left behind
    # never overwrite: a second run into the same directory fails and touches nothing
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    with pytest.raises(DataError, match="already exists"):
        prepare(cfg, out, PrepareOptions(workers=1))
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before


def test_dedup_and_filters(tmp_path, tok):
    rows = [BASE, BASE + "  ", BASE.replace("fifteen", "sixteen"), "short", "same line\n" * 10,
            "ctrl\x00\x07 chars kept " + BASE[::-1], "x" * 500,
            # a cluster of mutual near duplicates (one word changed at the end): exactly one survives
            "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron",
            "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi pi",
            "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi rho",
            "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi sigma"]
    cfg = _jsonl(tmp_path / "e.jsonl", rows)
    out = str(tmp_path / "out")
    s = prepare(cfg, out, PrepareOptions(min_chars=10, max_chars=400, near_dup_threshold=0.7, workers=1))
    rep = s["report"]
    assert rep["read"] == 11 and rep["kept"] == 3
    assert rep["dropped"] == {"exact duplicate": 1, "near duplicate": 4, "repetitive (duplicated lines)": 1,
                              "shorter than 10 chars": 1, "longer than 400 chars": 1}
    # the first of each kind is kept (smallest doc id = corpus order); reasons located by line
    assert rep["first_seen"]["exact duplicate"].endswith("e.jsonl:2")
    assert rep["first_seen"]["near duplicate"].endswith("e.jsonl:3")
    texts = sorted(_texts(out, tok))
    assert texts == sorted([BASE, "ctrl chars kept " + BASE[::-1], rows[7]])  # control chars removed


def test_pack_windows_and_cli_with_beam_options(tmp_path, tok):
    from jaxllm.app.cli import main
    docs = [f"packed document {i} says {' '.join(['word%d' % (i * j % 17) for j in range(i + 5)])}" for i in range(30)]
    _jsonl(tmp_path / "p.jsonl", docs)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"data": {"sources": [{"kind": "jsonl", "path": str(tmp_path / "p.jsonl")}]}}))
    argv = ["data", "prepare", str(cfg), "--out", str(tmp_path / "win"), "--shards", "1", "--min-chars", "5",
            "--near-dup-threshold", "0", "--pack-windows", "15", "--workers", "2",
            "--", "--direct_running_mode=in_memory"]  # passthrough: in-process despite --workers 2
    assert main(argv) == 0
    meta = json.load(open(tmp_path / "win" / "prepared.json"))
    assert meta["packed_windows"] == 15 and meta["options"]["beam_args"] == ["--direct_running_mode=in_memory"]
    (windows,) = _records(str(tmp_path / "win"))
    assert all(len(w) == 16 for w in windows) and meta["records"] == len(windows)
    # the windows are the shard's documents (in corpus order) concatenated, the tail dropped
    stream = np.concatenate([[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in docs]).astype(np.int32)
    assert meta["tokens"] == len(stream) and meta["packed_dropped_tokens"] == len(stream) % 16
    np.testing.assert_array_equal(np.concatenate(windows), stream[:len(windows) * 16])


def test_multi_process_runner_matches_in_process(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_BYTES", 1500)  # several units per file, so the workers share work
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(200)]
    docs = [" ".join(rng.choice(words, 30)) for _ in range(80)]
    rows = docs + docs[:10] + [d.rsplit(" ", 1)[0] + " changed" for d in docs[10:20]] + ["tiny"] * 3
    cfg = _jsonl(tmp_path / "m.jsonl", [rows[i] for i in rng.permutation(len(rows))])
    outs = {}
    for w in (1, 2):
        s = prepare(cfg, str(tmp_path / f"w{w}"), PrepareOptions(shards=3, min_chars=10, near_dup_threshold=0.7,
                                                                 workers=w))
        outs[w] = (s["report"], _texts(str(tmp_path / f"w{w}"), tok))
    assert outs[1][0] == outs[2][0]
    assert outs[1][0]["dropped"]["exact duplicate"] == 10 and outs[1][0]["dropped"]["shorter than 10 chars"] == 3
    assert outs[1][0]["dropped"]["near duplicate"] == 10
    assert outs[1][1] == outs[2][1]  # same documents, same shards, same order
    assert len(set(outs[1][1])) == len(outs[1][1]) == outs[1][0]["kept"]


def test_dedup_rounds_give_the_same_output(tmp_path, monkeypatch):
    """K = 3 dedup rounds (1/3 of the shuffle keys each) write the same shard bytes and the same
    report as one round, with exact and near duplicates (and chains of them) across units."""
    monkeypatch.setattr(prep, "CHUNK_BYTES", 1200)  # several units: duplicates cross unit boundaries
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(150)]
    docs = [" ".join(rng.choice(words, 25)) for _ in range(60)]
    near = [d.rsplit(" ", 1)[0] + " changed" for d in docs[:12]]
    rows = docs + docs[5:15] + near + [n.rsplit(" ", 1)[0] + " again" for n in near[:4]] + near[:3]
    # ... and, at the end, a unit with nothing left after cleaning
    cfg = _jsonl(tmp_path / "k.jsonl", [rows[i] for i in rng.permutation(len(rows))] + ["tiny"] * 100)
    outs = {}
    for k, groups in ((1, 64), (3, 64), (2, 1)):  # K rounds, at least `groups` shuffle groups each
        monkeypatch.setattr(prep.dedup, "GROUPS", groups)
        out = str(tmp_path / f"k{k}")
        s = prepare(cfg, out, PrepareOptions(shards=3, min_chars=10, near_dup_threshold=0.7, workers=1,
                                             dedup_partitions=k))
        assert s["dedup_partitions"] == k
        shards = {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if f.startswith("shard-")}
        meta = json.load(open(os.path.join(out, "prepared.json")))
        outs[k] = shards, {key: v for key, v in meta.items() if key not in ("options", "seconds", "dedup_partitions")}
        assert sorted(os.listdir(out)) == ["prepared.json", *shards]  # no work files left
    assert outs[1][1]["report"]["dropped"]["exact duplicate"] == 13
    assert outs[1][1]["report"]["dropped"]["near duplicate"] >= 12
    assert outs[1] == outs[3] == outs[2]
    # the budget picks K: 1 when the shuffles fit, more when not; a cluster runner always 1
    assert prep.dedup.choose_partitions(1000, 16, 2 << 30, 0, []) == 1
    assert prep.dedup.choose_partitions(10**7, 16, 2 << 30, 0, ["--direct_num_workers=2"]) > 1
    assert prep.dedup.choose_partitions(10**7, 16, 2 << 30, 0, ["--runner=DataflowRunner"]) == 1
    assert prep.dedup.choose_partitions(10**7, 16, 2 << 30, 0, ["--runner", "DirectRunner"]) > 1


def _reference_signature(mh, text: str) -> np.ndarray:
    """MinHash as defined (and first written): per document, crc32 + 1 per word, word 5-gram
    shingle hashes, min over shingles of (a h + b) % (2^61 - 1) per permutation, low 32 bits."""
    words = text.lower().split() or [""]
    n = max(len(words) - 4, 1)
    wh = np.zeros(n + 4, np.uint64)
    wh[:len(words)] = [zlib.crc32(w.encode()) + 1 for w in words]
    with np.errstate(over="ignore"):
        h = sum(wh[k:k + n] * mh._MULT[k] for k in range(5))
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
        h >>= np.uint64(4)
        return ((np.outer(mh.a, h) + mh.b[:, None]) % np.uint64(mh._PRIME)).min(axis=1).astype(np.uint32)


def test_batched_minhash_equals_the_per_document_definition(monkeypatch):
    rng = np.random.default_rng(3)
    chars = [chr(c) for c in [*range(33, 127), *range(0xC0, 0x250), *range(0x391, 0x3CA), *range(0x4E00, 0x4E40)]]

    def word(n):
        return "".join(rng.choice(chars, n))
    texts = ["", "   \n ", "one", "a b c d", "a b c d e", "ΟΔΟΣ Straße ÉCOLE İstanbul", BASE, BASE.upper(),
             word(300) + " tail", " ".join(word(int(k)) for k in rng.integers(1, 60, 400))]
    texts += [" ".join(word(int(k)) for k in rng.integers(1, 12, int(m))) for m in rng.integers(0, 40, 60)]
    mh = prep.dedup.MinHash(64, 16)
    want = np.stack([_reference_signature(mh, t) for t in texts])
    np.testing.assert_array_equal(mh.signatures(texts), want)
    np.testing.assert_array_equal(mh.signature(texts[6]), want[6])
    monkeypatch.setattr(mh, "CHUNK", 5)  # blocks of a few shingles, a long document alone in its block
    np.testing.assert_array_equal(mh.signatures(texts), want)
    # word hashes: zlib's crc32 + 1 for every word, empty and long ones (hashed one by one) included
    words = ["", "a", "é", *(word(int(k)) for k in rng.integers(1, 120, 300))]
    got = prep.dedup.word_hashes(" ".join(words).encode())
    np.testing.assert_array_equal(got, [zlib.crc32(w.encode()) + 1 for w in words])
    # the Mersenne fold's rare case: a value in [P, P + 7] before the fold (here exactly P, P + 3)
    small = prep.dedup.MinHash(4, 2)
    p = small._PRIME
    small.a, small.b = np.array([1, 1, 3, 7], np.uint64), np.array([0, 3, 0, 1], np.uint64)
    h = np.array([p, 5, 2 * p, p - 3, 9, 1 << 59], np.uint64)
    n = np.array([2, 1, 3])
    with np.errstate(over="ignore"):
        full = (np.outer(small.a, h) + small.b[:, None]) % np.uint64(p)
    np.testing.assert_array_equal(small.minhash(h, n), np.minimum.reduceat(full, [0, 2, 3], axis=1).T.astype(np.uint32))
