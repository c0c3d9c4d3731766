"""The bad-input catalogue (docs/errors.md), the cases not covered next to their feature: each is a
real mistake, answered by one `error:` line, exit code 2, and nothing already saved is touched."""

import os

import pytest

from jaxllm.app.cli import main
from tests.conftest import ROOT

CFG = os.path.join(ROOT, "configs/runs/pretrain_tiny.yaml")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rnd = os.urandom(70_000)
    (d / "broken.jsonl").write_text('{"text": "fine but alone"\n{not json at all\n')
    (d / "empty.jsonl").write_text("")
    (d / "corrupt.parquet").write_bytes(rnd[:3000])
    (d / "corrupt.array_record").write_bytes(rnd)
    (d / "nofield.jsonl").write_text('{"body": "a long enough document body that is not in the text field"}\n' * 20)
    (d / "bad.model").write_bytes(rnd[:5000])
    return d


CASES = [
    ("data file missing", lambda d: ["data.sources=[{kind: jsonl, path: %s/none*.jsonl}]" % d], "matches no files"),
    ("malformed JSONL", lambda d: ["data.sources=[{kind: jsonl, path: %s/broken.jsonl}]" % d], "invalid JSON"),
    ("empty dataset", lambda d: ["data.sources=[{kind: jsonl, path: %s/empty.jsonl}]" % d], "has no usable records"),
    ("corrupt Parquet", lambda d: ["data.sources=[{kind: parquet, path: %s/corrupt.parquet}]" % d],
     "not a readable Parquet file"),
    ("corrupt ArrayRecord", lambda d: ["data.sources=[{kind: arrayrecord, path: %s/corrupt.array_record}]" % d],
     "not a readable ArrayRecord file"),
    ("text field missing", lambda d: ["data.sources=[{kind: jsonl, path: %s/nofield.jsonl}]" % d],
     "field 'text' missing"),
    ("tokenizer not SentencePiece", lambda d: [f"data.tokenizer={d}/bad.model"], "is not a SentencePiece model"),
    ("TFDS dataset not built", lambda d: ["data.sources=[{kind: tfds, name: no_such_ds, data_dir: %s}]" % d],
     "not readable from data_dir"),
]


@pytest.mark.parametrize("what, overrides, message", CASES, ids=[c[0] for c in CASES])
def test_bad_data_one_line(bad_files, tmp_path, capsys, what, overrides, message):
    out = tmp_path / "run"
    assert main(["train", CFG, f"output_dir={out}", "train.steps=2", *overrides(bad_files)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err
    assert not (out / "checkpoints").exists()


def _listing(path):
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


def test_checkpoint_mistakes_leave_the_parent_untouched(pretrained, tmp_path, capsys):
    before = _listing(pretrained)
    from jaxllm.data.tokenizer import train_tokenizer
    other = train_tokenizer([f"line {i} of a different corpus with other words" for i in range(300)],
                            str(tmp_path / "other"), 300, "bpe")
    cases = [
        ([f"checkpoint.init_from={pretrained}", "model.d_model=64", "model.head_dim=16"], "has shape"),
        ([f"checkpoint.init_from={pretrained}", f"data.tokenizer={other.path}", "model.vocab_size=1024"],
         "differs from the one checkpoint"),
        ([f"checkpoint.init_from={pretrained}/checkpoints/999"], "checkpoint path not found"),
    ]
    for overrides, message in cases:
        assert main(["train", CFG, f"output_dir={tmp_path}/x", "train.steps=1", *overrides]) == 2, overrides
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err
    assert main(["generate", str(tmp_path / "nothing")]) == 2
    assert "checkpoint path not found" in capsys.readouterr().err
    assert _listing(pretrained) == before


def test_pipeline_from_unknown_stage(tmp_path, capsys):
    assert main(["pipeline", os.path.join(ROOT, "configs/pipelines/default.yaml"), f"output_dir={tmp_path}/p",
                 "--from", "sftt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --from sftt: no such stage; did you mean 'sft'?", err
