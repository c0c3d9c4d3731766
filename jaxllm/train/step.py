"""The one train step, and the one place it is built (trainer, `jaxllm plan`, benchmarks).

Hot path: `train_step(state, batch, frozen)` is a single `jax.jit` over pure pytrees (the NNX
graphdef is closed over, the state is donated). It sums loss and gradients over micro-batches,
divides once by the total count, applies the optax update, and replaces a non-finite update by
the previous state. Metrics come back as device arrays; the loop reads them one step later.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxllm.config import RunConfig
from jaxllm.core.model import use_dropout_rng
from jaxllm.core.optim import make_optimizer, schedule
from jaxllm.core.sharding import use_mesh_rules
from jaxllm.train.objective import LossContext
from jaxllm.train.state import TrainState, abstract_like, abstract_model, init_state, state_shardings_for


def make_train_step(graphdef, loss_fn, obj_cfg, optimizer, lr_fn, *, seed: int, nan_policy: str,
                    extras: dict, mesh, rules, state_shardings: TrainState, options: Any = None,
                    inject_nonfinite: tuple = (), inject_in: str = "loss"):
    def micro_loss(params, rest, batch, rng, frozen):
        model = nnx.merge(graphdef, params, rest)
        with use_dropout_rng(jax.random.fold_in(rng, 1)):
            out = loss_fn(model, batch, LossContext(rng=rng, cfg=obj_cfg, frozen=frozen, extras=extras,
                                                    options=options))
        return out.loss_sum, out

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def accumulate(params, rest, batch, rng, frozen):
        """batch leaves are [A, b, ...]: sum grads and LossOut over the A micro-batches."""
        def one(i):
            mb = jax.tree.map(lambda x: x[i], batch)
            return grad_fn(params, rest, mb, jax.random.fold_in(rng, i), frozen)
        acc = one(0)
        n_micro = jax.tree.leaves(batch)[0].shape[0]
        if n_micro > 1:
            def body(carry, i):
                return jax.tree.map(jnp.add, carry, one(i)), None
            acc, _ = jax.lax.scan(body, acc, jnp.arange(1, n_micro))
        return acc

    def step(state: TrainState, batch, frozen):
        with use_mesh_rules(mesh, rules):
            rng = jax.random.fold_in(jax.random.key(seed), state.step)
            grads, out = accumulate(state.params, state.rest, batch, rng, frozen)
            denom = jnp.maximum(out.denom, 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            loss = out.loss_sum / denom
            if inject_nonfinite:  # test hook (train.debug_nonfinite_steps): steps are 1-based
                poison = jnp.where(jnp.isin(state.step + 1, jnp.asarray(inject_nonfinite)), jnp.nan, 1.0)
                if inject_in == "loss":
                    loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)
                else:  # one gradient leaf only: the loss stays finite
                    leaves, treedef = jax.tree.flatten(grads)
                    grads = jax.tree.unflatten(treedef, [leaves[0] * poison] + leaves[1:])
            grad_norm = optax.tree.norm(grads)
            updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
            new_params = optax.apply_updates(state.params, updates)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                                   rest=state.rest, opt_state=keep(new_opt, state.opt_state),
                                   skipped=state.skipped + (~finite).astype(jnp.int32))
            metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state.step),
                       "finite": finite, "units": out.denom, "skipped": new_state.skipped}
            for name, (s, c) in out.metrics.items():
                metrics[name] = s / jnp.maximum(c, 1.0)
            return new_state, metrics

    return jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, None))


def make_eval_step(graphdef, loss_fn, obj_cfg, extras, mesh, rules, seed: int, options: Any = None):
    def eval_step(params, rest, batch, index, frozen):
        with use_mesh_rules(mesh, rules):
            model = nnx.merge(graphdef, params, rest)
            mb = jax.tree.map(lambda x: x[0], batch)
            rng = jax.random.fold_in(jax.random.key(seed + 1), index)  # fixed across evals
            out = loss_fn(model, mb, LossContext(rng=rng, cfg=obj_cfg, frozen=frozen, extras=extras, options=options))
            return {"loss": (out.loss_sum, out.denom), **out.metrics}
    return jax.jit(eval_step)


def evaluate(eval_step, state: TrainState, batches: list, frozen=None) -> dict:
    totals: dict = {}
    for i, b in enumerate(batches):
        for name, (s, c) in jax.device_get(eval_step(state.params, state.rest, b, i, frozen)).items():
            ts, tc = totals.get(name, (0.0, 0.0))
            totals[name] = (ts + float(s), tc + float(c))
    return {f"eval_{k}": s / max(c, 1.0) for k, (s, c) in totals.items()}


@dataclasses.dataclass
class StepParts:
    """Everything built around the step, without allocating any weights."""
    graphdef: Any
    optimizer: Any
    lr_fn: Callable
    shardings: TrainState  # of NamedShardings
    abs_state: TrainState  # of ShapeDtypeStructs carrying those shardings
    train_step: Any  # jitted (state, batch, frozen) -> (state, metrics)
    eval_step: Any  # jitted (params, rest, batch, index, frozen) -> {name: (sum, count)}

    def init(self, make_model, trainable, seed: int) -> TrainState:
        return init_state(make_model, trainable, self.optimizer, self.shardings, seed)


def build_step(cfg: RunConfig, make_model, loss_fn, mesh, rules, *, trainable=nnx.Param,
               extras: Optional[dict] = None, options: Any = None, objective_cfg=None) -> StepParts:
    """The train and eval steps of `cfg` (optimizer, schedule, objective config, NaN policy and
    its test hooks) for a model and loss, with the state's shardings on `mesh`."""
    extras = extras or {}
    obj_cfg = objective_cfg or cfg.objective
    optimizer = make_optimizer(cfg.optimizer, cfg.train.steps)
    lr_fn = schedule(cfg.optimizer, cfg.train.steps)
    graphdef, abs_params, abs_rest = abstract_model(make_model, trainable)
    shardings = state_shardings_for(abs_params, abs_rest, optimizer, mesh, rules)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abs_state = abstract_like(shardings, TrainState(step=scalar, params=abs_params, rest=abs_rest,
                                                    opt_state=jax.eval_shape(optimizer.init, abs_params),
                                                    skipped=scalar))
    train_step = make_train_step(graphdef, loss_fn, obj_cfg, optimizer, lr_fn, seed=cfg.seed,
                                 nan_policy=cfg.train.nan_policy, extras=extras, mesh=mesh, rules=rules,
                                 state_shardings=shardings, options=options,
                                 inject_nonfinite=tuple(cfg.train.debug_nonfinite_steps),
                                 inject_in=cfg.train.debug_nonfinite_in)
    eval_step = make_eval_step(graphdef, loss_fn, obj_cfg, extras, mesh, rules, cfg.seed, options)
    return StepParts(graphdef, optimizer, lr_fn, shardings, abs_state, train_step, eval_step)
