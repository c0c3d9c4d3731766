"""Typed run configs: dataclasses loaded from YAML, composed by path, overridden by `a.b=value`.

A run config is a tree of small dataclasses. Loading goes: YAML file -> `include:` files and
section paths (`model: ../models/tiny.yaml`) merged in -> command-line overrides -> typed
conversion (unknown keys and wrong types fail with a suggestion) -> per-section `validate()`.
Checks that need the devices (mesh product, batch divisibility) live in `core.sharding.make_mesh`.
Nothing here is global: the loaded `RunConfig` is passed explicitly to whoever needs a part of it.
This module, config_rl.py (the RL sections) and errors.py are the bottom of the import graph:
config imports no other jaxllm module. Checks against registries (objective names and options, reward functions, RL algorithm
names) run in `jaxllm.objectives.validate(cfg)`, still before anything is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from jaxllm.config_rl import RewardConfig, RLConfig  # noqa: F401 (RL sections, re-exported)
from jaxllm.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    vocab_size: int = 1024
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    mlp_dim: int = 384
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    # Llama-3 style RoPE frequency scaling; 0 = off (used by HF imports of Llama 3.1+).
    rope_scaling_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"
    # What the backward pass recomputes; names as in MaxText (core/attention.py REMAT_POLICIES):
    # none | minimal (= save_dots) | save_dot_with_context_except_mlp | save_dot_except_mlp |
    # save_dot_except_mlpwi | save_qkv_proj | save_out_proj | full, and the host-offloading
    # minimal_offloaded | qkv_proj_offloaded (saved activations wait in pinned host memory).
    remat: Literal["none", "full", "save_dots", "minimal", "minimal_offloaded", "save_dot_with_context_except_mlp",
                   "save_dot_except_mlp", "save_dot_except_mlpwi", "save_qkv_proj", "qkv_proj_offloaded",
                   "save_out_proj"] = "none"
    scan_layers: bool = False
    # xla (reference einsum path), cudnn (GPU flash), splash (Pallas TPU kernel; interpret mode off
    # TPU), auto (splash on TPU, jax.nn.dot_product_attention elsewhere). See core/attention.py.
    attention_impl: Literal["xla", "cudnn", "splash", "auto"] = "xla"
    # Cast each scanned layer's weights to the compute dtype inside the layer loop (model._pin_in_loop).
    # Measured with jaxllm plan: -3.5 GiB per chip for Llama-3-8B on v5p-8 (fsdp); but on the 405B
    # fsdp x tensor config XLA then kept the saved layer inputs twice (110.3 vs 58.7 GiB), so
    # configs/models/llama3_405b.yaml turns it off.
    cast_in_loop: bool = True
    attention_block_q: int = 512  # splash tile sizes (multiples of 128; cut to divide the sequence)
    attention_block_kv: int = 512

    def validate(self) -> None:
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "mlp_dim", "max_seq_len")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads="
                              f"{self.n_kv_heads}; grouped-query attention needs n_heads = k * n_kv_heads")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("attention_block_q", "attention_block_kv"):
            if getattr(self, name) < 128 or getattr(self, name) % 128:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be a positive multiple of 128 "
                                  f"(the TPU lane width), e.g. 512")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}: choose one of {', '.join(DTYPES)}")


@dataclass
class MeshConfig:
    """Mesh axis sizes. ICI axes are within a slice/host, DCN axes across slices/hosts. -1 means
    "fill with the remaining devices" (at most one ICI axis may be -1)."""
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    # Overrides of the logical->mesh rules table (sharding.DEFAULT_RULES), e.g. {mlp: null}.
    rules: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        ici = [self.data, self.fsdp, self.tensor]
        if sum(1 for s in ici if s == -1) > 1:
            raise ConfigError("mesh: at most one of mesh.data/fsdp/tensor may be -1 (fill)")
        for name in ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor"):
            v = getattr(self, name)
            if v == 0 or v < -1 or (name.startswith("dcn") and v < 1):
                raise ConfigError(f"mesh.{name}={v}: use a positive size" +
                                  ("" if name.startswith("dcn") else " or -1 to fill"))


@dataclass
class SourceConfig:
    """One data source. `kind` picks the reader; the other fields are read by that reader."""
    kind: Literal["default", "text", "jsonl", "parquet", "arrayrecord", "tfds", "generated"] = "default"
    path: str = ""  # file, directory or glob (text/jsonl/parquet/arrayrecord)
    text_field: str = "text"
    doc_per: Literal["file", "line"] = "file"  # for kind=text
    name: str = ""  # tfds dataset name, or generated task name
    split: str = "train"
    data_dir: str = ""  # tfds data_dir
    weight: float = 1.0  # mixture weight
    size: int = 0  # generated datasets: number of examples (0 = the generator's default)
    demo_noise: float = 0.0  # generated train split: fraction of demonstrations written `answer: X` (data/tasks.py)
    chunk_bytes: int = 0  # jsonl / text lines: bytes per read unit (0 = 1 MiB); the unit of shuffling and sharding

    def validate(self) -> None:
        if self.kind in ("text", "jsonl", "parquet", "arrayrecord") and not self.path:
            raise ConfigError(f"data source kind={self.kind} needs a path: set data.sources[i].path")
        if self.kind in ("tfds", "generated") and not self.name:
            raise ConfigError(f"data source kind={self.kind} needs a name: set data.sources[i].name")
        if self.weight <= 0:
            raise ConfigError(f"data source weight={self.weight} must be > 0")
        if not 0.0 <= self.demo_noise <= 1.0 or (self.demo_noise and (self.kind, self.split) != ("generated", "train")):
            raise ConfigError(f"data source demo_noise={self.demo_noise}: a fraction in [0, 1], for kind=generated "
                              f"split=train only (held-out answers stay bare)")


@dataclass
class DataConfig:
    kind: Literal["text", "chat", "preference", "prompt"] = "text"
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    eval_sources: list[SourceConfig] = field(default_factory=list)  # empty: hold out eval_fraction
    eval_fraction: float = 0.05
    tokenizer: str = ""  # SentencePiece .model, HF tokenizer.json or a dir holding one; "" = the embedded default
    max_prompt_len: int = 64  # prompt kind: prompts are left-padded/truncated to this many tokens
    num_threads: int = 2  # grain read threads per process (or per worker)
    prefetch: int = 4  # batches (and units) buffered ahead
    workers: int = 0  # grain worker processes that read, tokenize and pack; 0 = in the training process
    packing: Literal["auto", "first_fit", "none"] = "auto"  # chat/preference examples packed into rows; auto: chat first_fit, preference none
    max_examples_per_row: int = 16  # packed preference rows: at most this many examples per row

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: name at least one source")
        for s in self.sources + self.eval_sources:
            s.validate()
        if self.workers < 0 or min(self.num_threads, self.prefetch, self.max_examples_per_row) < 1:
            raise ConfigError("data.workers must be >= 0 and data.num_threads, prefetch, max_examples_per_row >= 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must be in [0, 1)")


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "sgd", "adafactor"] = "adamw"
    lr: float = 3e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clipping; 0 = off

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")


@dataclass
class CheckpointConfig:
    every: int = 200  # save every N steps (and at the end); 0 = only at the end
    keep: int = 3  # keep the last K
    async_save: bool = True
    init_from: str = ""  # another run's output_dir or checkpoint step dir
    init_mode: Literal["params", "full"] = "params"  # params only, or the full train state

    def validate(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # global, in sequences
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per step; batch_size is split across them
    log_every: int = 10
    nan_policy: Literal["skip", "stop"] = "skip"
    stop_at: int = 0  # stop (with a checkpoint) after this step; the schedule still spans `steps`
    progress: bool = True  # progress bar on interactive terminals
    spike_factor: float = 0.0  # log a loss spike when loss > spike_factor x its running mean; 0 = off
    preemption_grace_s: float = 300.0  # after SIGTERM: checkpoint at the next step boundary, exit 0 within this
    # Test hooks: steps (1-based) whose loss, or one gradient, is made NaN inside the jitted step.
    debug_nonfinite_steps: list[int] = field(default_factory=list)
    debug_nonfinite_in: Literal["loss", "grad"] = "loss"

    def validate(self) -> None:
        _positive(self, "steps", "batch_size", "seq_len", "grad_accum", "log_every", "preemption_grace_s")
        if self.spike_factor and self.spike_factor <= 1.0:
            raise ConfigError(f"train.spike_factor={self.spike_factor} must be > 1 (e.g. 2.0), or 0 to disable")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by "
                              f"train.grad_accum={self.grad_accum}")


@dataclass
class EvalConfig:
    every: int = 100  # held-out loss every N steps; 0 = only at the end
    batches: int = 8

    def validate(self) -> None:
        if self.every < 0 or self.batches < 1:
            raise ConfigError("eval.every must be >= 0 and eval.batches >= 1")


@dataclass
class FinetuneConfig:
    """Which parameters train. full: all; partial: all but the frozen groups; lora: adapters only."""
    mode: Literal["full", "partial", "lora"] = "full"
    freeze_embeddings: bool = False  # partial: embedding (and tied head)
    freeze_layers: int = 0  # partial: the lowest N transformer blocks
    freeze: list[str] = field(default_factory=list)  # partial: regexes on param paths, e.g. "final_norm"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])  # of q k v o gate up down
    save_base: bool = True  # lora: also store the frozen base weights in each checkpoint

    def validate(self) -> None:
        if self.mode == "lora":
            bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
            if bad or not self.lora_targets:
                raise ConfigError(f"finetune.lora_targets={self.lora_targets}: choose from {', '.join(LORA_TARGETS)}")
            if self.lora_rank < 1 or not 0.0 <= self.lora_dropout < 1.0:
                raise ConfigError("finetune.lora_rank must be >= 1 and finetune.lora_dropout in [0, 1)")
        if self.mode != "partial" and (self.freeze_embeddings or self.freeze_layers or self.freeze):
            raise ConfigError(f"finetune.freeze* options need finetune.mode=partial (mode is {self.mode})")
        if self.freeze_layers < 0:
            raise ConfigError("finetune.freeze_layers must be >= 0")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class ObjectiveConfig:
    name: str = "causal_lm"  # a registered objective (jaxllm.objectives.REGISTRY)
    z_loss: float = 0.0
    # tokens per chunk of the LM head (jaxllm.core.xent), which then never materialises [B, T, V] logits:
    # fused head + cross-entropy for causal_lm / sft / masked_lm, chunked log-probs for dpo / grpo /
    # ppo and rollout scoring; 0 = plain logits path
    xent_chunk_tokens: int = 512
    mask_prob: float = 0.15  # masked_lm: fraction of tokens selected
    margin: float = 0.0  # reward model: Bradley-Terry margin
    center_coef: float = 0.0  # reward model: weight of the mean(r)^2 centering term
    beta: float = 0.1  # dpo: inverse temperature
    label_smoothing: float = 0.0  # dpo: epsilon (conservative DPO)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # dpo
    precompute_ref: bool = False  # dpo: reference log-probs computed once into the dataset
    eval_generate: int = 0  # SFT: greedy-generate this many held-out prompts at each eval (exact match)
    max_new_tokens: int = 16
    # options of the objective's own (its record's `options` dataclass, e.g. simpo's beta and gamma);
    # checked against that dataclass by jaxllm.objectives.validate, like every other key
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:  # the name is checked against the registry by objectives.validate
        if self.xent_chunk_tokens < 0:
            raise ConfigError(f"objective.xent_chunk_tokens={self.xent_chunk_tokens} must be >= 0 (0 = plain logits)")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"objective.mask_prob={self.mask_prob} must be in (0, 1)")
        if self.beta <= 0 or not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError("objective.beta must be > 0 and objective.label_smoothing in [0, 0.5)")


WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbConfig:
    """A Weights & Biases run beside metrics.jsonl, logged by process 0; `project` empty = off."""
    project: str = ""
    entity: str = ""  # "" = the logged-in user's default entity
    name: str = ""  # "" = the basename of output_dir
    tags: list[str] = field(default_factory=list)
    mode: str = ""  # online | offline | disabled; "" = wandb's own default (or the WANDB_MODE env var)

    def validate(self) -> None:
        if self.mode and self.mode not in WANDB_MODES:
            raise ConfigError(f"log.wandb.mode={self.mode!r}: choose one of {', '.join(WANDB_MODES)}, "
                              f"or leave it empty for wandb's default (WANDB_MODE)")


@dataclass
class LogConfig:
    tensorboard: bool = True  # TensorBoard events under {output_dir}/tensorboard
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        self.wandb.validate()


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    stage: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                sub.validate()
        if not self.output_dir:
            raise ConfigError("output_dir is empty: set output_dir=PATH")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}; lower train.seq_len or raise model.max_seq_len")


class Registry(dict):
    """name -> entry (an objective, an RL advantage estimator, ...), filled by `register` where
    each entry is defined. `pick` of an unknown name is a ConfigError naming the config key, with a
    suggestion and the known names."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key  # the config key that picks an entry, e.g. "rl.advantage"

    def register(self, name: str, entry: Any = None):
        """register(name, entry), or @register(name) over a function."""
        if entry is not None:
            self[name] = entry
            return entry
        return lambda fn: self.register(name, fn)

    def pick(self, name: str) -> Any:
        if name not in self:
            raise ConfigError(f"{self.key}={name!r} is not known" + _suggest(name, self) +
                              f" (known: {', '.join(sorted(self))})")
        return self[name]


def _positive(obj, *names: str) -> None:
    section = type(obj).__name__.replace("Config", "").lower()
    for n in names:
        v = getattr(obj, n)
        if v <= 0:
            raise ConfigError(f"{section}.{n}={v} must be > 0")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_config(path: str | None, overrides: list[str] = (), cls=RunConfig) -> Any:
    """YAML file + `a.b=value` overrides -> validated dataclass. Raises ConfigError."""
    raw = _load_yaml_tree(path) if path else {}
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {ov!r} is not of the form key.sub=value")
        value = _parse_scalar(value)
        if isinstance(value, str) and value.endswith((".yaml", ".yml")) and key.strip() in _SECTION_NAMES:
            value = _load_yaml_tree(value)  # `model=runs/imported/model.yaml`: a whole section from a file
            raw.pop(key.strip(), None)
        _set_dotted(raw, key.strip(), value)
    cfg = from_dict(cls, raw, prefix="")
    cfg.validate()
    return cfg


def _load_yaml_tree(path: str, _seen: tuple = ()) -> dict:
    """Reads a YAML file, resolving `include:` lists and section values given as paths."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"config include cycle through {path}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values")
    base_dir = os.path.dirname(path)
    merged: dict = {}
    includes = data.pop("include", []) or []
    for inc in [includes] if isinstance(includes, str) else includes:
        _deep_merge(merged, _load_yaml_tree(os.path.join(base_dir, inc), _seen + (path,)))
    for key, value in list(data.items()):
        # `model: ../models/tiny.yaml` loads that file as the `model` section.
        if isinstance(value, str) and value.endswith((".yaml", ".yml")) and key in _SECTION_NAMES:
            data[key] = _load_yaml_tree(os.path.join(base_dir, value), _seen + (path,))
    _deep_merge(merged, data)
    return merged


_SECTION_NAMES = ("model", "mesh", "data", "optimizer", "checkpoint", "train", "eval", "objective", "finetune", "rl",
                  "log")


def _deep_merge(into: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v
    return into


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if p.isdigit() and isinstance(node, list):
            node = node[int(p)]
            continue
        if not isinstance(node.get(p), (dict, list)):
            node[p] = {}
        node = node[p]
    last = parts[-1]
    if isinstance(node, list) and last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def from_dict(cls, raw: Any, prefix: str) -> Any:
    """Builds dataclass `cls` from a plain dict, checking every key and type."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix}{key}{_suggest(key, fields)}")
        kwargs[key] = _convert(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _convert(tp, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, name + ".")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}={value!r}: choose one of {', '.join(map(str, args))}"
                              + (_suggest(value, args) if isinstance(value, str) else ""))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_convert(args[0], v, f"{name}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-3` as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be a string")
        return str(value)
    raise ConfigError(f"{name}: unsupported config type {tp}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
