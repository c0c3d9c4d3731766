"""Checkpoints flow between runs: init_from (params / full), lineage, tokenizer checks, CLI."""

import os

import jax
import numpy as np
import pytest

from jaxllm.app.cli import main
from jaxllm.data.tokenizer import train_tokenizer
from jaxllm.errors import CheckpointError
from jaxllm.objectives import make_trainer
from tests.conftest import tiny_config

COMMON = ["train.steps=4", "checkpoint.every=0", "eval.every=0", "model.n_layers=2", "train.batch_size=8"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("parent"), *COMMON)
    t = make_trainer(cfg)
    t.run()
    return cfg, jax.tree.map(np.asarray, jax.device_get(t.state.params))


def test_init_from_params_starts_a_new_stage(parent, tmp_path, capsys):
    pcfg, pparams = parent
    child_cfg = tiny_config(tmp_path, *COMMON, f"checkpoint.init_from={pcfg.output_dir}", "stage=child",
                            "train.steps=2")
    child = make_trainer(child_cfg)
    state, _, lineage = child.initial_state()
    got = jax.tree.map(np.asarray, jax.device_get(state.params))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(pparams)))
    assert int(state.step) == 0  # params only: a fresh optimizer and step count
    child.run()
    assert main(["info", child_cfg.output_dir]) == 0
    out = capsys.readouterr().out
    assert "stage: child" in out and "[pretrain, step 4]" in out  # lineage reaches the parent


def test_init_from_with_other_tokenizer_fails(parent, tmp_path):
    pcfg, _ = parent
    from jaxllm.data.corpus import default_documents
    tok = train_tokenizer(default_documents()[:60], str(tmp_path / "other"), vocab_size=512)
    cfg = tiny_config(tmp_path, *COMMON, f"checkpoint.init_from={pcfg.output_dir}", f"data.tokenizer={tok.path}")
    with pytest.raises(CheckpointError, match="differs from the one checkpoint"):
        make_trainer(cfg).initial_state()


def test_init_from_other_shape_names_the_tensor(parent, tmp_path):
    pcfg, _ = parent
    cfg = tiny_config(tmp_path, *COMMON, f"checkpoint.init_from={pcfg.output_dir}", "model.mlp_dim=256")
    with pytest.raises(CheckpointError, match="tensor 'blocks/0/mlp/down' has shape"):
        make_trainer(cfg).initial_state()


def test_output_dir_of_another_run_is_refused_untouched(parent, tmp_path, capsys):
    pcfg, _ = parent
    before = sorted(os.listdir(os.path.join(pcfg.output_dir, "checkpoints")))
    rc = main(["train", os.path.join(os.path.dirname(__file__), "..", "configs/runs/pretrain_tiny.yaml"),
               f"output_dir={pcfg.output_dir}", "model.n_layers=3", "train.steps=1"])
    assert rc == 2 and "holds checkpoints of another run" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(pcfg.output_dir, "checkpoints"))) == before


def test_missing_init_from_path(tmp_path, capsys):
    rc = main(["train", os.path.join(os.path.dirname(__file__), "..", "configs/runs/pretrain_tiny.yaml"),
               f"output_dir={tmp_path}/x", f"checkpoint.init_from={tmp_path}/nothing", "train.steps=1"])
    assert rc == 2 and "checkpoint path not found" in capsys.readouterr().err


def test_generate_cli(parent, capsys):
    pcfg, _ = parent
    assert main(["generate", pcfg.output_dir, "--prompt", "The ", "--max-new", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- 'The '") and len(out.splitlines()) >= 2
