"""Hugging Face interop: Llama / Mistral / Qwen2 checkpoints <-> jaxllm models and checkpoints.

Import reads `config.json` and the safetensors files (single or sharded via
`model.safetensors.index.json`) one tensor at a time, converts it to jaxllm's layout and places it
directly onto its target NamedSharding (from the same logical-axis rules the trainer uses), so the
host holds at most one tensor (one layer of one weight for stacked `scan_layers` models).
Export streams the other way: one parameter is gathered to the host, converted and appended to the
safetensors file whose header was written up front. The tokenizer travels with the weights:
`load_tokenizer` picks the HF dir's tokenizer.model or tokenizer.json (+ tokenizer_config.json, ...),
`hf_to_checkpoint` copies it into the run dir, and exports write its special ids into config.json.

Layout (HF torch Linear weights are [out, in]; jaxllm contracts the leading dims of its weights):
  model.embed_tokens.weight          [V, D]      <-> embed [V, D]
  model.layers.i.self_attn.q_proj    [H*Dh, D]   <-> blocks/i/attn/q [D, H, Dh]   (k, v: K heads)
  model.layers.i.self_attn.o_proj    [D, H*Dh]   <-> blocks/i/attn/o [H, Dh, D]
  model.layers.i.self_attn.q_proj.bias [H*Dh]    <-> blocks/i/attn/q_bias [H, Dh] (Qwen2)
  model.layers.i.mlp.gate/up_proj    [F, D]      <-> blocks/i/mlp/gate, up [D, F]
  model.layers.i.mlp.down_proj       [D, F]      <-> blocks/i/mlp/down [F, D]
  model.layers.i.input_layernorm / post_attention_layernorm <-> attn_norm / mlp_norm scale
  model.norm.weight <-> final_norm/scale;  lm_head.weight [V, D] <-> lm_head [D, V]
With scan_layers the blocks are one stacked module: blocks/attn/q [L, D, H, Dh].
jaxllm's RoPE rotates the two halves of the head dim (HF's rotate_half), so q/k need no permutation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm import __version__
from jaxllm.config import DataConfig, MeshConfig, ModelConfig, RunConfig, from_dict, to_dict
from jaxllm.core import checkpoint as ckpt_lib
from jaxllm.core import storage
from jaxllm.errors import CheckpointError, DataError
from jaxllm.core.model import Transformer
from jaxllm.core.sharding import make_mesh, make_rules, state_shardings
from jaxllm.app.hf_config import arch_name, hf_config_to_model, model_to_hf_config

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}  # numpy-readable ones
_ST_NAME = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(jnp.bfloat16): "BF16"}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints stored


# ---- the name/layout mapping ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Entry:
    hf: str  # HF tensor name
    path: tuple  # jaxllm param path (nnx flat-state key)
    layer: Optional[int]  # index into the leading layer axis of a stacked (scan_layers) param
    kind: str  # same | bias | in | out
    shape: tuple  # jaxllm shape of this tensor (per layer)

    @property
    def hf_shape(self) -> tuple:
        s = self.shape
        if self.kind == "same":
            return s
        if self.kind == "bias":
            return (math.prod(s),)
        if self.kind == "in":  # jax [in, *out] <- torch [prod(out), in]
            return (math.prod(s[1:]), s[0])
        return (s[-1], math.prod(s[:-1]))  # out: jax [*in, out] <- torch [out, prod(in)]

    def to_jax(self, h: np.ndarray) -> np.ndarray:
        return (h.T if self.kind in ("in", "out") else h).reshape(self.shape)

    def to_hf(self, j: np.ndarray) -> np.ndarray:
        if self.kind == "in":
            return j.reshape(self.shape[0], -1).T
        if self.kind == "out":
            return j.reshape(-1, self.shape[-1]).T
        return j.reshape(self.hf_shape)

    @property
    def name(self) -> str:
        return "/".join(map(str, self.path)) + ("" if self.layer is None else f"[{self.layer}]")


_LAYER = [  # (jaxllm sub-path, HF suffix, kind)
    (("attn_norm", "scale"), "input_layernorm.weight", "same"),
    (("attn", "q"), "self_attn.q_proj.weight", "in"),
    (("attn", "k"), "self_attn.k_proj.weight", "in"),
    (("attn", "v"), "self_attn.v_proj.weight", "in"),
    (("attn", "q_bias"), "self_attn.q_proj.bias", "bias"),
    (("attn", "k_bias"), "self_attn.k_proj.bias", "bias"),
    (("attn", "v_bias"), "self_attn.v_proj.bias", "bias"),
    (("attn", "o"), "self_attn.o_proj.weight", "out"),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", "same"),
    (("mlp", "gate"), "mlp.gate_proj.weight", "in"),
    (("mlp", "up"), "mlp.up_proj.weight", "in"),
    (("mlp", "down"), "mlp.down_proj.weight", "out"),
]


def layout(cfg: ModelConfig, shapes: dict) -> list[_Entry]:
    """Every HF tensor of `cfg`'s model, in HF order. shapes: jaxllm flat path -> shape."""
    def entry(hf, path, kind, layer=None):
        shape = tuple(shapes[path])
        return _Entry(hf, path, layer, kind, shape[1:] if layer is not None else shape)

    out = [entry("model.embed_tokens.weight", ("embed",), "same")]
    for i in range(cfg.n_layers):
        for sub, suffix, kind in _LAYER:
            if sub[1].endswith("_bias") and not cfg.qkv_bias:
                continue
            path = ("blocks", *sub) if cfg.scan_layers else ("blocks", i, *sub)
            out.append(entry(f"model.layers.{i}.{suffix}", path, kind, i if cfg.scan_layers else None))
    out.append(entry("model.norm.weight", ("final_norm", "scale"), "same"))
    if not cfg.tie_embeddings:
        out.append(entry("lm_head.weight", ("lm_head",), "in"))
    return out


# ---- reading safetensors --------------------------------------------------------------------
class _Reader:
    """Tensor name -> file for a HF dir; reads one tensor at a time as numpy."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                self.where = {k: os.path.join(hf_dir, v) for k, v in json.load(f)["weight_map"].items()}
            files = sorted(set(self.where.values()))
        else:
            files = sorted(os.path.join(hf_dir, f) for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
            if not files:
                bins = [f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth"))]
                raise CheckpointError(f"no *.safetensors weights in {hf_dir}" +
                                      (f" (found {bins[0]}: only safetensors are read; re-save the model with "
                                       f"save_pretrained(..., safe_serialization=True))" if bins else ""))
            self.where = None
        from safetensors import safe_open
        self._stack = contextlib.ExitStack()
        self.handles = {}
        for path in files:
            if not os.path.isfile(path):
                raise CheckpointError(f"{index} names {os.path.basename(path)}, which is missing from {hf_dir}")
            self.handles[path] = self._stack.enter_context(safe_open(path, framework="numpy"))
        if self.where is None:
            self.where = {k: p for p, h in self.handles.items() for k in h.keys()}
        self._headers: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def names(self) -> list[str]:
        return list(self.where)

    def _slice(self, name: str):
        return self.handles[self.where[name]].get_slice(name)

    def shape(self, name: str) -> tuple:
        return tuple(self._slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        dtype = self._slice(name).get_dtype()
        if dtype in _ST_DTYPES:
            return self.handles[self.where[name]].get_tensor(name)
        if dtype == "BF16":  # numpy has no bfloat16: read the raw bytes as ml_dtypes' bfloat16
            path = self.where[name]
            start, info = self._header(path)
            begin, end = info[name]["data_offsets"]
            arr = np.fromfile(path, dtype=jnp.bfloat16, count=(end - begin) // 2, offset=start + begin)
            return arr.reshape(info[name]["shape"])
        raise CheckpointError(f"HF tensor {name!r} has dtype {dtype}; only F32, F16, BF16 and F64 are supported")

    def _header(self, path: str):
        if path not in self._headers:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._headers[path] = (8 + n, json.loads(f.read(n)))
        return self._headers[path]


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{hf_dir} has no config.json; is it a Hugging Face model directory?")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _check_tensors(entries: list[_Entry], reader: _Reader, cfg: ModelConfig) -> None:
    """Every expected tensor present with the shape config.json implies; nothing unexpected left."""
    expected = {e.hf for e in entries}
    for e in entries:
        if e.hf not in reader.where:
            raise CheckpointError(f"HF checkpoint {reader.dir} has no tensor {e.hf!r} (expected from config.json)")
        got = reader.shape(e.hf)
        if got != e.hf_shape:
            raise CheckpointError(f"HF tensor {e.hf!r} has shape {got} but config.json implies {e.hf_shape} "
                                  f"(jaxllm {e.name} {e.shape}); config.json and the weights disagree")
    extra = [n for n in reader.names() if n not in expected and not n.endswith(IGNORED_SUFFIXES)
             and not (n == "lm_head.weight" and cfg.tie_embeddings)]
    if extra:
        raise CheckpointError(f"HF checkpoint {reader.dir} has {len(extra)} tensor(s) jaxllm cannot map, e.g. "
                              f"{extra[0]!r}; the architecture differs from config.json's")


# ---- import ---------------------------------------------------------------------------------
def resolve_mesh(mesh=None) -> tuple[Mesh, dict]:
    """None -> one device; MeshConfig -> make_mesh over all devices; a jax Mesh as is."""
    if mesh is None:
        return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")), make_rules()
    if isinstance(mesh, MeshConfig):
        return make_mesh(mesh), make_rules(mesh.rules)
    return mesh, make_rules()


def _put(host: np.ndarray, sharding) -> jax.Array:
    """Host array -> global array on `sharding`; each device gets only its slice."""
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: np.ascontiguousarray(host[idx]))


def _load_params(cfg: ModelConfig, reader: _Reader, mesh: Mesh, rules: dict):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    shard = dict(nnx.to_flat_state(state_shardings(abs_params, mesh, rules)))
    flat = dict(nnx.to_flat_state(abs_params))
    entries = layout(cfg, {p: v.get_value().shape for p, v in flat.items()})
    _check_tensors(entries, reader, cfg)
    dtype = jnp.dtype(cfg.param_dtype)
    by_path: dict[tuple, list[_Entry]] = {}
    for e in entries:
        by_path.setdefault(e.path, []).append(e)
    missing = set(flat) - set(by_path)
    if missing:  # a param the mapping does not know (a model change not reflected here)
        raise CheckpointError(f"jaxllm params {sorted('/'.join(map(str, p)) for p in missing)} have no HF mapping")
    values = []
    for path, var in flat.items():
        sh = shard[path].get_value()
        es = by_path[path]
        if es[0].layer is None:
            arr = _put(es[0].to_jax(reader.get(es[0].hf)).astype(dtype), sh)
        else:  # stacked layers: fill a sharded [L, ...] array one layer at a time
            shape = var.get_value().shape
            spec = tuple(sh.spec) + (None,) * (len(shape) - len(sh.spec))
            layer_sh = NamedSharding(mesh, P(*spec[1:]))
            arr = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sh)()
            setter = jax.jit(lambda a, x, i: jax.lax.dynamic_update_index_in_dim(a, x, i, 0),
                             out_shardings=sh, donate_argnums=0)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*donated buffers.*")
                for e in es:
                    arr = setter(arr, _put(e.to_jax(reader.get(e.hf)).astype(dtype), layer_sh), e.layer)
        values.append((path, var.replace(arr)))
    return graphdef, nnx.from_flat_state(values), abs_rest


def load(hf_dir: str, mesh=None, **overrides) -> Transformer:
    """HF model dir -> jaxllm Transformer (its `.cfg` is the ModelConfig), params placed on `mesh`
    (None: one device; a MeshConfig or a jax Mesh). `overrides`: ModelConfig fields (scan_layers,
    dtype, param_dtype, ...)."""
    hf_dir = storage.local_dir(storage.join(hf_dir))  # safetensors memory-maps local files
    cfg = hf_config_to_model(read_hf_config(hf_dir), **overrides)
    mesh, rules = resolve_mesh(mesh)
    with _Reader(hf_dir) as reader:
        graphdef, params, rest = _load_params(cfg, reader, mesh, rules)
    return nnx.merge(graphdef, params, rest)


# ---- export ---------------------------------------------------------------------------------
def _check_out_dir(out_dir: str) -> str:
    out_dir = storage.join(out_dir)
    if storage.exists(out_dir) and (not storage.isdir(out_dir) or storage.listdir(out_dir)):
        raise CheckpointError(f"output directory {out_dir} already exists and is not empty; choose a new --out")
    return out_dir


@contextlib.contextmanager
def _staging(out_dir: str):
    """Writes go to a sibling temp dir, renamed to out_dir when complete (nothing half-written).
    A remote out_dir: a local temp dir, uploaded file by file when complete."""
    if storage.is_remote(out_dir):
        tmp = tempfile.mkdtemp(prefix="jaxllm-hf-export-")
        try:
            yield tmp
            storage.copy_tree(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked); fails loudly if something appeared meanwhile
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_safetensors(path: str, items: list) -> None:
    """items: (name, shape, numpy dtype, getter). Header first, then each tensor as it is produced."""
    header, offset = {}, 0
    for name, shape, dtype, _ in items:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_NAME[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}  # transformers refuses files without it
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, dtype, get in items:
            a = np.ascontiguousarray(get(), dtype=dtype)
            assert a.shape == tuple(shape), (name, a.shape, shape)
            f.write(a.tobytes())


def save(model: Transformer, out_dir: str, arch: str = "LlamaForCausalLM", dtype: Optional[str] = None,
         max_shard_bytes: int = 5 * 2**30, tokenizer=None) -> str:
    """Writes `config.json` + `model.safetensors` (or shards + index above max_shard_bytes) that
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads. dtype: of the stored
    weights, default the model's compute dtype (what jaxllm's forward pass multiplies with).
    tokenizer: whose special ids config.json records (default: jaxllm's default tokenizer)."""
    cfg = model.cfg
    hf_cfg = model_to_hf_config(cfg, arch, dtype, tokenizer)
    out_dir = _check_out_dir(out_dir)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    if any(isinstance(v, nnx.LoRAParam) for v in flat.values()):
        raise CheckpointError("the model has LoRA adapters; fold them first (`jaxllm merge`)")
    np_dtype = np.dtype(jnp.dtype(hf_cfg["torch_dtype"]))
    entries = layout(cfg, {p: v.get_value().shape for p, v in flat.items()})

    def getter(e: _Entry) -> Callable:
        def get():
            arr = flat[e.path].get_value()
            host = np.asarray(jax.device_get(arr if e.layer is None else arr[e.layer]))
            return e.to_hf(host.astype(np.float32) if host.dtype != np.float32 else host).astype(np_dtype)
        return get

    items = [(e.hf, e.hf_shape, np_dtype, getter(e)) for e in entries]
    if hf_cfg["architectures"][0] == "Qwen2ForCausalLM" and not cfg.qkv_bias:  # Qwen2 always has q/k/v biases
        n_q, n_kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        for i in range(cfg.n_layers):
            for proj, n in (("q", n_q), ("k", n_kv), ("v", n_kv)):
                items.append((f"model.layers.{i}.self_attn.{proj}_proj.bias", (n,), np_dtype,
                              lambda n=n: np.zeros((n,), np_dtype)))
    shards, size = [[]], 0
    for it in items:
        n = math.prod(it[1]) * np_dtype.itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += n
    with _staging(out_dir) as tmp:
        if len(shards) == 1:
            _write_safetensors(os.path.join(tmp, "model.safetensors"), shards[0])
        else:
            weight_map, total = {}, 0
            for k, part in enumerate(shards):
                fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(os.path.join(tmp, fname), part)
                for name, shape, _, _ in part:
                    weight_map[name] = fname
                    total += math.prod(shape) * np_dtype.itemsize
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
    return out_dir


# ---- jaxllm checkpoints ---------------------------------------------------------------------
def load_tokenizer(hf_dir: str, tokenizer: Optional[str] = None, vocab_size: Optional[int] = None):
    """The tokenizer of a HF model dir: `tokenizer` (a .model, a tokenizer.json or a dir holding one)
    if given, else the dir's tokenizer.model, else its tokenizer.json (+ tokenizer_config.json).
    With vocab_size (the model's), checks that every token id has an embedding row."""
    from jaxllm.data.tokenizer import Tokenizer
    path = storage.join(tokenizer) if tokenizer else hf_dir
    try:
        tok = Tokenizer(path)
    except DataError as e:  # say where the tokenizer came from and how to pick another
        raise DataError(f"{e} (tokenizer of {hf_dir}; pass --tokenizer PATH: a SentencePiece .model, a "
                        f"tokenizer.json or a directory holding one)") from None
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise DataError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocab_size is "
                        f"{vocab_size}; pass --tokenizer with the model's own tokenizer")
    return tok


def _tokenizer_file_names(tok) -> list[tuple[str, str]]:
    """(source file, name in a run/HF dir): the main file gets the canonical name, the rest (the
    tokenizer_config.json etc. of a HF tokenizer) keep theirs."""
    main = "tokenizer.json" if tok.path.endswith(".json") else "tokenizer.model"
    files = tok.files()
    return [(files[0], main)] + [(f, storage.path(f).name) for f in files[1:]]


def hf_to_checkpoint(hf_dir: str, out_dir: str, mesh_cfg: Optional[MeshConfig] = None,
                     tokenizer: Optional[str] = None, **overrides) -> dict:
    """HF model dir -> a normal jaxllm run dir (`checkpoints/0`, `model.yaml`, and the tokenizer:
    `tokenizer.model`, or `tokenizer.json` with its tokenizer_config.json etc.) that
    `checkpoint.init_from`, `data.tokenizer` and `jaxllm generate/info` accept. mesh_cfg: where the
    params live while converting (default: fsdp over all devices). overrides: ModelConfig fields."""
    from jaxllm.data.tokenizer import Tokenizer
    source, out_dir = storage.join(hf_dir), _check_out_dir(out_dir)
    hf_dir = storage.local_dir(source)  # safetensors memory-maps local files
    hf_cfg = read_hf_config(hf_dir)
    cfg = hf_config_to_model(hf_cfg, **overrides)
    tok_files = _tokenizer_file_names(load_tokenizer(hf_dir, tokenizer, cfg.vocab_size))
    mesh_cfg = mesh_cfg or MeshConfig(data=1, fsdp=-1, tensor=1)
    mesh, rules = resolve_mesh(mesh_cfg)
    with _Reader(hf_dir) as reader:
        _, params, _ = _load_params(cfg, reader, mesh, rules)
    tok_path = storage.join(out_dir, tok_files[0][1])  # final location (after the rename)
    run_cfg = RunConfig(output_dir=out_dir, stage="hf_import", model=cfg, mesh=mesh_cfg,
                        data=DataConfig(tokenizer=tok_path))
    # a remote out_dir is written in place (orbax commits the checkpoint on an object store itself;
    # a locally written checkpoint uploaded later would lack that commit marker)
    staging = _staging(out_dir) if not storage.is_remote(out_dir) else contextlib.nullcontext(out_dir)
    with staging as tmp:
        for src, name in tok_files:
            storage.copy_file(src, storage.join(tmp, name))
        tok_meta = {**Tokenizer(storage.join(tmp, tok_files[0][1])).describe(), "path": tok_path}
        meta = {"jaxllm_version": __version__, "stage": "hf_import", "step": 0, "parent": source,
                "config": to_dict(run_cfg), "model": to_dict(cfg), "tokenizer": tok_meta,
                "objective": "causal_lm", "time": time.time(),
                "hf_source": {"dir": source, "architecture": (hf_cfg.get("architectures") or [None])[0],
                              "tokenizer": tok_files[0][0], "config": hf_cfg}}
        ckpt = ckpt_lib.Checkpointer(storage.join(tmp, "checkpoints"), keep=1, async_save=False)
        ckpt.save(0, params, {"step": jnp.int32(0), "skipped": jnp.int32(0)}, {"next_index": 0}, meta)
        ckpt.close()
        storage.write_atomic(storage.join(tmp, "model.yaml"),
                             f"# Imported from {source} ({meta['hf_source']['architecture']}).\n"
                             f"# scan_layers must match the checkpoint's layout; dtype/remat/attention_impl may change.\n"
                             + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return {"out": out_dir, "step": 0, "model_yaml": storage.join(out_dir, "model.yaml"), "tokenizer": tok_path,
            "params": sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(params))}


def checkpoint_to_hf(ckpt_path: str, out_dir: str, arch: str = "LlamaForCausalLM",
                     dtype: Optional[str] = None) -> dict:
    """A jaxllm checkpoint (run dir or step dir) -> HF model dir (+ its tokenizer files if found;
    config.json's special ids are that tokenizer's)."""
    from jaxllm.app.inference import load_model
    from jaxllm.data.tokenizer import DEFAULT_TOKENIZER
    arch = arch_name(arch)
    out_dir = _check_out_dir(out_dir)
    src, step = ckpt_lib.open_for_read(ckpt_path)
    meta, shapes = src.metadata(step), src.param_shapes(step)
    src.close()
    if any("_lora" in p for p in shapes) or (meta.get("config") or {}).get("finetune", {}).get("mode") == "lora":
        raise CheckpointError(f"checkpoint {ckpt_path} holds LoRA adapters; run `jaxllm merge` first and "
                              f"convert the merged checkpoint")
    if "score" in shapes:
        raise CheckpointError(f"checkpoint {ckpt_path} is a reward/value model (scalar head); only causal LMs "
                              f"export to {arch}")
    model_cfg = from_dict(ModelConfig, meta["model"], "model.")
    model_to_hf_config(model_cfg, arch, dtype)  # arch/bias/dtype problems before any loading
    tok_path = (meta.get("tokenizer") or {}).get("path", "")
    have_tok = bool(tok_path) and storage.exists(tok_path)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    model, tok, _ = load_model(ckpt_path, mesh, tokenizer=tok_path if have_tok else DEFAULT_TOKENIZER)
    save(model, out_dir, arch, dtype, tokenizer=tok)
    if have_tok:
        for src, name in _tokenizer_file_names(tok):
            storage.copy_file(src, storage.join(out_dir, name))
    return {"out": out_dir, "step": step, "arch": arch, "tokenizer": have_tok}
