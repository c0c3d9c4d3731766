"""One step's loss and gradients agree across meshes; params land where the rules table says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import MeshConfig
from jaxllm.core.arrays import to_global
from jaxllm.errors import ConfigError
from jaxllm.objectives import REGISTRY, LossContext
from jaxllm.core.optim import make_optimizer
from jaxllm.core.sharding import make_mesh, make_rules, spec_for, use_mesh_rules
from jaxllm.train.state import abstract_model, init_state, state_shardings_for
from jaxllm.core.model import Transformer
from jax.sharding import PartitionSpec as P

MESHES = {
    "data": dict(data=8, fsdp=1, tensor=1),
    "fsdp": dict(data=1, fsdp=8, tensor=1),
    "fsdp_tensor": dict(data=1, fsdp=4, tensor=2),
    "data_fsdp_tensor": dict(data=2, fsdp=2, tensor=2),
}


def _loss_and_grads(cfg, mesh_kwargs, devices, batch_np):
    mesh = make_mesh(MeshConfig(**mesh_kwargs), devices)
    rules = make_rules()
    make_model = lambda rngs: Transformer(cfg.model, rngs)
    graphdef, abs_p, abs_r = abstract_model(make_model, nnx.Param)
    opt = make_optimizer(cfg.optimizer, 10)
    sh = state_shardings_for(abs_p, abs_r, opt, mesh, rules)
    state = init_state(make_model, nnx.Param, opt, sh, seed=0)
    batch = jax.tree.map(lambda x: x[0], to_global(batch_np, mesh, rules))

    @jax.jit
    def f(params, rest, batch):
        def loss(p):
            with use_mesh_rules(mesh, rules):
                out = REGISTRY["causal_lm"].loss(nnx.merge(graphdef, p, rest), batch,
                                          LossContext(jax.random.key(0), cfg.objective))
            return out.loss_sum / out.denom
        return jax.value_and_grad(loss)(params)

    loss, grads = f(state.params, state.rest, batch)
    return float(loss), jax.device_get(grads), state.params, mesh


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.conftest import tiny_config
    cfg = tiny_config(tmp_path_factory.mktemp("s"), "model.n_kv_heads=4", "train.batch_size=8")
    rng = np.random.default_rng(0)
    T = 32
    batch = {"inputs": rng.integers(0, 1024, (8, T), dtype=np.int32),
             "targets": rng.integers(0, 1024, (8, T), dtype=np.int32),
             "segment_ids": np.repeat(np.array([[1] * 20 + [2] * 12]), 8, 0).astype(np.int32),
             "positions": np.tile(np.r_[np.arange(20), np.arange(12)], (8, 1)).astype(np.int32),
             "loss_mask": np.ones((8, T), np.int32)}
    ref = _loss_and_grads(cfg, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], batch)
    return cfg, batch, ref


@pytest.mark.parametrize("name", list(MESHES))
def test_loss_and_grads_match_single_device(setup, name):
    cfg, batch, (ref_loss, ref_grads, _, _) = setup
    loss, grads, params, mesh = _loss_and_grads(cfg, MESHES[name], jax.devices(), batch)
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    for (path, g), (_, r) in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                 jax.tree_util.tree_flatten_with_path(ref_grads)[0]):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
    # parameter shardings are what the rules table says
    rules = make_rules()
    blk = params["blocks"][0]
    assert params["embed"].get_value().sharding.spec == spec_for(("vocab", "embed"), rules, params["embed"].get_value().shape, mesh)
    assert blk["mlp"]["gate"].get_value().sharding.spec == spec_for(("embed", "mlp"), rules, (128, 384), mesh)
    if mesh.shape["tensor"] > 1:
        assert blk["attn"]["q"].get_value().sharding.spec == P("fsdp" if mesh.shape["fsdp"] > 1 else "fsdp", "tensor", None)
        assert blk["mlp"]["down"].get_value().sharding.spec == P("tensor", "fsdp")
    if mesh.shape["fsdp"] > 1:
        shard = blk["mlp"]["gate"].get_value().addressable_shards[0].data.shape
        assert shard[0] == 128 // mesh.shape["fsdp"]


def test_duplicate_mesh_axis_rejected():
    rules = make_rules({"mlp": "fsdp"})
    with pytest.raises(ConfigError, match="both map to mesh axis 'fsdp'"):
        spec_for(("embed", "mlp"), rules, what="gate")


def test_uneven_dimension_replicates():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    # 2 KV heads cannot split 4 ways: that dimension is replicated, the rest still sharded.
    assert spec_for(("embed", "kv_heads", "head_dim"), make_rules(), (128, 2, 32), mesh) == P("fsdp", None, None)


def test_scan_layers_params_carry_layer_axis(tmp_path):
    from tests.conftest import tiny_config
    cfg = tiny_config(tmp_path, "model.scan_layers=true", "model.remat=full")
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    graphdef, abs_p, abs_r = abstract_model(lambda r: Transformer(cfg.model, r), nnx.Param)
    from jaxllm.core.sharding import state_shardings
    sh = state_shardings(abs_p, mesh, make_rules())
    assert sh["blocks"]["mlp"]["gate"].get_value().spec == P(None, "fsdp", "tensor")
