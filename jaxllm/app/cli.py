"""`jaxllm` command line. User mistakes end as one `error: ...` line and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _set_cpu_devices(argv: list[str]) -> list[str]:
    """`--cpu-devices N` must take effect before jax is imported."""
    if "--cpu-devices" in argv:
        i = argv.index("--cpu-devices")
        n = argv[i + 1]
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        argv = argv[:i] + argv[i + 2:]
    return argv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxllm", description="Train a language model through every stage.")
    p.add_argument("--cpu-devices", type=int, help="simulate N CPU devices (set before JAX starts)")
    mh = p.add_argument_group("multi-host (default: from JAXLLM_*/SLURM/TPU environment; see jaxllm/core/distributed.py)")
    mh.add_argument("--coordinator", help="HOST:PORT of process 0")
    mh.add_argument("--num-processes", type=int)
    mh.add_argument("--process-id", type=int)
    mh.add_argument("--init-timeout", type=int, default=300, help="seconds to wait for every process to join")
    mh.add_argument("--heartbeat-timeout", type=int, default=100,
                    help="seconds after which a silent process ends the run")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one stage from a run config")
    t.add_argument("config", help="run config YAML")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    g = sub.add_parser("generate", help="sample from a checkpoint")
    g.add_argument("ckpt", help="run output_dir or checkpoint step dir")
    g.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
    g.add_argument("--max-new", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)

    i = sub.add_parser("info", help="show a checkpoint's metadata, lineage and eval results")
    i.add_argument("ckpt")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on lm-evaluation-harness tasks (extra: jaxllm[eval])")
    ev.add_argument("ckpt", help="run output_dir or checkpoint step dir")
    ev.add_argument("--tasks", required=True, help="comma-separated task names (built-in or under --include-path)")
    ev.add_argument("--include-path", help="directory of local task YAMLs")
    ev.add_argument("--limit", type=float, help="at most N examples per task (a fraction if < 1)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--num-fewshot", type=int)
    ev.add_argument("--chat", action="store_true", help="render prompts with the tokenizer's chat format")
    ev.add_argument("--output", help="results JSON (default: RUN_DIR/eval/results.json)")

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    toks = tok.add_subparsers(dest="tok_command", required=True)
    tt = toks.add_parser("train", help="train a SentencePiece tokenizer")
    tt.add_argument("--input", action="append", default=[],
                    help="text/JSONL/Parquet file or glob (repeatable); omit for the embedded corpus")
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--out", required=True, help="output prefix; writes PREFIX.model")
    tt.add_argument("--vocab-size", type=int, default=1024)
    tt.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])

    mg = sub.add_parser("merge", help="fold LoRA adapters into the base weights")
    mg.add_argument("ckpt", help="LoRA run output_dir or checkpoint step dir")
    mg.add_argument("--out", required=True, help="new output_dir for the merged checkpoint")

    cv = sub.add_parser("convert", help="convert between Hugging Face and jaxllm checkpoints")
    cvs = cv.add_subparsers(dest="convert_command", required=True)
    h2j = cvs.add_parser("hf-to-jaxllm", help="HF Llama/Mistral/Qwen2 dir -> jaxllm checkpoint (run dir)")
    h2j.add_argument("--hf-dir", required=True, help="dir with config.json and *.safetensors")
    h2j.add_argument("--out", required=True,
                     help="new run dir: checkpoints/0, model.yaml, tokenizer.model or tokenizer.json (+ its configs)")
    h2j.add_argument("--mesh", help="mesh YAML to place params on while converting (default: fsdp over all devices)")
    h2j.add_argument("--tokenizer", help="tokenizer to record: a SentencePiece .model, a tokenizer.json or a dir "
                     "(default: the HF dir's tokenizer.model, else its tokenizer.json)")
    h2j.add_argument("--scan-layers", action="store_true", help="write stacked layers (model.scan_layers=true)")
    j2h = cvs.add_parser("jaxllm-to-hf", help="jaxllm checkpoint -> HF dir (config.json + model.safetensors)")
    j2h.add_argument("--ckpt", required=True, help="run output_dir or checkpoint step dir")
    j2h.add_argument("--out", required=True, help="new HF model dir")
    j2h.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2"])
    j2h.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                     help="stored weight dtype (default: the model's compute dtype)")

    pl = sub.add_parser("pipeline", help="run a chain of stages from one YAML, with a report")
    pl.add_argument("config", help="pipeline YAML (e.g. configs/pipelines/default.yaml)")
    pl.add_argument("--from", dest="from_stage", help="re-run from this stage (older outputs go to _previous/)")
    pl.add_argument("--no-report", action="store_true")
    pl.add_argument("overrides", nargs="*", help="pipeline-level key=value overrides")

    lb = sub.add_parser("label", help="RLAIF: sample K completions per prompt and rank them with an AI judge")
    lb.add_argument("config", help="run config whose data section gives the prompts (records with 'prompt')")
    lb.add_argument("--policy", required=True, help="policy checkpoint that writes the completions")
    lb.add_argument("--judge", required=True, help="reward-model checkpoint (--judge-kind rm) or judge LM (lm)")
    lb.add_argument("--judge-kind", default="rm", choices=["rm", "lm"])
    lb.add_argument("--out", required=True, help="JSONL file to write (never overwritten)")
    lb.add_argument("--k", type=int, default=4, help="completions per prompt")
    lb.add_argument("--n", type=int, default=0, help="label at most this many prompts (0 = all)")
    lb.add_argument("--max-new", type=int, default=16)
    lb.add_argument("--temperature", type=float, default=1.0)
    lb.add_argument("--top-p", type=float, default=1.0)
    lb.add_argument("--seed", type=int, default=0)
    lb.add_argument("overrides", nargs="*")

    d = sub.add_parser("data", help="data tools")
    ds = d.add_subparsers(dest="data_command", required=True)
    dp = ds.add_parser("prepare", help="clean, dedup, tokenize and write ArrayRecord shards")
    dp.add_argument("config", help="run config whose data section names the sources")
    dp.add_argument("--out", required=True, help="output directory for shards")
    dp.add_argument("--shards", type=int, default=4)
    dp.add_argument("--min-chars", type=int, default=20)
    dp.add_argument("--max-chars", type=int, default=1_000_000)
    dp.add_argument("--max-repeat-fraction", type=float, default=0.3)
    dp.add_argument("--near-dup-threshold", type=float, default=0.8, help="MinHash Jaccard; 0 = off")
    dp.add_argument("--workers", type=int, default=2,
                    help="local Beam DirectRunner worker processes (1 = in-process)")
    dp.add_argument("--pack-windows", type=int, default=0, metavar="N",
                    help="write windows of N+1 tokens cut from each shard's concatenated documents "
                         "instead of one record per document (0 = off)")
    dp.add_argument("--memory-budget", default="2GiB", metavar="SIZE",
                    help="local runner: memory for one dedup round's shuffles (e.g. 2GiB, 512MiB); the dedup "
                         "runs in as many rounds as keep each within it (a distributed runner: one round)")
    dp.add_argument("--dedup-partitions", type=int, default=0, metavar="K",
                    help="run the dedup in exactly K rounds over 1/K of the keys each (0 = from --memory-budget)")
    dp.add_argument("overrides", nargs="*",
                    help="config overrides; after `--`, Beam pipeline options (e.g. --runner=DataflowRunner "
                         "--project=P --region=R --temp_location=gs://...)")

    add_plan_parser(sub)
    return p


def add_plan_parser(sub) -> None:
    pp = sub.add_parser("plan", help="will a run config fit on a TPU topology or GPUs? memory, FLOPs, step time",
                        description="Exit codes: 0 fits, 2 user error (config, topology, sharding, compile), "
                                    "3 does not fit in HBM.")
    pp.add_argument("config", help="run config YAML")
    pp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    where = pp.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", help="TPU slice: v5p-8, v5p-256, v4-128, v5e-16, v5litepod-16, v6e-64, v5p:4x4x8")
    where.add_argument("--gpu", help="GPUs: h100x8, h100x64 (8 per node), h200x16, ...")
    pp.add_argument("--num-slices", type=int, default=1, help="TPU slices joined over DCN (mesh.dcn_* product)")
    pp.add_argument("--analytic", action="store_true", help="TPU: estimate from formulas, do not compile")
    pp.add_argument("--no-xla-flops", action="store_true", help="skip the XLA FLOP cross-check (saves a few s)")
    pp.add_argument("--json", action="store_true", help="print the result as JSON")
    pp.add_argument("--auto-remat", action="store_true",
                    help="TPU: compile each model.remat policy from the least recomputation to the most and "
                         "report the first that fits")


def main(argv: list[str] | None = None) -> int:
    argv = _set_cpu_devices(list(sys.argv[1:] if argv is None else argv))
    argv, beam_args = _split_beam_args(argv)
    args = build_parser().parse_args(argv)
    args.beam_args = beam_args
    from jaxllm.errors import CheckpointWriteError, UserError
    _quiet_library_logs()
    try:
        _start_distributed(args)
        return COMMANDS[args.command](args)
    except CheckpointWriteError as e:
        # orbax's writer threads still hold the failed save; a normal interpreter exit would print
        # their tracebacks after this line, so leave at once (the failed step is an unlisted tmp dir).
        # One write, starting on a fresh line, so a thread's half-printed line cannot prefix it.
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(2, f"\nerror: {e}\n".encode())
        os._exit(2)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _quiet_library_logs() -> None:
    """orbax logs routine warnings (read-only managers) and, on a failed write, a traceback per
    thread through absl; jaxllm reports those failures itself in one line. JAXLLM_VERBOSE=1 keeps them."""
    import logging
    if not os.environ.get("JAXLLM_VERBOSE"):
        logging.getLogger("absl").setLevel(logging.CRITICAL)


def _start_distributed(args) -> None:
    from jaxllm.core.distributed import DistributedArgs, initialize
    initialize(DistributedArgs(args.coordinator, args.num_processes, args.process_id, args.init_timeout,
                               args.heartbeat_timeout))


def cmd_train(args) -> int:
    from jaxllm.config import load_config
    from jaxllm.objectives import train
    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


def cmd_generate(args) -> int:
    from jaxllm.app.inference import generate, load_model
    model, tok, meta = load_model(args.ckpt)
    prompts = args.prompt or ["The "]
    for prompt, text in zip(prompts, generate(model, tok, prompts, args.max_new, args.temperature, args.seed,
                                            top_k=args.top_k, top_p=args.top_p)):
        print(f"--- {prompt!r}\n{prompt}{text}")
    return 0


def cmd_info(args) -> int:
    from jaxllm.core import checkpoint as ckpt_lib
    src, step = ckpt_lib.open_for_read(args.ckpt)
    meta = src.metadata(step)
    print(f"checkpoint: {src.directory}/{step}")
    print(f"stage: {meta.get('stage')}  objective: {meta.get('objective')}  step: {meta.get('step')}")
    print(f"model: {json.dumps(meta.get('model'))}")
    print(f"tokenizer: {meta.get('tokenizer', {}).get('path')} sha256={meta.get('tokenizer', {}).get('sha256', '')[:12]}")
    print("lineage:")
    for depth, (path, stage, p_step) in enumerate(ckpt_lib.lineage(args.ckpt)):
        print(f"{'  ' * depth}- {path}  " + (f"[{stage}, step {p_step}]" if stage else "(not found)"))
    src.close()
    from jaxllm.app.evaluate import describe_results, run_dir_of
    evals = describe_results(run_dir_of(args.ckpt)[0])
    if evals:
        print(evals)
    return 0


def cmd_eval(args) -> int:
    from jaxllm.app.evaluate import format_table, run_eval
    record = run_eval(args.ckpt, args.tasks, include_path=args.include_path, limit=args.limit,
                      batch_size=args.batch_size, num_fewshot=args.num_fewshot, output=args.output, chat=args.chat)
    print(format_table(record))
    print(f"results: {record['path']}")
    return 0


def cmd_tokenizer(args) -> int:
    from jaxllm.data.tokenizer import train_tokenizer
    from jaxllm.data.sources import texts_for_tokenizer
    texts = texts_for_tokenizer(args.input, args.text_field)
    tok = train_tokenizer(texts, args.out, args.vocab_size, args.model_type)
    print(f"wrote {tok.path} (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]})")
    return 0


def _split_beam_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """`data prepare ... -- --runner=DataflowRunner ...`: what follows `--` goes to Beam unchanged."""
    if argv[:2] == ["data", "prepare"] and "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _size_bytes(text: str) -> int:
    """'2GiB', '512MiB', '2G', '1.5GB', '1000000' -> bytes (K/M/G binary)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        from jaxllm.errors import ConfigError
        raise ConfigError(f"--memory-budget: not a size: {text!r} (e.g. 2GiB, 512MiB)") from None


def cmd_data(args) -> int:
    from jaxllm.config import load_config
    from jaxllm.data.prepare import PrepareOptions, prepare
    cfg = load_config(args.config, args.overrides)
    opts = PrepareOptions(shards=args.shards, min_chars=args.min_chars, max_chars=args.max_chars,
                          max_repeat_fraction=args.max_repeat_fraction,
                          near_dup_threshold=args.near_dup_threshold, workers=args.workers,
                          pack_windows=args.pack_windows, beam_args=list(getattr(args, "beam_args", [])),
                          memory_budget=_size_bytes(args.memory_budget), dedup_partitions=args.dedup_partitions)
    summary = prepare(cfg.data, args.out, opts)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_pipeline(args) -> int:
    from jaxllm.app.pipeline import run_pipeline
    run_pipeline(args.config, args.overrides, args.from_stage, report=not args.no_report,
                 log=lambda m: print(m, flush=True))
    return 0


def cmd_label(args) -> int:
    from jaxllm.config import load_config
    from jaxllm.data.pipeline import first_records
    from jaxllm.app.label import label
    cfg = load_config(args.config, args.overrides)
    records = [r for r in first_records(cfg.data, 4 * args.n) if isinstance(r, dict) and "prompt" in r]
    prompts = [r["prompt"] for r in records][: args.n or None]
    summary = label(args.policy, prompts, args.out, k=args.k, judge=args.judge, judge_kind=args.judge_kind,
                    max_new=args.max_new, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(json.dumps(summary))
    return 0


def cmd_merge(args) -> int:
    from jaxllm.app.merge import merge_checkpoint
    print(json.dumps(merge_checkpoint(args.ckpt, args.out)))
    return 0


def cmd_convert(args) -> int:
    from jaxllm.app import hf
    if args.convert_command == "hf-to-jaxllm":
        mesh = None
        if args.mesh:
            from jaxllm.config import MeshConfig, load_config
            mesh = load_config(args.mesh, cls=MeshConfig)
        out = hf.hf_to_checkpoint(args.hf_dir, args.out, mesh, args.tokenizer,
                                  **({"scan_layers": True} if args.scan_layers else {}))
    else:
        out = hf.checkpoint_to_hf(args.ckpt, args.out, args.arch, args.dtype)
    print(json.dumps(out))
    return 0


COMMANDS = {"merge": cmd_merge, "train": cmd_train, "generate": cmd_generate, "info": cmd_info, "tokenizer": cmd_tokenizer,
            "data": cmd_data, "label": cmd_label,
            "pipeline": cmd_pipeline}
COMMANDS["convert"] = cmd_convert
COMMANDS["eval"] = cmd_eval


def cmd_plan(args) -> int:
    # Planning never runs on a local accelerator (TPU devices are compile-only, GPUs analytic); JAX
    # reads JAX_PLATFORMS when it is first imported, which importing the planner does.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jaxllm.app.plan import run_cli
    return run_cli(args)


COMMANDS["plan"] = cmd_plan

if __name__ == "__main__":
    sys.exit(main())
