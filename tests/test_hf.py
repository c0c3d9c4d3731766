"""Hugging Face interop: import/export of Llama, Mistral and Qwen2 checkpoints, checked against
transformers itself on tiny randomly initialised models (float32 logits, greedy generation)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from jaxllm.app.cli import main
from jaxllm.config import MeshConfig, load_config
from jaxllm.data.tokenizer import DEFAULT_TOKENIZER, EOS_ID
from jaxllm.errors import CheckpointError, ConfigError, DataError
from jaxllm.app.inference import load_model
from jaxllm.core.sampler import sample_ids
from jaxllm.app import hf
from jaxllm.core.model import rope_inv_freq
from jaxllm.objectives import make_trainer
from tests.conftest import ROOT

torch.set_num_threads(2)
TOL = 1e-4
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, rms_norm_eps=1e-5)
FAMILIES = {
    # Llama 3.1-style rope scaling; original_max_position_embeddings small so it matters at short lengths
    "llama": (LlamaConfig, LlamaForCausalLM, dict(
        max_position_embeddings=256, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    # sliding window 32 < 256 positions: jaxllm caps max_seq_len to the window
    "mistral": (MistralConfig, MistralForCausalLM, dict(max_position_embeddings=256, sliding_window=32)),
    # q/k/v biases and tied embeddings
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(max_position_embeddings=256, rope_theta=1e6,
                                                  tie_word_embeddings=True)),
}
ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
IDS = np.random.RandomState(0).randint(4, 1024, (2, 24))  # no pad (0) / eos (3) ids


def _randomize(model, seed):
    """HF init zeroes biases and sets norms to 1; random values make every mapping observable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)


def _torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (HF dir with tokenizer.model, the float32 torch model, its logits on IDS)."""
    out = {}
    for i, (fam, (cfg_cls, model_cls, extra)) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        model = model_cls(cfg_cls(**SHAPE, **extra)).float().eval()
        _randomize(model, i)
        d = str(tmp_path_factory.mktemp(fam))
        model.save_pretrained(d)
        shutil.copyfile(DEFAULT_TOKENIZER, os.path.join(d, "tokenizer.model"))
        out[fam] = (d, model, _torch_logits(model))
    return out


def _logits(model, ids=IDS):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(ids)))


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_import_logits_match_transformers(hf_dirs, fam):
    d, tmodel, ref = hf_dirs[fam]
    model = hf.load(d)
    cfg = model.cfg
    diff = float(np.abs(_logits(model) - ref).max())
    print(f"\n[hf parity] {fam}: import max|logit diff| = {diff:.3g} (logit scale {np.abs(ref).max():.3g})")
    assert diff <= TOL
    assert cfg.d_model == 64 and cfg.n_heads == 4 and cfg.n_kv_heads == 2 and cfg.head_dim == 16
    if fam == "llama":
        assert cfg.rope_scaling_factor == 8.0 and cfg.rope_original_max_len == 64 and not cfg.qkv_bias
        hf_inv = tmodel.model.rotary_emb.inv_freq.numpy()
        assert np.abs(np.asarray(rope_inv_freq(cfg)) - hf_inv).max() <= 1e-6 * hf_inv.max()
        assert np.abs(hf_inv - 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)).max() > 1e-3  # scaling is live
    if fam == "mistral":
        assert cfg.max_seq_len == 32  # sliding window 32 < 256 positions
    if fam == "qwen2":
        assert cfg.qkv_bias and cfg.tie_embeddings and not hasattr(model, "lm_head")
        assert np.abs(np.asarray(model.blocks[0].attn.q_bias[...])).max() > 0.05


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_export_reloads_in_transformers(hf_dirs, tmp_path, fam):
    d, _, ref = hf_dirs[fam]
    model = hf.load(d, scan_layers=fam == "llama")  # stacked layers export too
    out = hf.save(model, str(tmp_path / "export"), arch=fam)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    with open(os.path.join(out, "config.json")) as f:
        exported = json.load(f)
    assert exported["architectures"] == [ARCH[fam]]
    reloaded = AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(reloaded).__name__ == ARCH[fam]
    diff = float(np.abs(_torch_logits(reloaded) - ref).max())
    print(f"\n[hf parity] {fam}: export->transformers max|logit diff| = {diff:.3g}")
    assert diff <= TOL
    # the config mapping round-trips (scan_layers is jaxllm-only)
    assert hf.hf_config_to_model(exported, scan_layers=model.cfg.scan_layers) == model.cfg


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_greedy_generation_matches_transformers(hf_dirs, fam):
    d, tmodel, _ = hf_dirs[fam]
    model = hf.load(d)
    prompts = IDS[:, :8]
    tmodel.generation_config.eos_token_id = None  # run the full length; compare up to jaxllm's EOS
    tmodel.generation_config.pad_token_id = 0
    with torch.no_grad():
        gen = tmodel.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                              max_new_tokens=12, do_sample=False)[:, 8:].numpy().tolist()
    expected = [row[:row.index(EOS_ID)] if EOS_ID in row else row for row in gen]
    got = sample_ids(model, prompts.tolist(), max_new=12)
    print(f"\n[hf parity] {fam}: greedy tokens compared per row = {[len(r) for r in got]}")
    assert got == expected
    assert sum(map(len, got)) >= 12


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_fsdp_tensor_mesh_import_matches_one_device(hf_dirs, fam):
    d, _, ref = hf_dirs[fam]
    mesh_cfg = MeshConfig(data=1, fsdp=4, tensor=2)
    model = hf.load(d, mesh_cfg, scan_layers=fam == "llama")
    q = model.blocks.attn.q if model.cfg.scan_layers else model.blocks[0].attn.q
    spec = tuple(q[...].sharding.spec)
    assert "fsdp" in spec and "tensor" in spec and len(q[...].sharding.device_set) == 8, spec
    assert len(model.embed[...].sharding.device_set) == 8
    one = _logits(hf.load(d))
    sharded = _logits(model)
    print(f"\n[hf parity] {fam}: fsdp4 x tensor2 vs 1 device max|diff| = {np.abs(sharded - one).max():.3g}")
    assert np.abs(sharded - one).max() <= TOL  # float32 reduction order differs across shards
    assert np.abs(sharded - ref).max() <= TOL


def test_bf16_and_sharded_safetensors(hf_dirs, tmp_path):
    _, tmodel, _ = hf_dirs["llama"]
    src = str(tmp_path / "bf16")
    bf = LlamaForCausalLM(tmodel.config)
    bf.load_state_dict(tmodel.state_dict())
    bf.to(torch.bfloat16).save_pretrained(src, max_shard_size="60KB")
    assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
    model = hf.load(src, scan_layers=True)
    assert model.cfg.dtype == "bfloat16" and model.cfg.param_dtype == "float32"
    want = bf.model.layers[1].self_attn.k_proj.weight.detach().float().numpy()  # [K*Dh, D]
    got = np.asarray(model.blocks.attn.k[...][1], np.float32)  # [D, K, Dh]
    np.testing.assert_array_equal(got.reshape(64, -1).T, want)  # bf16 -> f32 is exact
    out = hf.save(model, str(tmp_path / "out"), "llama", dtype="bfloat16", max_shard_bytes=40_000)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, t in bf.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_config_and_weight_mismatches_fail_clearly(hf_dirs, tmp_path, capsys):
    d, _, _ = hf_dirs["llama"]
    bad = str(tmp_path / "bad")
    shutil.copytree(d, bad)
    with open(os.path.join(bad, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_attention_heads"] = 8  # 8 heads x head_dim 16, but q_proj holds 4 heads
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*\(64, 64\).*\(128, 64\)"):
        hf.load(bad)
    assert main(["convert", "hf-to-jaxllm", "--hf-dir", bad, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "q_proj" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "never")

    with pytest.raises(ConfigError, match="unsupported architecture 'GPT2LMHeadModel'"):
        hf.hf_config_to_model({**cfg, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        hf.hf_config_to_model({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="arch qwen2"):
        hf.model_to_hf_config(hf.load(hf_dirs["qwen2"][0]).cfg, "llama")

    # tokenizer.json only: a clear pointer to --tokenizer
    tj = str(tmp_path / "tj")
    shutil.copytree(d, tj)
    os.remove(os.path.join(tj, "tokenizer.model"))
    open(os.path.join(tj, "tokenizer.json"), "w").write("{}")
    with pytest.raises(DataError, match="--tokenizer"):
        hf.hf_to_checkpoint(tj, str(tmp_path / "tj_out"))

    # never write into a non-empty directory
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        hf.save(hf.load(d), str(busy))
    assert main(["convert", "hf-to-jaxllm", "--hf-dir", d, "--out", str(busy)]) == 2
    assert os.listdir(busy) == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_cli_import_is_a_normal_checkpoint_that_trains(hf_dirs, tmp_path):
    d, _, ref = hf_dirs["llama"]
    out = str(tmp_path / "imported")
    assert main(["convert", "hf-to-jaxllm", "--hf-dir", d, "--out", out]) == 0
    assert {"checkpoints", "model.yaml", "tokenizer.model"} <= set(os.listdir(out))

    model, tok, meta = load_model(out)
    assert meta["stage"] == "hf_import" and meta["parent"] == d and meta["step"] == 0
    assert tok.path == os.path.join(out, "tokenizer.model")
    assert np.abs(_logits(model) - ref).max() <= TOL

    cfg = load_config(f"{ROOT}/configs/runs/sft_tiny.yaml", [
        f"model={out}/model.yaml", f"output_dir={tmp_path}/sft", f"checkpoint.init_from={out}", f"data.tokenizer={out}/tokenizer.model",
        "train.steps=3", "train.batch_size=8", "eval.every=0", "data.eval_sources=[]", "data.eval_fraction=0",
        "objective.eval_generate=0", "checkpoint.every=0", "checkpoint.async_save=false", "train.progress=false"])
    assert cfg.model == model.cfg
    trainer = make_trainer(cfg)
    state, parent = trainer.fresh_state()
    assert parent.endswith("checkpoints/0")
    np.testing.assert_array_equal(np.asarray(state.params["embed"][...]), np.asarray(model.embed[...]))
    result = trainer.run()
    assert result["step"] == 3 and np.isfinite(result["loss"])
    assert result["loss"] < 10.0  # an initialised random tiny model sits near ln(1024) = 6.9

    # and back: the imported checkpoint exports to transformers unchanged
    back = str(tmp_path / "back")
    assert main(["convert", "jaxllm-to-hf", "--ckpt", out, "--out", back, "--arch", "llama"]) == 0
    assert "tokenizer.model" in os.listdir(back)
    reloaded = AutoModelForCausalLM.from_pretrained(back).float().eval()
    assert np.abs(_torch_logits(reloaded) - ref).max() <= TOL
    with safe_open(os.path.join(back, "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" in f.keys()
