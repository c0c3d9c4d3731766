"""Loading a model of any class from a checkpoint: the one place a checkpoint becomes weights on a
mesh outside the train loop (generation, reward models, export, merge, labelling)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig, from_dict
from jaxllm.core import checkpoint as ckpt_lib
from jaxllm.core.sharding import make_rules, state_shardings
from jaxllm.errors import CheckpointError


def check_tokenizer(meta: dict, tok, where: str) -> None:
    """A checkpoint is only usable with the tokenizer it was trained with (same ids)."""
    saved = (meta.get("tokenizer") or {}).get("sha256")
    if saved and saved != tok.sha256:
        raise CheckpointError(f"tokenizer {tok.path} differs from the one checkpoint {where} was trained "
                              f"with ({meta['tokenizer'].get('path')}); set data.tokenizer to that file")


def single_device_mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def abstract_with_shardings(abstract_tree, mesh, rules):
    """ShapeDtypeStructs carrying the rules table's shardings on `mesh`: an orbax restore target."""
    shard = state_shardings(abstract_tree, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shard)


def load_model(path: str, model_class, mesh=None, rules=None, tok=None, require: str = "", hint: str = ""):
    """Checkpoint (run dir, checkpoints dir or step dir) -> (model of `model_class` holding the
    saved params, sharded on `mesh` (default: one device), metadata). `tok`: checked against the
    checkpoint's tokenizer. `require`: a param that must exist (e.g. "score" for a reward model),
    else a CheckpointError ending in `hint`."""
    src, step = ckpt_lib.open_for_read(path)
    try:
        meta = src.metadata(step)
        if tok is not None:
            check_tokenizer(meta, tok, path)
        if require and require not in src.param_shapes(step):
            raise CheckpointError(f"{path} has no {require!r} tensor: it is not a {model_class.__name__} "
                                  f"checkpoint{'; ' + hint if hint else ''}")
        cfg = from_dict(ModelConfig, meta["model"], "model.")
        abstract = nnx.eval_shape(lambda: model_class(cfg, nnx.Rngs(0)))
        graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
        mesh = mesh if mesh is not None else single_device_mesh()
        target = abstract_with_shardings(abs_params, mesh, rules if rules is not None else make_rules())
        params = src.restore(step, target)["params"]
    finally:
        src.close()
    return nnx.merge(graphdef, params, rest), meta
