"""Hugging Face config.json <-> jaxllm ModelConfig (Llama / Mistral / Qwen2 families)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from jaxllm.config import ModelConfig
from jaxllm.errors import ConfigError

ARCHS = {  # HF architecture name -> model_type
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SHORT_ARCH = {v: k for k, v in ARCHS.items()}  # llama -> LlamaForCausalLM
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32",
           "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


# ---- configs --------------------------------------------------------------------------------
def arch_name(arch: str) -> str:
    """'llama' / 'LlamaForCausalLM' -> 'LlamaForCausalLM'."""
    if arch in ARCHS:
        return arch
    if arch.lower() in SHORT_ARCH:
        return SHORT_ARCH[arch.lower()]
    raise ConfigError(f"unsupported architecture {arch!r}; supported: {', '.join(ARCHS)} "
                      f"(or {', '.join(SHORT_ARCH)})")


def _rope_params(c: dict) -> tuple[float, dict]:
    """(rope_theta, scaling dict) from a v4 (`rope_theta` + `rope_scaling`) or v5 (`rope_parameters`)
    config."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json rope_scaling/rope_parameters must be a mapping, got {params!r}")
    theta = c.get("rope_theta") or params.get("rope_theta") or 10000.0
    return float(theta), params


def hf_config_to_model(config_json: dict, **overrides) -> ModelConfig:
    """A HF `config.json` (as a dict) -> ModelConfig. `overrides` set other ModelConfig fields
    (scan_layers, remat, dtype, param_dtype, ...). Params default to float32 (the jaxllm norm for
    training; bf16 -> f32 is exact); the compute dtype follows the checkpoint's dtype."""
    c = config_json
    arch = (c.get("architectures") or [None])[0] or SHORT_ARCH.get(c.get("model_type", ""))
    if arch not in ARCHS:
        raise ConfigError(f"unsupported architecture {arch!r} (model_type {c.get('model_type')!r}); "
                          f"supported: {', '.join(ARCHS)}")
    need = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                        "vocab_size") if k not in c]
    if need:
        raise ConfigError(f"config.json lacks {', '.join(need)}; is it a {arch} config?")
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"config.json hidden_act={act!r}: jaxllm's MLP is SwiGLU (silu) only")
    if arch != "Qwen2ForCausalLM" and (c.get("attention_bias") or c.get("mlp_bias")):
        raise ConfigError(f"config.json attention_bias/mlp_bias=true: {arch} with projection biases is not "
                          f"supported (jaxllm has q/k/v biases only, as in Qwen2)")
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"config.json partial_rotary_factor={c['partial_rotary_factor']} is not supported")
    theta, rope = _rope_params(c)
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    scaling = {}
    if rope_type == "llama3":
        try:
            scaling = dict(rope_scaling_factor=float(rope["factor"]),
                           rope_low_freq_factor=float(rope["low_freq_factor"]),
                           rope_high_freq_factor=float(rope["high_freq_factor"]),
                           rope_original_max_len=int(rope["original_max_position_embeddings"]))
        except KeyError as e:
            raise ConfigError(f"config.json llama3 rope scaling lacks {e.args[0]!r}") from None
    elif rope_type != "default":
        raise ConfigError(f"config.json rope type {rope_type!r} is not supported; supported: default, llama3")
    D, H = int(c["hidden_size"]), int(c["num_attention_heads"])
    max_len = int(c.get("max_position_embeddings") or 2048)
    # jaxllm attention has no sliding window. Up to the window length a sliding-window layer equals
    # full causal attention, so an active window smaller than the context caps max_seq_len to it.
    window = c.get("sliding_window")
    if arch == "Qwen2ForCausalLM":  # Qwen2 only slides when use_sliding_window (and on upper layers)
        active = bool(c.get("use_sliding_window")) or "sliding_attention" in (c.get("layer_types") or ())
    else:
        active = window is not None
    if active and window and int(window) < max_len:
        max_len = int(window)
    dt = _DTYPES.get(str(c.get("dtype") or c.get("torch_dtype") or "float32").replace("torch.", ""), "float32")
    cfg = ModelConfig(
        vocab_size=int(c["vocab_size"]), d_model=D, n_layers=int(c["num_hidden_layers"]), n_heads=H,
        n_kv_heads=int(c.get("num_key_value_heads") or H), head_dim=int(c.get("head_dim") or D // H),
        mlp_dim=int(c["intermediate_size"]), max_seq_len=max_len, rope_theta=theta,
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM", init_std=float(c.get("initializer_range", 0.02)),
        dtype=dt, param_dtype="float32", **scaling)
    try:
        cfg = dataclasses.replace(cfg, **overrides)
    except TypeError as e:
        raise ConfigError(f"model override: {e}") from None
    cfg.validate()
    return cfg


def model_to_hf_config(cfg: ModelConfig, arch: str = "LlamaForCausalLM", dtype: Optional[str] = None,
                       tokenizer=None) -> dict:
    """ModelConfig -> HF config.json dict. Special ids are `tokenizer`'s (default: jaxllm's default
    tokenizer); a pad that is only jaxllm's fallback is written as null, as HF Llama configs have it.
    Writes the rope settings both v4-style (rope_theta, rope_scaling) and v5-style (rope_parameters)."""
    from jaxllm.data.tokenizer import Tokenizer
    tok = tokenizer or Tokenizer()
    eos = tok.eos_ids[0] if len(tok.eos_ids) == 1 else list(tok.eos_ids)
    arch = arch_name(arch)
    if cfg.qkv_bias and arch != "Qwen2ForCausalLM":
        raise ConfigError(f"this model has q/k/v biases (model.qkv_bias=true); {arch} has none: export "
                          f"with arch qwen2")
    dt = dtype or cfg.dtype
    if dt not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"export dtype {dt!r}: choose float32, bfloat16 or float16")
    scaling = None
    if cfg.rope_scaling_factor > 0:
        scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                   "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_len}
    out = {
        "architectures": [arch], "model_type": ARCHS[arch], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default", **(scaling or {})},
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "attention_dropout": 0.0, "use_cache": True, "torch_dtype": dt, "dtype": dt,
        "bos_token_id": tok.bos_id, "eos_token_id": eos, "pad_token_id": None if tok.pad_is_fallback else tok.pad_id,
    }
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif arch == "MistralForCausalLM":
        out.update(sliding_window=None)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    return out
