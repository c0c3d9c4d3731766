"""The one train loop. Every stage is a loss from objectives.LOSSES plus a data kind.

Hot path: `train_step(state, batch, frozen)` is a single `jax.jit` over pure pytrees (the NNX
graphdef is closed over, the state is donated). It sums loss and gradients over micro-batches,
divides once by the total count, applies the optax update, and replaces a non-finite update by
the previous state. Metrics come back as device arrays and are read one step later, so the host
never waits for the device before dispatching the next step.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm import checkpoint as ckpt_lib
from jaxllm.config import RunConfig, to_dict
from jaxllm.errors import CheckpointError, ConfigError, TrainingHalted
from jaxllm.guards import PreemptionGuard, SpikeDetector
from jaxllm.model import flops_per_token, use_dropout_rng
from jaxllm.monitor import MetricsLogger, Progress, peak_flops_per_device
from jaxllm.objectives import LOSSES, LossContext
from jaxllm.optim import make_optimizer, schedule
from jaxllm.sharding import (data_parallel_size, make_mesh, make_rules, match_shardings, path_str,
                             state_shardings, use_mesh_rules)
from jaxllm.stages import Stage, build_stage

VERSION = "0.1.0"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps attempted so far
    params: Any  # nnx.State of trainable params
    rest: Any  # nnx.State of everything else in the model (frozen weights, buffers)
    opt_state: Any
    skipped: jax.Array  # int32 scalar: updates skipped for non-finite loss/grad


# ---- model and state construction -----------------------------------------------------------
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


# ---- the step ------------------------------------------------------------------------------
def make_train_step(graphdef, loss_fn, obj_cfg, optimizer, lr_fn, *, seed: int, nan_policy: str,
                    extras: dict, mesh, rules, state_shardings: TrainState,
                    inject_nonfinite: tuple = (), inject_in: str = "loss"):
    def micro_loss(params, rest, batch, rng, frozen):
        model = nnx.merge(graphdef, params, rest)
        with use_dropout_rng(jax.random.fold_in(rng, 1)):
            out = loss_fn(model, batch, LossContext(rng=rng, cfg=obj_cfg, frozen=frozen, extras=extras))
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


def make_eval_step(graphdef, loss_fn, obj_cfg, extras, mesh, rules, seed: int):
    def eval_step(params, rest, batch, index, frozen):
        with use_mesh_rules(mesh, rules):
            model = nnx.merge(graphdef, params, rest)
            mb = jax.tree.map(lambda x: x[0], batch)
            rng = jax.random.fold_in(jax.random.key(seed + 1), index)  # fixed across evals
            out = loss_fn(model, mb, LossContext(rng=rng, cfg=obj_cfg, frozen=frozen, extras=extras))
            return {"loss": (out.loss_sum, out.denom), **out.metrics}
    return jax.jit(eval_step)


def evaluate(eval_step, state: TrainState, batches: list, frozen=None) -> dict:
    totals: dict = {}
    for i, b in enumerate(batches):
        for name, (s, c) in jax.device_get(eval_step(state.params, state.rest, b, i, frozen)).items():
            ts, tc = totals.get(name, (0.0, 0.0))
            totals[name] = (ts + float(s), tc + float(c))
    return {f"eval_{k}": s / max(c, 1.0) for k, (s, c) in totals.items()}


# ---- the run -------------------------------------------------------------------------------
def precompute_reference_logps(graphdef, reference, pipeline, mesh, rules, chunk: int = 64,
                               xent_chunk_tokens: int = 512) -> None:
    """DPO speed option: reference log-probs of every (chosen, rejected) pair computed once and
    stored in the examples (`ref_logps` [K]), so the train step runs no reference forward pass."""
    from jaxllm.objectives import _flat_k, policy_logps

    @jax.jit
    def logps(batch):
        with use_mesh_rules(mesh, rules):
            flat, B, K = _flat_k(batch)
            return policy_logps(nnx.merge(graphdef, reference), flat, xent_chunk_tokens).reshape(B, K)

    def fill(examples):
        for i in range(0, len(examples), chunk):
            part = examples[i:i + chunk]
            stacked = {k: jnp.asarray(np.stack([e[k] for e in part])) for k in part[0] if k != "ref_logps"}
            for e, r in zip(part, np.asarray(logps(stacked))):
                e["ref_logps"] = r  # the grain sources hold these same dicts
    for examples in pipeline.examples:
        fill(examples)
    for b in pipeline.eval_batches:
        b["ref_logps"] = np.asarray(logps({k: jnp.asarray(v) for k, v in b.items() if k != "ref_logps"}))


def check_batch(cfg: RunConfig, mesh) -> None:
    dp = data_parallel_size(mesh)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % dp:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} / train.grad_accum={cfg.train.grad_accum}"
                          f" = {micro} sequences per micro-batch is not divisible by the data-parallel "
                          f"size data*fsdp = {dp}; change train.batch_size or the mesh")


def run_metadata(cfg: RunConfig, stage: Stage, step: int, parent: Optional[str]) -> dict:
    return {"jaxllm_version": VERSION, "stage": cfg.stage, "step": step, "parent": parent,
            "config": to_dict(cfg), "model": to_dict(cfg.model), "tokenizer": stage.tokenizer.describe(),
            "objective": cfg.objective.name, "time": time.time()}


def check_resume_compatible(meta: dict, cfg: RunConfig, output_dir: str) -> None:
    if meta.get("model") != to_dict(cfg.model) or meta.get("stage") != cfg.stage:
        raise CheckpointError(f"output_dir {output_dir} holds checkpoints of another run (stage "
                              f"{meta.get('stage')!r} or model config differs); pick a new output_dir")


def check_tokenizer(meta: dict, tok, where: str) -> None:
    saved = (meta.get("tokenizer") or {}).get("sha256")
    if saved and saved != tok.sha256:
        raise CheckpointError(f"tokenizer {tok.path} differs from the one checkpoint {where} was trained "
                              f"with ({meta['tokenizer'].get('path')}); set data.tokenizer to that file")


class Trainer:
    """Wires config -> mesh -> stage -> state -> loop. One instance per run."""

    def __init__(self, cfg: RunConfig, stage_builder: Optional[Callable] = None):
        self.cfg = cfg
        self.pid, self.nproc = jax.process_index(), jax.process_count()
        self.mesh = make_mesh(cfg.mesh)
        self.rules = make_rules(cfg.mesh.rules)
        check_batch(cfg, self.mesh)
        self.stage = (stage_builder or build_stage)(cfg, self.pid, self.nproc)
        self.optimizer = make_optimizer(cfg.optimizer, cfg.train.steps)
        self.lr_fn = schedule(cfg.optimizer, cfg.train.steps)
        trainable = self.stage.trainable
        self.graphdef, abs_params, abs_rest = abstract_model(self.stage.make_model, trainable)
        self.shardings = state_shardings_for(abs_params, abs_rest, self.optimizer, self.mesh, self.rules)
        self._abs_params, self._abs_rest, self._trainable = abs_params, abs_rest, trainable
        self.output_dir = os.path.abspath(cfg.output_dir)
        self.ckpt: Optional[ckpt_lib.Checkpointer] = None

    # -- state: resume, init_from, or fresh --
    def _abstract_state(self) -> TrainState:
        abs_state = jax.eval_shape(lambda: init_state(self.stage.make_model, self._trainable,
                                                      self.optimizer, self.shardings, self.cfg.seed))
        return abstract_like(self.shardings, abs_state)

    def initial_state(self) -> tuple[TrainState, Optional[dict], Optional[str]]:
        cfg = self.cfg
        ckdir = os.path.join(self.output_dir, "checkpoints")
        if os.path.isdir(ckdir):
            existing = ckpt_lib.Checkpointer(ckdir, read_only=True)
            step = existing.latest_step()
            if step is not None:
                meta = existing.metadata(step)
                check_resume_compatible(meta, cfg, self.output_dir)
                abs_state = self._abstract_state()
                train_target = {"step": abs_state.step, "rest": abs_state.rest,
                                "opt_state": abs_state.opt_state, "skipped": abs_state.skipped}
                base_saved = not (cfg.finetune.mode == "lora" and not cfg.finetune.save_base)
                if not base_saved:
                    del train_target["rest"]
                out = existing.restore(step, abs_state.params, train_target)
                ts = out["train_state"]
                rest = ts["rest"] if base_saved else self.fresh_state()[0].rest
                state = TrainState(step=ts["step"], params=out["params"], rest=rest,
                                   opt_state=ts["opt_state"], skipped=ts["skipped"])
                existing.close()
                return state, out["data"], meta.get("parent")
        state, parent = self.fresh_state()
        return state, None, parent

    def fresh_state(self) -> tuple[TrainState, Optional[str]]:
        """Initialised state, with the init_from checkpoint's weights loaded if one is named."""
        state = init_state(self.stage.make_model, self._trainable, self.optimizer, self.shardings, self.cfg.seed)
        if self.cfg.checkpoint.init_from:
            return self._init_from(state)
        return state, None

    def _init_from(self, state: TrainState):
        cfg = self.cfg
        src, step = ckpt_lib.open_for_read(cfg.checkpoint.init_from)
        meta = src.metadata(step)
        check_tokenizer(meta, self.stage.tokenizer, cfg.checkpoint.init_from)
        abs_state = self._abstract_state()
        if cfg.checkpoint.init_mode == "full":
            train_target = {"step": abs_state.step, "rest": abs_state.rest,
                            "opt_state": abs_state.opt_state, "skipped": abs_state.skipped}
            out = src.restore(step, abs_state.params, train_target)
            ts = out["train_state"]
            state = TrainState(step=jnp.zeros((), jnp.int32), params=out["params"], rest=ts["rest"],
                               opt_state=ts["opt_state"], skipped=jnp.zeros((), jnp.int32))
            src.close()
            return state, f"{src.directory}/{step}"
        parent = f"{src.directory}/{step}"
        src.close()
        for prefix, where in self.stage.spec.init_sources:
            path = cfg.checkpoint.init_from if where == "init_from" else (getattr(cfg.rl, where) or
                                                                          cfg.checkpoint.init_from)
            src, step = ckpt_lib.open_for_read(path)
            check_tokenizer(src.metadata(step), self.stage.tokenizer, path)
            state = self._load_base_weights(src, step, state, prefix)
            src.close()
        return state, parent

    def _load_base_weights(self, src, step: int, state: TrainState, prefix: str = "") -> TrainState:
        """Parent params -> every non-LoRA param of this model under `prefix` (the parent's names
        lack the prefix), wherever it lives (trained or frozen). Params new to this stage (a reward
        head) keep their init; extra parent params are ignored."""
        saved = src.param_shapes(step)
        head = tuple(prefix.strip("/").split("/")) if prefix else ()
        target = {}
        for part, shard in (("params", self.shardings.params), ("rest", self.shardings.rest)):
            abs_part = abstract_like(shard, getattr(state, part))
            for path, var in nnx.to_flat_state(abs_part):
                if isinstance(var, nnx.LoRAParam) or not isinstance(var, nnx.Param) or path[:len(head)] != head:
                    continue
                inner = tuple(path[len(head):])
                if path_str(inner) not in saved:
                    if not path_str(path).startswith(self.stage.spec.new_params or ("\0",)):
                        raise CheckpointError(f"checkpoint {src.directory}/{step} has no tensor {path_str(inner)!r}; "
                                              f"it was written by a different model architecture")
                    continue
                target[inner] = var
        restored = src.restore(step, nnx.from_flat_state(target), partial=True)["params"]
        values = {head + tuple(p): v for p, v in nnx.to_flat_state(restored)}

        def overlay(part):
            return nnx.from_flat_state([(p, values.get(p, v)) for p, v in nnx.to_flat_state(part)])
        return dataclasses.replace(state, params=overlay(state.params), rest=overlay(state.rest))

    def reference(self, state: TrainState, resumed: bool):
        """Frozen copy of the stage's starting weights (e.g. the SFT policy for DPO)."""
        if not self.stage.spec.needs_reference:
            return None
        src = self.fresh_state()[0] if resumed else state
        full = nnx.merge_state(src.params, src.rest)
        if self.stage.spec.reference_prefix:
            full = full[self.stage.spec.reference_prefix]
        return {"reference": jax.tree.map(jnp.copy, full)}

    def _experience(self, data_state, frozen):
        """On-policy batches (PPO/GRPO): the rollout iterator, and held-out reward as extra eval."""
        from jaxllm.rewards import Rewards
        from jaxllm.rl import ExperienceIterator, RLContext, rl_eval
        stage = self.stage
        abstract = nnx.eval_shape(lambda: stage.make_model(nnx.Rngs(0)))
        policy = getattr(abstract, stage.spec.reference_prefix) if stage.spec.reference_prefix else abstract
        ctx = RLContext(cfg=self.cfg, graphdef=nnx.graphdef(abstract), reference=frozen["reference"],
                        ref_graphdef=nnx.graphdef(policy), mesh=self.mesh, rules=self.rules,
                        tokenizer=stage.tokenizer, rewards=Rewards(self.cfg.rl, self.mesh, self.rules, stage.tokenizer),
                        actor_critic=stage.spec.model == "actor_critic")
        stage.extra_eval = lambda graphdef, state: rl_eval(ctx, ctx.graphdef, state, stage.eval_records)
        prompts = stage.pipeline.iterator(None, self.cfg.data.num_threads, self.cfg.data.prefetch)
        return ExperienceIterator(ctx, prompts, data_state)

    # -- the loop --
    def run(self) -> dict:
        cfg, stage = self.cfg, self.stage
        state, data_state, parent = self.initial_state()
        frozen = self.reference(state, resumed=data_state is not None)
        if frozen is not None and cfg.objective.precompute_ref:
            precompute_reference_logps(self.graphdef, frozen["reference"], stage.pipeline, self.mesh, self.rules,
                                       xent_chunk_tokens=cfg.objective.xent_chunk_tokens)
            frozen = None  # the batches carry ref_logps; no reference model in the step
        start = int(jax.device_get(state.step))
        stop_at = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
        is_main = self.pid == 0
        self.ckpt = ckpt_lib.Checkpointer(os.path.join(self.output_dir, "checkpoints"),
                                          keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
        logger = MetricsLogger(self.output_dir, enabled=is_main)
        if is_main:
            with open(os.path.join(self.output_dir, "config.yaml"), "w") as f:
                from jaxllm.config import dump_yaml
                f.write(dump_yaml(cfg))
        train_step = make_train_step(self.graphdef, stage.loss_fn, cfg.objective, self.optimizer, self.lr_fn,
                                     seed=cfg.seed, nan_policy=cfg.train.nan_policy, extras=stage.extras,
                                     mesh=self.mesh, rules=self.rules, state_shardings=self.shardings,
                                     inject_nonfinite=tuple(cfg.train.debug_nonfinite_steps),
                                     inject_in=cfg.train.debug_nonfinite_in)
        eval_step = make_eval_step(self.graphdef, stage.loss_fn, cfg.objective, stage.extras, self.mesh,
                                   self.rules, cfg.seed)
        from jaxllm.data.pipeline import to_global
        eval_batches = [to_global(b, self.mesh, self.rules) for b in stage.pipeline.eval_batches]
        on_policy = stage.spec.on_policy
        if on_policy:  # batches are rollouts of the current policy; the reference serves the rollouts
            it = self._experience(data_state, frozen)
            frozen = None
        else:
            it = stage.pipeline.iterator(data_state, cfg.data.num_threads, cfg.data.prefetch)
        progress = Progress(cfg.train.steps, start, cfg.train.progress and is_main)
        if data_state is not None and is_main:
            progress.write(f"resuming from checkpoint step {start} in {self.ckpt.directory}")
        tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        fpt = flops_per_token(cfg.model, cfg.train.seq_len)
        peak = peak_flops_per_device()
        n_dev = jax.device_count()
        last = {}

        def save(step_done: int):
            meta = run_metadata(cfg, stage, step_done, parent)
            train_part = {"step": state.step, "rest": state.rest, "opt_state": state.opt_state,
                          "skipped": state.skipped}
            if cfg.finetune.mode == "lora" and not cfg.finetune.save_base:
                del train_part["rest"]  # adapters + optimizer only; the base comes from init_from
            self.ckpt.save(step_done, state.params, train_part, it.get_state(), meta)
            saved.append(step_done)

        saved = [start] if self.ckpt.latest_step() == start else []

        def do_eval(step_done: int):
            m = evaluate(eval_step, state, eval_batches, frozen) if eval_batches else {}
            if stage.extra_eval is not None:
                m.update(stage.extra_eval(self.graphdef, state))
            if not m:
                return {}
            logger.log(step_done, m)
            progress.write(f"step {step_done}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items()))
            return m

        if start == 0 and (eval_batches or stage.extra_eval) and cfg.eval.every:
            last.update(do_eval(0))
        pending = None  # (step_done, metrics on device, wall time at dispatch)
        t_prev = time.perf_counter()
        self.spikes = SpikeDetector(cfg.train.spike_factor)
        guard = PreemptionGuard(cfg.train.preemption_grace_s, multihost=self.nproc > 1,
                                log=progress.write if is_main else (lambda m: None))
        preempted = False
        try:
            for step in range(start, stop_at):
                if on_policy:
                    batch = it.next_for(state)
                else:
                    batch = to_global(next(it), self.mesh, self.rules, cfg.train.grad_accum)
                state, metrics = train_step(state, batch, frozen)
                if pending is not None:
                    t_prev = self._report(pending, logger, progress, last, t_prev, tokens_per_step, fpt,
                                          peak, n_dev)
                pending = (step + 1, metrics, it.pop_metrics() if on_policy else {})
                done = step + 1
                if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < stop_at:
                    save(done)
                if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.steps:
                    last.update(do_eval(done))
                if done < stop_at and guard.should_stop(done):
                    preempted = True
                    break
            if pending is not None:
                self._report(pending, logger, progress, last, t_prev, tokens_per_step, fpt, peak, n_dev)
            final = int(jax.device_get(state.step))
            if not saved or saved[-1] != final:
                save(final)
            if preempted:
                self.ckpt.wait()
                progress.write(f"preempted: checkpoint of step {final} saved in {self.output_dir}; "
                               f"run the same command again to resume")
                last["preempted"] = True
            elif final >= cfg.train.steps:
                last.update(do_eval(final))
        finally:
            self.ckpt.close()
            guard.close()
            progress.close()
            logger.close()
        self.state = state
        return {"step": int(jax.device_get(state.step)), **last}

    def _report(self, pending, logger, progress, last, t_prev, tokens_per_step, fpt, peak, n_dev):
        step_done, metrics, host_metrics = pending
        m = jax.device_get(metrics)  # waits for that step only; the next one is already queued
        now = time.perf_counter()
        if not bool(m["finite"]):
            msg = f"non-finite loss or gradient at step {step_done} (update skipped)"
            if self.cfg.train.nan_policy == "stop":
                raise TrainingHalted(f"{msg}; stopping as train.nan_policy=stop. The last checkpoint "
                                     f"is intact; lower optimizer.lr or check the data")
            progress.write(msg)
        dt = now - t_prev
        m = {k: float(v) for k, v in m.items()}
        m["tokens_per_s"] = tokens_per_step / dt if dt > 0 else 0.0
        m["step_time_s"] = dt
        if peak:
            m["mfu"] = fpt * m["tokens_per_s"] / (peak * n_dev)
        m.update(host_metrics)
        spike = self.spikes.update(step_done, m["loss"])
        if spike:
            m["loss_spike"] = 1.0
            progress.write(spike)
        last.update({"loss": m["loss"]})
        if step_done % self.cfg.train.log_every == 0 or step_done == 1 or host_metrics or spike or not m["finite"]:
            logger.log(step_done, m)
        progress.update(1, f"loss={m['loss']:.3f} tok/s={m['tokens_per_s']:.0f}")
        return now


def train(cfg: RunConfig) -> dict:
    return Trainer(cfg).run()
