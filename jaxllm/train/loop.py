"""The one train loop: config -> mesh -> state -> steps, for whatever objective it is handed.

The loop names no objective. What differs between objectives comes through the `Stage` it is
given (built by `jaxllm.objectives.build_stage`): the loss, the model, whether a frozen reference
is needed, and two hooks, `prepare` (e.g. DPO's reference log-probs computed once) and
`batch_source` (e.g. on-policy rollouts instead of the input pipeline).
"""

from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm import __version__
from jaxllm.config import RunConfig, dump_yaml, to_dict
from jaxllm.core import checkpoint as ckpt_lib
from jaxllm.core import storage
from jaxllm.core.arrays import to_global
from jaxllm.core.distributed import allgather_json
from jaxllm.core.guards import PreemptionGuard, SpikeDetector
from jaxllm.core.loading import check_tokenizer
from jaxllm.core.model import flops_per_token
from jaxllm.core.monitor import MetricsLogger, Progress, peak_flops_per_device
from jaxllm.core.sharding import data_parallel_size, make_mesh, make_rules
from jaxllm.errors import CheckpointError, ConfigError, TrainingHalted
from jaxllm.train.objective import Stage
from jaxllm.train.state import TrainState, load_base_weights
from jaxllm.train.step import build_step, evaluate


class PipelineSource:
    """Batches from the input pipeline: every objective's batch source unless it brings its own."""

    def __init__(self, trainer: "Trainer", data_state: Optional[dict]):
        cfg = trainer.cfg
        self.pipeline = trainer.stage.pipeline
        self.it = self.pipeline.iterator(data_state)
        self.mesh, self.rules, self.grad_accum = trainer.mesh, trainer.rules, cfg.train.grad_accum
        self.pad = self.cells = 0

    def next(self, state) -> dict:
        batch = next(self.it)
        if "segment_ids" in batch:  # host numpy: costs no device sync
            self.pad, self.cells = self.pad + int((batch["segment_ids"] == 0).sum()), self.cells + batch["segment_ids"].size
        return to_global(batch, self.mesh, self.rules, self.grad_accum)

    def get_state(self) -> dict:
        return self.it.get_state()

    def pop_metrics(self) -> dict:
        """The padding fraction of the rows since the last call (packing quality)."""
        out = {"padding_fraction": self.pad / self.cells} if self.cells else {}
        self.pad = self.cells = 0
        return out

    def report(self):
        """What the input pipeline read and dropped so far (carried in the iterator state)."""
        return self.pipeline.drop_report(self.it.get_state())

    def close(self) -> None:
        """Stops grain's worker processes and threads."""
        if hasattr(self.it, "close"):
            self.it.close()


def pipeline_source(trainer: "Trainer", data_state: Optional[dict], frozen):
    return PipelineSource(trainer, data_state), frozen


def check_batch(cfg: RunConfig, mesh) -> None:
    dp = data_parallel_size(mesh)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % dp:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} / train.grad_accum={cfg.train.grad_accum}"
                          f" = {micro} sequences per micro-batch is not divisible by the data-parallel "
                          f"size data*fsdp = {dp}; change train.batch_size or the mesh")


def run_metadata(cfg: RunConfig, stage: Stage, step: int, parent: Optional[str]) -> dict:
    return {"jaxllm_version": __version__, "stage": cfg.stage, "step": step, "parent": parent,
            "config": to_dict(cfg), "model": to_dict(cfg.model), "tokenizer": stage.tokenizer.describe(),
            "objective": cfg.objective.name, "time": time.time()}


def check_resume_compatible(meta: dict, cfg: RunConfig, output_dir: str) -> None:
    if meta.get("model") != to_dict(cfg.model) or meta.get("stage") != cfg.stage:
        raise CheckpointError(f"output_dir {output_dir} holds checkpoints of another run (stage "
                              f"{meta.get('stage')!r} or model config differs); pick a new output_dir")


class Trainer:
    """Wires config -> mesh -> state -> loop for one stage. One instance per run."""

    def __init__(self, cfg: RunConfig, stage: Stage):
        self.cfg, self.stage = cfg, stage
        self.pid, self.nproc = jax.process_index(), jax.process_count()
        self.mesh = make_mesh(cfg.mesh)
        self.rules = make_rules(cfg.mesh.rules)
        check_batch(cfg, self.mesh)
        self.parts = build_step(cfg, stage.make_model, stage.loss_fn, self.mesh, self.rules,
                                trainable=stage.trainable, extras=stage.extras, options=stage.options)
        self.graphdef, self.optimizer, self.lr_fn = self.parts.graphdef, self.parts.optimizer, self.parts.lr_fn
        self.shardings = self.parts.shardings
        self.output_dir = storage.join(cfg.output_dir)  # absolute local path or a URL
        self.ckpt: Optional[ckpt_lib.Checkpointer] = None
        # LoRA without save_base checkpoints adapters + optimizer only; the base comes from init_from
        self.with_base = not (cfg.finetune.mode == "lora" and not cfg.finetune.save_base)

    # -- state: resume, init_from, or fresh --
    def initial_state(self) -> tuple[TrainState, Optional[dict], Optional[str]]:
        ckdir = storage.join(self.output_dir, "checkpoints")
        if storage.isdir(ckdir):
            existing = ckpt_lib.Checkpointer(ckdir, read_only=True)
            step = existing.latest_step()
            if step is not None:
                meta = existing.metadata(step)
                check_resume_compatible(meta, self.cfg, self.output_dir)
                state, data = self._restore_full(existing, step, self.with_base)
                data = self._own_data_state(data, existing.directory, step)
                existing.close()
                return state, data, meta.get("parent")
        state, parent = self.fresh_state()
        return state, None, parent

    def _restore_full(self, src, step: int, with_rest: bool, keep_step: bool = True):
        """Params, optimizer state and the data iterator's state of checkpoint `step`."""
        target = self.parts.abs_state.saved_parts(with_rest)
        out = src.restore(step, self.parts.abs_state.params, target)
        ts = out["train_state"]
        rest = ts["rest"] if with_rest else self.fresh_state()[0].rest
        zero = jnp.zeros((), jnp.int32)
        state = TrainState(step=ts["step"] if keep_step else zero, params=out["params"], rest=rest,
                           opt_state=ts["opt_state"], skipped=ts["skipped"] if keep_step else zero)
        return state, out.get("data")

    def _own_data_state(self, data: Optional[dict], directory: str, step: int) -> Optional[dict]:
        """This process's iterator state from a checkpoint written by one process or by many."""
        if not isinstance(data, dict) or "processes" not in data:
            if data is not None and self.nproc > 1:
                raise CheckpointError(f"checkpoint {directory}/{step} holds one process's data state but this run "
                                      f"has {self.nproc} processes; resume it with 1 process")
            return data
        states = data["processes"]
        if len(states) != self.nproc:
            raise CheckpointError(f"checkpoint {directory}/{step} was written by {len(states)} processes, each "
                                  f"reading its own part of the data; resume it with {len(states)} processes "
                                  f"(or start a new run from it with checkpoint.init_from)")
        return states[self.pid]

    def fresh_state(self) -> tuple[TrainState, Optional[str]]:
        """Initialised state, with the init_from checkpoint's weights loaded if one is named."""
        state = self.parts.init(self.stage.make_model, self.stage.trainable, self.cfg.seed)
        if self.cfg.checkpoint.init_from:
            return self._init_from(state)
        return state, None

    def _init_from(self, state: TrainState):
        cfg, objective = self.cfg, self.stage.objective
        src, step = ckpt_lib.open_for_read(cfg.checkpoint.init_from)
        check_tokenizer(src.metadata(step), self.stage.tokenizer, cfg.checkpoint.init_from)
        parent = f"{src.directory}/{step}"
        if cfg.checkpoint.init_mode == "full":
            state, _ = self._restore_full(src, step, with_rest=True, keep_step=False)
            src.close()
            return state, parent
        src.close()
        for prefix, where in objective.init_sources:
            path = cfg.checkpoint.init_from if where == "init_from" else (getattr(cfg.rl, where) or
                                                                          cfg.checkpoint.init_from)
            src, step = ckpt_lib.open_for_read(path)
            check_tokenizer(src.metadata(step), self.stage.tokenizer, path)
            state = load_base_weights(src, step, state, self.shardings, prefix, objective.new_params)
            src.close()
        return state, parent

    def reference(self, state: TrainState, resumed: bool):
        """Frozen copy of the stage's starting weights (e.g. the SFT policy for DPO)."""
        objective = self.stage.objective
        if not objective.needs_reference:
            return None
        src = self.fresh_state()[0] if resumed else state
        full = nnx.merge_state(src.params, src.rest)
        if objective.reference_prefix:
            full = full[objective.reference_prefix]
        return {"reference": jax.tree.map(jnp.copy, full)}

    # -- the loop --
    def run(self) -> dict:
        cfg = self.cfg
        self.state, data_state, self.parent = self.initial_state()
        frozen = self.reference(self.state, resumed=data_state is not None)
        objective = self.stage.objective
        if objective.prepare is not None:
            frozen = objective.prepare(self, frozen)
        self.source, self.frozen = (objective.batch_source or pipeline_source)(self, data_state, frozen)
        start = int(jax.device_get(self.state.step))
        stop_at = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
        self._open(start, resumed=data_state is not None)
        guard = PreemptionGuard(cfg.train.preemption_grace_s, multihost=self.nproc > 1, log=self._say)
        preempted, pending = False, None
        try:
            if start == 0 and cfg.eval.every and (self.eval_batches or self.stage.extra_eval):
                self._eval(0)
                self.t_prev = time.perf_counter()  # the first step's time excludes the eval
            for step in range(start, stop_at):
                self.state, metrics = self.parts.train_step(self.state, self.source.next(self.state), self.frozen)
                if pending is not None:
                    self._report(*pending)
                pending = (step + 1, metrics, self.source.pop_metrics())
                done = step + 1
                if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < stop_at:
                    self._save(done)
                if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.steps:
                    self._eval(done)
                if done < stop_at and guard.should_stop(done):
                    preempted = True
                    break
            if pending is not None:
                self._report(*pending)
            self._finish(preempted)
        finally:
            self._close(guard)
        return {"step": int(jax.device_get(self.state.step)), **self.last}

    def _open(self, start: int, resumed: bool) -> None:
        """Checkpointer, metrics logger, progress bar, the resolved config, held-out batches."""
        cfg, is_main = self.cfg, self.pid == 0
        self.ckpt = ckpt_lib.Checkpointer(storage.join(self.output_dir, "checkpoints"),
                                          keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
        self.logger = MetricsLogger(self.output_dir, enabled=is_main, tensorboard=cfg.log.tensorboard,
                                    wandb=cfg.log.wandb, run_config=to_dict(cfg))
        if is_main:
            storage.write_atomic(storage.join(self.output_dir, "config.yaml"), dump_yaml(cfg))
        self.eval_batches = [to_global(b, self.mesh, self.rules) for b in self.stage.pipeline.eval_batches]
        self.progress = Progress(cfg.train.steps, start, cfg.train.progress and is_main)
        if resumed:
            self._say(f"resuming from checkpoint step {start} in {self.ckpt.directory}")
        self.saved = [start] if self.ckpt.latest_step() == start else []
        self.last: dict = {}
        self.spikes = SpikeDetector(cfg.train.spike_factor)
        self.t_prev = time.perf_counter()
        self.flops_per_s_peak = (peak_flops_per_device() or 0.0) * jax.device_count()

    def _say(self, text: str) -> None:
        if self.pid == 0:
            self.progress.write(text)

    def _save(self, step_done: int) -> None:
        meta = run_metadata(self.cfg, self.stage, step_done, self.parent)
        data_state = self.source.get_state()
        if self.nproc > 1:  # each process reads its own part of the data: keep every iterator's state
            data_state = {"processes": allgather_json(data_state)}
        self.ckpt.save(step_done, self.state.params, self.state.saved_parts(self.with_base), data_state, meta)
        self.saved.append(step_done)

    def _eval(self, step_done: int) -> None:
        m = evaluate(self.parts.eval_step, self.state, self.eval_batches, self.frozen) if self.eval_batches else {}
        if self.stage.extra_eval is not None:
            m.update(self.stage.extra_eval(self.graphdef, self.state))
        if m:
            self.logger.log(step_done, m)
            self.progress.write(f"step {step_done}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items()))
            self.last.update(m)

    def _finish(self, preempted: bool) -> None:
        final = int(jax.device_get(self.state.step))
        if not self.saved or self.saved[-1] != final:
            self._save(final)
        if preempted:
            self.ckpt.wait()
            self.progress.write(f"preempted: checkpoint of step {final} saved in {self.output_dir}; "
                                f"run the same command again to resume")
            self.last["preempted"] = True
        elif final >= self.cfg.train.steps:
            self._eval(final)
        data_report = getattr(self.source, "report", None)
        if data_report is not None and self.pid == 0:
            rep = data_report()
            self.last["data_report"] = rep.as_dict()
            if rep.dropped:
                self.progress.write(f"data (this process, whole run): {rep.summary()}")

    def _close(self, guard: PreemptionGuard) -> None:
        source_close = getattr(getattr(self, "source", None), "close", lambda: None)
        for closing in (self.ckpt.close, guard.close, self.progress.close, self.logger.close, source_close):
            closing()

    def _report(self, step_done: int, metrics: dict, host_metrics: dict) -> None:
        """Reads step `step_done`'s metrics: waits for that step only, the next one is queued."""
        cfg = self.cfg
        m = jax.device_get(metrics)
        now = time.perf_counter()
        if not bool(m["finite"]):
            msg = f"non-finite loss or gradient at step {step_done} (update skipped)"
            if cfg.train.nan_policy == "stop":
                raise TrainingHalted(f"{msg}; stopping as train.nan_policy=stop. The last checkpoint "
                                     f"is intact; lower optimizer.lr or check the data")
            self.progress.write(msg)
        dt, self.t_prev = now - self.t_prev, now
        m = {k: float(v) for k, v in m.items()}
        m["tokens_per_s"] = cfg.train.batch_size * cfg.train.seq_len / dt if dt > 0 else 0.0
        m["step_time_s"] = dt
        if self.flops_per_s_peak:
            m["mfu"] = flops_per_token(cfg.model, cfg.train.seq_len) * m["tokens_per_s"] / self.flops_per_s_peak
        m.update(host_metrics)
        spike = self.spikes.update(step_done, m["loss"])
        if spike:
            m["loss_spike"] = 1.0
            self.progress.write(spike)
        self.last.update({"loss": m["loss"]})
        if step_done % cfg.train.log_every == 0 or step_done == 1 or host_metrics or spike or not m["finite"]:
            self.logger.log(step_done, m)
        self.progress.update(1, f"loss={m['loss']:.3f} tok/s={m['tokens_per_s']:.0f}")
