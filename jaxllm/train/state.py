"""The train state: what it holds, how it is sharded, built (never materialised on one host) and
filled from another run's checkpoint, and which params train (full, partial, LoRA)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm.config import FinetuneConfig
from jaxllm.core.sharding import match_shardings, path_str, state_shardings
from jaxllm.errors import CheckpointError, ConfigError


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps attempted so far
    params: Any  # nnx.State of trainable params
    rest: Any  # nnx.State of everything else in the model (frozen weights, buffers)
    opt_state: Any
    skipped: jax.Array  # int32 scalar: updates skipped for non-finite loss/grad

    def saved_parts(self, with_rest: bool = True) -> dict:
        """The checkpoint's train_state item (params are their own item)."""
        out = {"step": self.step, "rest": self.rest, "opt_state": self.opt_state, "skipped": self.skipped}
        if not with_rest:
            del out["rest"]  # LoRA without save_base: adapters + optimizer only
        return out


def abstract_model(make_model: Callable[[nnx.Rngs], nnx.Module], trainable):
    """(graphdef, abstract trainable state, abstract rest) without allocating any weights."""
    model = nnx.eval_shape(lambda: make_model(nnx.Rngs(0)))
    return nnx.split(model, trainable, ...)


def state_shardings_for(abs_params, abs_rest, optimizer, mesh, rules) -> TrainState:
    p_sh = state_shardings(abs_params, mesh, rules)
    r_sh = state_shardings(abs_rest, mesh, rules)
    abs_opt = jax.eval_shape(optimizer.init, abs_params)
    o_sh = match_shardings(abs_opt, p_sh, mesh)
    scalar = NamedSharding(mesh, P())
    return TrainState(step=scalar, params=p_sh, rest=r_sh, opt_state=o_sh, skipped=scalar)


def init_state(make_model, trainable, optimizer, shardings: TrainState, seed: int) -> TrainState:
    """Creates params and optimizer state directly sharded: jit(init, out_shardings)."""
    def init():
        model = make_model(nnx.Rngs(seed))
        _, params, rest = nnx.split(model, trainable, ...)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                          opt_state=optimizer.init(params), skipped=jnp.zeros((), jnp.int32))
    return jax.jit(init, out_shardings=shardings)()


def abstract_like(shardings_tree, abstract_tree):
    """ShapeDtypeStructs carrying target shardings: the restore target for orbax."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_tree, shardings_tree)


def load_base_weights(src, step: int, state: TrainState, shardings: TrainState, prefix: str = "",
                      new_params: tuple = ()) -> TrainState:
    """Parent params -> every non-LoRA param of this model under `prefix` (the parent's names lack
    the prefix), wherever it lives (trained or frozen). Params new to this stage (a reward head,
    path prefixes `new_params`) keep their init; extra parent params are ignored."""
    saved = src.param_shapes(step)
    head = tuple(prefix.strip("/").split("/")) if prefix else ()
    target = {}
    for part, shard in (("params", shardings.params), ("rest", shardings.rest)):
        abs_part = abstract_like(shard, getattr(state, part))
        for path, var in nnx.to_flat_state(abs_part):
            if isinstance(var, nnx.LoRAParam) or not isinstance(var, nnx.Param) or path[:len(head)] != head:
                continue
            inner = tuple(path[len(head):])
            if path_str(inner) not in saved:
                if not path_str(path).startswith(new_params or ("\0",)):
                    raise CheckpointError(f"checkpoint {src.directory}/{step} has no tensor {path_str(inner)!r}; "
                                          f"it was written by a different model architecture")
                continue
            target[inner] = var
    restored = src.restore(step, nnx.from_flat_state(target), partial=True)["params"]
    values = {head + tuple(p): v for p, v in nnx.to_flat_state(restored)}

    def overlay(part):
        return nnx.from_flat_state([(p, values.get(p, v)) for p, v in nnx.to_flat_state(part)])
    return dataclasses.replace(state, params=overlay(state.params), rest=overlay(state.rest))


# ---- which params train ----------------------------------------------------------------------
def _path(path) -> str:
    return "/".join(str(p) for p in path)


def trainable_filter(ft: FinetuneConfig, n_layers: int, scan_layers: bool):
    """nnx filter selecting the trained params. Frozen params land in the state's `rest` and get
    no optimizer state."""
    if ft.mode == "lora":
        return nnx.LoRAParam
    if ft.mode == "full":
        return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    if ft.freeze_layers and scan_layers:
        raise ConfigError("finetune.freeze_layers needs model.scan_layers=false (stacked layers freeze together)")
    if ft.freeze_layers > n_layers:
        raise ConfigError(f"finetune.freeze_layers={ft.freeze_layers} exceeds model.n_layers={n_layers}")
    patterns = [re.compile(p) for p in ft.freeze]
    frozen_blocks = {str(i) for i in range(ft.freeze_layers)}

    def is_frozen(path, _value) -> bool:
        p = _path(path)
        if ft.freeze_embeddings and path[0] == "embed":
            return True
        if path[0] == "blocks" and str(path[1]) in frozen_blocks:
            return True
        return any(r.search(p) for r in patterns)
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam), nnx.Not(is_frozen))


def check_freeze_matches(ft: FinetuneConfig, abstract_model) -> None:
    if ft.mode != "partial":
        return
    paths = [_path(p) for p, _ in nnx.to_flat_state(nnx.state(abstract_model, nnx.Param))]
    for pat in ft.freeze:
        if not any(re.search(pat, p) for p in paths):
            raise ConfigError(f"finetune.freeze pattern {pat!r} matches no parameter (e.g. {paths[0]!r})")
