"""`jaxllm pipeline`: a chain of stages from one YAML, each stage's output the next one's input.

A stage is a run config (+ overrides) trained by the one Trainer, a tokenizer, or (kind: eval) an
lm-evaluation-harness run on another stage's checkpoint (`checkpoint: STAGE`; results in its own
output dir). Overrides may name another stage's output as `${name}`; those references (and an eval
stage's checkpoint) are the dependencies, so stages run in any order they allow. A finished stage
leaves `stage_done.json` and is skipped on re-run; an unfinished one resumes from its last
checkpoint (the Trainer's own resume). `--from STAGE` moves that stage's output and its
dependents' to `_previous/` and runs them again.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

from jaxllm.app.report import StageRun, write_report
from jaxllm.config import _suggest, load_config
from jaxllm.core import storage
from jaxllm.errors import ConfigError
from jaxllm.objectives import train, validate

DONE = "stage_done.json"
_REF = re.compile(r"\$\{([A-Za-z_][\w-]*)\}")


@dataclass
class StageSpec:
    name: str = ""
    kind: Literal["train", "tokenizer", "eval"] = "train"
    config: str = ""  # train: run config YAML, relative to the pipeline file
    overrides: list[str] = field(default_factory=list)  # key=value; ${stage} = that stage's output dir
    vocab_size: int = 1024  # tokenizer
    model_type: str = "bpe"  # tokenizer
    inputs: list[str] = field(default_factory=list)  # tokenizer: text files; empty = embedded corpus
    checkpoint: str = ""  # eval: the stage whose checkpoint is evaluated
    tasks: list[str] = field(default_factory=list)  # eval: lm-evaluation-harness task names
    include_path: str = ""  # eval: directory of local task YAMLs, relative to the pipeline file
    limit: Optional[float] = None  # eval: at most this many examples per task (a fraction if < 1)
    num_fewshot: Optional[int] = None  # eval
    batch_size: int = 8  # eval


@dataclass
class ReportConfig:
    prompts: list[str] = field(default_factory=lambda: ["12+30=", "reverse abc", "sort 3 1 2"])
    max_new_tokens: int = 16
    text_prompts: list[str] = field(default_factory=lambda: ["The "])  # for base (pretrain) models


@dataclass
class PipelineConfig:
    output_dir: str = "runs/pipeline"
    stages: list[StageSpec] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # applied to every train stage first
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir is empty: set output_dir=PATH")


def load_pipeline(path: str, overrides: list[str] = ()) -> tuple[PipelineConfig, str]:
    cfg = load_config(path, list(overrides), cls=PipelineConfig)
    base = os.path.dirname(os.path.abspath(path))
    names = [s.name for s in cfg.stages]
    if not cfg.stages:
        raise ConfigError(f"{path}: stages is empty; list at least one stage")
    for s in cfg.stages:
        if not s.name or names.count(s.name) > 1:
            raise ConfigError(f"{path}: every stage needs a unique name (got {s.name!r})")
        if s.kind == "train" and not s.config:
            raise ConfigError(f"pipeline stage {s.name}: set config=RUN_CONFIG.yaml")
        if s.kind == "eval":
            _check_eval_stage(s, cfg, path)
        for dep in deps_of(s, cfg):
            if dep not in names:
                raise ConfigError(f"pipeline stage {s.name} refers to ${{{dep}}} but no stage is named {dep!r}"
                                  + _suggest(dep, names))
    return cfg, base


def _check_eval_stage(s: StageSpec, cfg: PipelineConfig, path: str) -> None:
    trained = [x.name for x in cfg.stages if x.kind == "train"]
    if s.checkpoint not in trained:
        raise ConfigError(f"{path}: eval stage {s.name}: checkpoint={s.checkpoint!r} names no train stage"
                          + _suggest(s.checkpoint, trained))
    if not s.tasks:
        raise ConfigError(f"{path}: eval stage {s.name}: tasks is empty; list lm-eval task names")


def deps_of(stage: StageSpec, cfg: Optional[PipelineConfig] = None) -> list[str]:
    """Stages this one refers to as ${name}: in its own overrides and (train stages) the shared ones;
    an eval stage also depends on the stage it evaluates."""
    shared = cfg.overrides if cfg is not None and stage.kind == "train" else []
    refs = {m for o in [*shared, *stage.overrides] for m in _REF.findall(o)}
    if stage.kind == "eval" and stage.checkpoint:
        refs.add(stage.checkpoint)
    return sorted(refs - {stage.name})


def ordered(cfg: PipelineConfig) -> list[StageSpec]:
    """Stages in the listed order, each moved after the stages it refers to."""
    done: list[StageSpec] = []
    pending = list(cfg.stages)
    while pending:
        ready = [s for s in pending if all(d in {x.name for x in done} for d in deps_of(s, cfg))]
        if not ready:
            raise ConfigError("pipeline stages refer to each other in a cycle: "
                              + ", ".join(f"{s.name} <- {deps_of(s, cfg)}" for s in pending))
        done.append(ready[0])
        pending.remove(ready[0])
    return done


def dependents(cfg: PipelineConfig, name: str) -> set[str]:
    out, grew = {name}, True
    while grew:
        grew = False
        for s in cfg.stages:
            if s.name not in out and out & set(deps_of(s, cfg)):
                out.add(s.name)
                grew = True
    return out


def stage_dir(cfg: PipelineConfig, name: str) -> str:
    return storage.join(cfg.output_dir, name)


def resolve(cfg: PipelineConfig, text: str) -> str:
    return _REF.sub(lambda m: stage_dir(cfg, m.group(1)), text)


def run_config(cfg: PipelineConfig, base: str, stage: StageSpec):
    path = stage.config if os.path.isabs(stage.config) else os.path.join(base, stage.config)
    run_cfg = load_config(path, [f"output_dir={stage_dir(cfg, stage.name)}",
                                 *(resolve(cfg, o) for o in [*cfg.overrides, *stage.overrides])])
    validate(run_cfg)
    return run_cfg


def _include_path(base: str, stage: StageSpec) -> Optional[str]:
    p = stage.include_path
    return (p if os.path.isabs(p) else os.path.join(base, p)) if p else None


def _run_stage(cfg: PipelineConfig, base: str, stage: StageSpec, log) -> dict:
    out = stage_dir(cfg, stage.name)
    if stage.kind == "eval":
        from jaxllm.app.evaluate import format_table, metric_rows, run_eval
        record = run_eval(stage_dir(cfg, stage.checkpoint), stage.tasks, include_path=_include_path(base, stage),
                          limit=stage.limit, batch_size=stage.batch_size, num_fewshot=stage.num_fewshot,
                          output=storage.join(out, "results.json"))
        log(format_table(record))
        return {f"{task}/{metric}": value for task, metric, value, _ in metric_rows(record)}
    if stage.kind == "tokenizer":
        from jaxllm.data.sources import texts_for_tokenizer
        from jaxllm.data.tokenizer import train_tokenizer
        storage.makedirs(out)
        tok = train_tokenizer(texts_for_tokenizer([resolve(cfg, i) for i in stage.inputs], "text"),
                              storage.join(out, "tokenizer"), stage.vocab_size, stage.model_type)
        return {"tokenizer": tok.path, "vocab_size": tok.vocab_size}
    run_cfg = run_config(cfg, base, stage)
    ckdir = storage.join(out, "checkpoints")
    if storage.isdir(ckdir) and any(d.isdigit() for d in storage.listdir(ckdir)):
        log(f"[{stage.name}] resuming from its last checkpoint in {ckdir}")
    result = train(run_cfg)
    return {k: v for k, v in result.items() if isinstance(v, (int, float, bool))}


def run_pipeline(path: str, overrides: list[str] = (), from_stage: Optional[str] = None, log=print,
                 report: bool = True) -> dict:
    cfg, base = load_pipeline(path, overrides)
    stages = ordered(cfg)
    for s in stages:  # every run config loads (and validates) before any stage runs
        if s.kind == "train":
            run_config(cfg, base, s)
        elif s.kind == "eval":  # lm-eval installed, task names known: not found out hours later
            from jaxllm.app.evaluate import check_installed, task_manager
            check_installed()
            task_manager(s.tasks, _include_path(base, s))
    storage.makedirs(cfg.output_dir)
    if from_stage is not None:
        names = [s.name for s in stages]
        if from_stage not in names:
            raise ConfigError(f"--from {from_stage}: no such stage" + _suggest(from_stage, names))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in dependents(cfg, from_stage):
            if storage.exists(stage_dir(cfg, name)):
                dest = storage.join(cfg.output_dir, "_previous", f"{name}-{stamp}")
                storage.move(stage_dir(cfg, name), dest)  # kept, never deleted
                log(f"[{name}] previous output moved to {dest}")
    summary = {}
    for s in stages:
        done_file = storage.join(stage_dir(cfg, s.name), DONE)
        if storage.exists(done_file):
            summary[s.name] = json.loads(storage.read_text(done_file))
            log(f"[{s.name}] finished earlier, skipped")
            continue
        log(f"[{s.name}] running")
        t0 = time.time()
        result = _run_stage(cfg, base, s, log)
        if result.get("preempted"):  # checkpoint saved; the same command resumes this stage
            log(f"[{s.name}] preempted; run the pipeline again to resume")
            return summary
        record = {"stage": s.name, "kind": s.kind, "wall_s": time.time() - t0, "result": result,
                  "depends_on": deps_of(s, cfg), "finished": time.time()}
        storage.write_atomic(done_file, json.dumps(record, indent=2))
        summary[s.name] = record
        log(f"[{s.name}] done in {record['wall_s']:.0f} s")
    if report:
        runs = [StageRun(s.name, s.kind, stage_dir(cfg, s.name), summary[s.name],
                         run_config(cfg, base, s) if s.kind == "train" else None)
                for s in stages if s.kind != "eval"]  # eval results: {stage}/results.json
        summary["report"] = write_report(cfg.output_dir, runs, cfg.report)
        log(f"report: {summary['report']}")
    return summary
