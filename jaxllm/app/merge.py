"""`jaxllm merge`: fold LoRA adapters into the base weights and write a normal checkpoint."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.core import checkpoint as ckpt_lib
from jaxllm.core import storage
from jaxllm.config import FinetuneConfig, LORA_TARGETS, RunConfig, from_dict, to_dict
from jaxllm.errors import CheckpointError
from jaxllm.core.model import LoRA
from jaxllm.core.sharding import make_mesh, make_rules, state_shardings
from jaxllm.objectives import model_class
from jaxllm.train.state import abstract_like, abstract_model


def fold_adapters(model: nnx.Module) -> int:
    """W += (A B) * alpha/r for every adapter, then drop the adapters. Returns how many were folded."""
    folded = 0
    for _, module in list(nnx.iter_graph(model)):
        if not isinstance(module, nnx.Module) or isinstance(module, LoRA):
            continue
        for name in LORA_TARGETS:
            adapter = getattr(module, f"{name}_lora", None)
            if adapter is None:
                continue
            w = getattr(module, name)
            a, b = adapter.a[...].astype(jnp.float32), adapter.b[...].astype(jnp.float32)
            stacked = w[...].ndim > a.ndim - 1 + b.ndim - 1  # scan_layers: leading layer axis
            delta = (jax.vmap(lambda x, y: jnp.tensordot(x, y, 1)) if stacked else
                     (lambda x, y: jnp.tensordot(x, y, 1)))(a, b) * adapter.scale
            w[...] = (w[...].astype(jnp.float32) + delta).astype(w[...].dtype)
            delattr(module, f"{name}_lora")
            folded += 1
    return folded


def merge_checkpoint(path: str, out_dir: str) -> dict:
    out_dir = storage.join(out_dir)
    if storage.exists(out_dir) and storage.listdir(out_dir):
        raise CheckpointError(f"output directory {out_dir} already exists and is not empty; choose a new --out")
    src, step = ckpt_lib.open_for_read(path)
    meta = src.metadata(step)
    cfg = from_dict(RunConfig, meta["config"], "")
    if cfg.finetune.mode != "lora":
        raise CheckpointError(f"checkpoint {path} was trained with finetune.mode={cfg.finetune.mode}; "
                              f"only LoRA checkpoints need merging")
    cls = model_class(cfg.objective.name)
    make_model = lambda rngs: cls(cfg.model, rngs, cfg.finetune)
    graphdef, abs_params, abs_rest = abstract_model(make_model, nnx.LoRAParam)
    mesh = make_mesh(dataclasses.replace(cfg.mesh, data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    rules = make_rules(cfg.mesh.rules)
    t_params = abstract_like(state_shardings(abs_params, mesh, rules), abs_params)
    t_rest = abstract_like(state_shardings(abs_rest, mesh, rules), abs_rest)
    out = src.restore(step, t_params, {"rest": t_rest}, partial=True, data=False)
    src.close()
    model = nnx.merge(graphdef, out["params"], out["train_state"]["rest"])
    n = fold_adapters(model)
    params = nnx.state(model, nnx.Param)
    merged_cfg = dataclasses.replace(cfg, finetune=FinetuneConfig(), stage=f"{cfg.stage}_merged")
    new_meta = {**meta, "config": to_dict(merged_cfg), "stage": merged_cfg.stage,
                "parent": f"{src.directory}/{step}", "merged_adapters": n}
    dst = ckpt_lib.Checkpointer(storage.join(out_dir, "checkpoints"), keep=1, async_save=False)
    dst.save(step, params, {"step": jnp.int32(step), "skipped": jnp.int32(0)}, {"next_index": 0}, new_meta)
    dst.close()
    return {"out": out_dir, "step": step, "adapters_folded": n}
