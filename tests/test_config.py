"""Bad configs fail at load with one clear line, exit code 2, and nothing written."""

import os
import subprocess
import sys

import pytest

from jaxllm.app.cli import main
from jaxllm.config import RunConfig, load_config
from tests.conftest import ROOT

CFG = os.path.join(ROOT, "configs/runs/pretrain_tiny.yaml")

BAD = [
    (["trian.steps=3"], "unknown config key trian; did you mean 'train'"),
    (["train.stpes=3"], "unknown config key train.stpes; did you mean 'steps'"),
    (["train.steps=abc"], "train.steps='abc' must be an integer"),
    (["model.tie_embeddings=maybe"], "model.tie_embeddings='maybe' must be true or false"),
    (["optimizer.schedule=cosinus"], "did you mean 'cosine'"),
    (["model.n_heads=5"], "model.n_heads=5 is not divisible by model.n_kv_heads=2"),
    (["train.batch_size=10", "train.grad_accum=4"], "train.batch_size=10 is not divisible by train.grad_accum=4"),
    (["mesh.data=3", "mesh.fsdp=1"], "there are 8 devices"),
    (["train.batch_size=12", "mesh.fsdp=8"], "not divisible by the data-parallel size data*fsdp = 8"),
    (["train.seq_len=512"], "train.seq_len=512 exceeds model.max_seq_len=256"),
    (["objective.name=causal"], "did you mean 'causal_lm'"),
    (["optimizer.lr=-1"], "optimizer.lr=-1.0 must be > 0"),
    (["objective.xent_chunk_tokens=-8"], "objective.xent_chunk_tokens=-8 must be >= 0"),
    (["mesh.rules.mlpp=tensor"], "unknown logical axis 'mlpp'; did you mean 'mlp'"),
    (["mesh.rules.mlp=fsdpp"], "mesh axes are data, fsdp, tensor"),
    (["model.vocab_size=100"], "raise model.vocab_size to at least 1024"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "at most one of mesh.data/fsdp/tensor may be -1"),
    (["model.dtype=float64"], "model.dtype='float64': choose one of"),
    (["data.sources=[]"], "data.sources is empty"),
    (["data.sources.0.kind=jsonl"], "needs a path"),
    (["data.sources.0.demo_noise=0.5"], "demo_noise=0.5: a fraction in [0, 1], for kind=generated split=train only"),
    (["data.tokenizer=/nonexistent/tok.model"], "tokenizer file not found: /nonexistent/tok.model"),
    (["train"], "is not of the form key.sub=value"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_config_one_line(tmp_path, capsys, overrides, expected):
    out = tmp_path / "run"
    rc = main(["train", CFG, f"output_dir={out}", *overrides])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err, err
    assert expected in err, err
    assert not out.exists(), "a config error must not write anything"


def test_bad_yaml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    assert main(["train", str(bad)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_composition_and_overrides(tmp_path):
    cfg = load_config(CFG, ["model.n_layers=2", "optimizer.lr=1e-3", "mesh.rules.mlp=null"])
    assert isinstance(cfg, RunConfig)
    assert cfg.model.d_model == 128 and cfg.model.n_layers == 2  # model file included by path
    assert cfg.optimizer.lr == 1e-3 and cfg.mesh.rules == {"mlp": None}
    inc = tmp_path / "run.yaml"
    inc.write_text(f"include: [{CFG}]\ntrain:\n  steps: 7\n")
    cfg2 = load_config(str(inc))
    assert cfg2.train.steps == 7 and cfg2.model.n_layers == 4 and cfg2.train.batch_size == 16


def test_real_process_exit_code_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jaxllm.app.cli", "train", CFG, "train.stpes=3",
                        f"output_dir={tmp_path}/x"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
