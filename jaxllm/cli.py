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
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one stage from a run config")
    t.add_argument("config", help="run config YAML")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    g = sub.add_parser("generate", help="sample from a checkpoint")
    g.add_argument("ckpt", help="run output_dir or checkpoint step dir")
    g.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
    g.add_argument("--max-new", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)

    i = sub.add_parser("info", help="show a checkpoint's metadata and lineage")
    i.add_argument("ckpt")

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    toks = tok.add_subparsers(dest="tok_command", required=True)
    tt = toks.add_parser("train", help="train a SentencePiece tokenizer")
    tt.add_argument("--input", action="append", default=[],
                    help="text/JSONL/Parquet file or glob (repeatable); omit for the embedded corpus")
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--out", required=True, help="output prefix; writes PREFIX.model")
    tt.add_argument("--vocab-size", type=int, default=1024)
    tt.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])

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
    dp.add_argument("overrides", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = _set_cpu_devices(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    from jaxllm.errors import UserError
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def cmd_train(args) -> int:
    from jaxllm.config import load_config
    from jaxllm.trainer import train
    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


def cmd_generate(args) -> int:
    from jaxllm.inference import generate, load_model
    model, tok, meta = load_model(args.ckpt)
    prompts = args.prompt or ["The "]
    for prompt, text in zip(prompts, generate(model, tok, prompts, args.max_new, args.temperature, args.seed)):
        print(f"--- {prompt!r}\n{prompt}{text}")
    return 0


def cmd_info(args) -> int:
    from jaxllm import checkpoint as ckpt_lib
    src, step = ckpt_lib.open_for_read(args.ckpt)
    meta = src.metadata(step)
    print(f"checkpoint: {src.directory}/{step}")
    print(f"stage: {meta.get('stage')}  objective: {meta.get('objective')}  step: {meta.get('step')}")
    print(f"model: {json.dumps(meta.get('model'))}")
    print(f"tokenizer: {meta.get('tokenizer', {}).get('path')} sha256={meta.get('tokenizer', {}).get('sha256', '')[:12]}")
    print("lineage:")
    parent, depth, seen = f"{src.directory}/{step}", 0, set()
    while parent and parent not in seen:
        seen.add(parent)
        try:
            p_src, p_step = ckpt_lib.open_for_read(parent)
            p_meta = p_src.metadata(p_step)
        except Exception:  # a parent that was moved or deleted ends the chain
            print(f"{'  ' * depth}- {parent} (not found)")
            break
        print(f"{'  ' * depth}- {parent}  [{p_meta.get('stage')}, step {p_meta.get('step')}]")
        parent, depth = p_meta.get("parent"), depth + 1
    src.close()
    return 0


def cmd_tokenizer(args) -> int:
    from jaxllm.data.tokenizer import train_tokenizer
    texts = _texts_for_tokenizer(args.input, args.text_field)
    tok = train_tokenizer(texts, args.out, args.vocab_size, args.model_type)
    print(f"wrote {tok.path} (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]})")
    return 0


def _texts_for_tokenizer(inputs: list[str], field: str):
    from jaxllm.config import SourceConfig
    from jaxllm.data.sources import read_source
    if not inputs:
        return [r["text"] for r in read_source(SourceConfig(kind="default")).records]
    texts = []
    for pattern in inputs:
        kind = "jsonl" if pattern.endswith((".jsonl", ".json")) else "parquet" if pattern.endswith(".parquet") else "text"
        texts += [r["text"] for r in read_source(SourceConfig(kind=kind, path=pattern, text_field=field)).records]
    return texts


def cmd_data(args) -> int:
    from jaxllm.config import load_config
    from jaxllm.data.prepare import PrepareOptions, prepare
    cfg = load_config(args.config, args.overrides)
    opts = PrepareOptions(shards=args.shards, min_chars=args.min_chars, max_chars=args.max_chars,
                          max_repeat_fraction=args.max_repeat_fraction,
                          near_dup_threshold=args.near_dup_threshold)
    summary = prepare(cfg.data, args.out, opts)
    print(json.dumps(summary, indent=2))
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "info": cmd_info, "tokenizer": cmd_tokenizer,
            "data": cmd_data}

if __name__ == "__main__":
    sys.exit(main())
