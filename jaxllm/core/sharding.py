"""Mesh construction and the one logical->mesh rules table.

Every parameter carries logical axis names (metadata `out_sharding`, set in model.py); every
activation is constrained with logical names through `constrain`. The table below (overridable per
run with `mesh.rules`) decides where each logical axis lives. `spec_for` refuses to place two
logical axes of one array on the same mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm.config import MeshConfig
from jaxllm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated)
DEFAULT_RULES: dict[str, Any] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "lora_rank": None,
    # activations
    "batch": ("data", "fsdp"),
    "act_len": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_rules(overrides: Optional[dict] = None) -> dict[str, Any]:
    rules = dict(DEFAULT_RULES)
    for k, v in (overrides or {}).items():
        if k not in rules:
            import difflib
            close = difflib.get_close_matches(k, list(rules), n=1)
            raise ConfigError(f"mesh.rules: unknown logical axis {k!r}" +
                              (f"; did you mean {close[0]!r}?" if close else ""))
        for axis in ([v] if isinstance(v, str) else (v or [])):
            if axis not in MESH_AXES:
                raise ConfigError(f"mesh.rules.{k}={v!r}: mesh axes are {', '.join(MESH_AXES)}")
        rules[k] = tuple(v) if isinstance(v, list) else v
    return rules


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Resolves -1 and checks that the mesh covers exactly the available devices."""
    dcn = (cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor)
    n_slices = math.prod(dcn)
    if n_devices % n_slices:
        raise ConfigError(f"mesh: DCN sizes {dcn} (product {n_slices}) do not divide the "
                          f"{n_devices} devices")
    per_slice = n_devices // n_slices
    ici = [cfg.data, cfg.fsdp, cfg.tensor]
    if -1 in ici:
        known = math.prod(s for s in ici if s != -1)
        if per_slice % known:
            raise ConfigError(f"mesh: data*fsdp*tensor sizes {ici} cannot fill {per_slice} devices "
                              f"per slice; set sizes whose product divides {per_slice}")
        ici[ici.index(-1)] = per_slice // known
    if math.prod(ici) != per_slice:
        raise ConfigError(f"mesh: data*fsdp*tensor = {'*'.join(map(str, ici))} = {math.prod(ici)} "
                          f"but there are {per_slice} devices per slice ({n_devices} in all); "
                          f"fix the sizes or set one to -1")
    return tuple(ici), dcn


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    ici, dcn = mesh_shape(cfg, len(devices))
    if math.prod(dcn) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices=devices)
        except (ValueError, AssertionError, NotImplementedError):
            grid = np.array(devices).reshape(ici)
    return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def spec_for(names: Sequence[Optional[str]], rules: dict, shape: Optional[Sequence[int]] = None,
             mesh: Optional[Mesh] = None, what: str = "array") -> P:
    """Logical names -> PartitionSpec. A dimension that its mesh axes do not divide is
    replicated (e.g. 2 KV heads on a 4-way tensor axis)."""
    used: dict[str, str] = {}
    out = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ConfigError(f"{what}: logical axis {name!r} has no entry in the rules table")
        target = rules[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        for ax in axes:
            if ax in used:
                raise ConfigError(f"{what}: logical axes {used[ax]!r} and {name!r} both map to mesh "
                                  f"axis {ax!r}; change mesh.rules so they differ")
            used[ax] = name
        if mesh is not None and shape is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % size:
                axes = ()
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def logical_names(var) -> tuple:
    """The logical axis names stored on an nnx.Variable (empty tuple if none)."""
    meta = var.get_metadata()
    return tuple(meta.get("out_sharding") or meta.get("sharding_names") or ())


def state_shardings(abstract_state, mesh: Mesh, rules: dict):
    """NamedSharding for every Variable in an (abstract) nnx.State, from its logical names."""
    from flax import nnx

    def one(path, var):
        names = logical_names(var)
        shape = var.get_value().shape
        if names and len(names) != len(shape):
            raise ConfigError(f"param {_path_str(path)}: {len(names)} logical names for shape {shape}")
        spec = spec_for(names, rules, shape, mesh, what=f"param {_path_str(path)}") if names else P()
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, abstract_state,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))


def _path_str(path) -> str:
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        if key == "value":
            continue
        parts.append(str(key))
    return "/".join(parts)


def path_str(path) -> str:
    return _path_str(path)


def match_shardings(abstract_tree, param_shardings, mesh: Mesh):
    """Shardings for a tree that embeds copies of the param tree (optimizer moments): a leaf whose
    path ends with a param's path and has its shape gets that param's sharding, others replicate."""
    by_path = {}
    for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        by_path[_path_str(path)] = s
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        p = _path_str(path)
        for ppath, s in by_path.items():
            if p.endswith(ppath) and len(s.spec) <= len(getattr(leaf, "shape", ())):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


# ---- activation constraints ---------------------------------------------------------------
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("jaxllm_sharding", default=None)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules: dict):
    """While tracing under this context, `constrain` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_device_mesh():
    """(mesh, rules) of the enclosing use_mesh_rules when its mesh has real (or compile-only)
    devices, else (None, None): what shard_map'd kernels need (an AbstractMesh has no platform)."""
    active = _ACTIVE.get()
    if not active or active[0] is None or not isinstance(getattr(active[0], "devices", None), np.ndarray):
        return None, None
    return active


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None or active[0] is None:
        return x
    mesh, rules = active
    spec = spec_for(names, rules, x.shape, mesh, what="activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, rules: dict, ndim: int, leading: int = 0) -> NamedSharding:
    """Sharding of a batch array: `leading` unsharded dims (micro-batch index), then batch."""
    spec = spec_for(["batch"], rules, what="batch")
    return NamedSharding(mesh, P(*([None] * leading), spec[0], *([None] * (ndim - leading - 1))))
