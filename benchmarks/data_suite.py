"""`jaxllm data prepare` (Apache Beam, DirectRunner) against Hugging Face datatrove on one machine.

Both tools get the same synthetic JSONL corpus (`generate_corpus`: Zipf-distributed English-like
words, documents of 200-5000 chars, ~3% exact duplicates, ~3% near duplicates, ~1% malformed
lines; split into 16 files because datatrove parallelises by file), the same filters (our length
and repetition checks and our cleaning, as a datatrove step), MinHash dedup with the same 64 hashes
in 16 bands of 4 over word 5-grams, and the same tokenizer: a byte-level BPE tokenizer.json
trained once with `tokenizers` on the corpus head (jaxllm's data.tokenizer takes a tokenizer.json;
datatrove's DocumentTokenizer needs one), BOS + text + EOS per document for both.

Each run is a fresh subprocess. Wall time is measured around it; peak memory two ways: the peak of
the *sum* of RSS over the whole process tree (the driver plus every Beam SDK worker / datatrove
worker process; /proc sampled every 0.2 s) and the largest single process (ru_maxrss of the
children, from a fresh wrapper process).

    python -m benchmarks.data_suite --sizes 200MB,2GB --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = "/tmp/jaxllm-bench-data"
N_FILES = 16
NUM_PERM, BANDS = 64, 16  # PrepareOptions defaults: 16 bands of 4
MIN_CHARS, MAX_CHARS, MAX_REPEAT = 20, 1_000_000, 0.3  # PrepareOptions defaults
THRESHOLD = 0.8


# ---- corpus ------------------------------------------------------------------------------------------
def _vocabulary(rng, n: int = 20_000) -> np.ndarray:
    syll = ["a", "e", "i", "o", "u", "ba", "ce", "di", "fo", "gu", "ha", "je", "ki", "lo", "mu", "na", "pe",
            "qui", "ro", "su", "ta", "ve", "wi", "xo", "yu", "ze", "th", "st", "ing", "er", "on", "an", "re"]
    words = set()
    while len(words) < n:
        k = rng.integers(1, 5)
        words.add("".join(rng.choice(syll, k)))
    return np.array(sorted(words))


def generate_corpus(path: str = DEFAULT_DIR, target_bytes: int = 200 << 20, seed: int = 0) -> str:
    """A directory of N_FILES JSONL files totalling about `target_bytes` (deterministic for
    (target_bytes, seed)); reused when already complete. Returns the directory."""
    out = os.path.join(path, f"corpus-{target_bytes}-{seed}")
    done = os.path.join(out, "DONE.json")
    if os.path.exists(done):
        meta = json.load(open(done))
        if sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".jsonl")) == meta["bytes"]:
            return out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng)
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1  # Zipf
    p /= p.sum()
    files = [open(os.path.join(out, f"part-{i:02d}.jsonl"), "w") for i in range(N_FILES)]
    written, docs, recent = 0, {"docs": 0, "exact": 0, "near": 0, "malformed": 0}, []
    while written < target_bytes:
        u = rng.random()
        if u < 0.03 and recent:  # exact duplicate of an earlier document
            text = recent[rng.integers(len(recent))]
            docs["exact"] += 1
        elif u < 0.06 and recent:  # near duplicate: a few words replaced
            words = recent[rng.integers(len(recent))].split(" ")
            for j in rng.integers(0, len(words), max(1, len(words) // 100)):
                words[j] = vocab[rng.integers(len(vocab))]
            text = " ".join(words)
            docs["near"] += 1
        else:
            n_chars = int(np.exp(rng.uniform(np.log(200), np.log(5000))))
            ws = vocab[rng.choice(len(vocab), n_chars // 5 + 4, p=p)]
            lens = rng.integers(6, 25, len(ws) // 6 + 1)
            sents, k = [], 0
            for n in lens:
                if k >= len(ws):
                    break
                s = " ".join(ws[k:k + n])
                sents.append(s[:1].upper() + s[1:] + ".")
                k += n
            paras = np.array_split(np.array(sents, dtype=object), max(1, len(sents) // 8))
            text = "\n\n".join(" ".join(x) for x in paras)[:n_chars]
            if len(recent) < 5000:
                recent.append(text)
            else:
                recent[rng.integers(len(recent))] = text
        line = json.dumps({"text": text, "id": docs["docs"]}) + "\n"
        if rng.random() < 0.01:  # malformed: truncated JSON
            line = line[: len(line) // 2] + "\n"
            docs["malformed"] += 1
        files[docs["docs"] % N_FILES].write(line)
        written += len(line.encode())
        docs["docs"] += 1
    for f in files:
        f.close()
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    with open(done, "w") as f:
        json.dump({"bytes": total, **docs}, f)
    return out


def corpus_meta(corpus: str) -> dict:
    return json.load(open(os.path.join(corpus, "DONE.json")))


def make_tokenizer(workdir: str, corpus: str, vocab_size: int = 8192) -> str:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json: <s>/</s>) trained on the corpus
    head; its post-processor adds <s> so jaxllm sees a BOS token."""
    out = os.path.join(workdir, "tokenizer")
    path = os.path.join(out, "tokenizer.json")
    if os.path.exists(path):
        return path
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def head():
        with open(os.path.join(corpus, "part-00.jsonl")) as f:
            for i, line in enumerate(f):
                if i >= 5000:
                    return
                try:
                    yield json.loads(line)["text"]
                except json.JSONDecodeError:
                    pass
    tok.train_from_iterator(head(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    os.makedirs(out, exist_ok=True)
    tok.save(path)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)
    return path


# ---- measurement -------------------------------------------------------------------------------------
def _tree_rss(root: int, rss_of: dict | None = None) -> int:
    """Sum of RSS (bytes) over `root` and all its descendants; `rss_of`: filled pid -> RSS of the
    direct children of `root`."""
    children: dict = {}
    rss: dict = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(parts[1]), []).append(int(pid))
            rss[int(pid)] = int(parts[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    if rss_of is not None:
        rss_of.update({pid: rss.get(pid, 0) for pid in children.get(root, [])})
    return total


_WRAPPER = ("import resource, subprocess, sys, json; rc = subprocess.call(sys.argv[1:]); "
            "print('MAXRSS_KB=' + str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss), file=sys.stderr); "
            "sys.exit(rc)")


def run_measured(cmd: list[str], log_path: str, env: dict | None = None) -> dict:
    """Runs `cmd` under a fresh wrapper; wall seconds, peak summed RSS of the tree, largest process,
    and the peak RSS of `cmd`'s own process (for `jaxllm data prepare`: the Beam runner)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *cmd], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, cwd=ROOT)
        peak = [0, 0]

        def sample():
            while proc.poll() is None:
                top: dict = {}
                peak[0] = max(peak[0], _tree_rss(proc.pid, top))
                peak[1] = max([peak[1], *top.values()])
                time.sleep(0.2)
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        th.join()
    wall = time.time() - t0
    text = open(log_path, errors="replace").read()
    maxrss = [int(l.split("=")[1]) for l in text.splitlines() if l.startswith("MAXRSS_KB=")]
    if rc != 0:
        raise RuntimeError(f"{cmd[:4]} failed (rc {rc}); log: {log_path}\n{text[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_sum_mb": round(peak[0] / 2**20, 1),
            "max_process_rss_mb": round(maxrss[-1] / 1024, 1) if maxrss else None,
            "main_process_peak_rss_mb": round(peak[1] / 2**20, 1)}


def _rates(m: dict, corpus: str) -> dict:
    meta = corpus_meta(corpus)
    m["docs_per_s"] = round(meta["docs"] / m["wall_s"], 1)
    m["mb_per_s"] = round(meta["bytes"] / 2**20 / m["wall_s"], 2)
    return m


def prepare_bench(corpus: str, workers: int, workdir: str, tokenizer: str, keep: bool = False,
                  extra: list | None = None, tag: str = "") -> dict:
    """`jaxllm data prepare` on the corpus (fresh subprocess); `keep`: leave the shards for a
    training measurement (`out` in the result); `extra`: more `data prepare` options; `tag`: a
    suffix for the output directory and config names (so runs do not replace each other's)."""
    out = os.path.join(workdir, f"jaxllm-out-{os.path.basename(corpus)}-w{workers}{tag}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = os.path.join(workdir, f"prepare-{os.path.basename(corpus)}{tag}.yaml")
    with open(cfg, "w") as f:
        json.dump({"data": {"tokenizer": tokenizer, "sources": [{"kind": "jsonl", "path": corpus}]}}, f)
    cmd = [os.path.join(os.path.dirname(sys.executable), "jaxllm"), "data", "prepare", cfg, "--out", out,
           "--workers", str(workers), "--shards", "4", "--near-dup-threshold", str(THRESHOLD), *(extra or [])]
    m = run_measured(cmd, out + ".log", env={"JAX_PLATFORMS": "cpu"})
    m["runner_peak_rss_mb"] = m.pop("main_process_peak_rss_mb")  # the jaxllm process runs the DirectRunner
    summary = json.load(open(os.path.join(out, "prepared.json")))
    m.update(kept=summary["documents"], tokens=summary["tokens"], read=summary["report"]["read"],
             dropped=summary["report"]["dropped"], dedup_partitions=summary.get("dedup_partitions"),
             prepare_args=extra or [])
    if keep:
        m["out"] = out
    else:
        shutil.rmtree(out, ignore_errors=True)
    return _rates(m, corpus)


_DATATROVE_SCRIPT = r'''
import json, sys, unicodedata
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashDedupSignature, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.tokens import DocumentTokenizer
from datatrove.utils.hashing import HashConfig
from tokenizers.processors import TemplateProcessing
from jaxllm.data.prepare import clean_text, filter_reason, PrepareOptions

OPTS = PrepareOptions()

class Clean(PipelineStep):
    name = "clean (jaxllm.prepare.clean_text)"
    def run(self, data, rank=0, world_size=1):
        for doc in data:
            doc.text = clean_text(doc.text)
            yield doc

class SameFilters(BaseFilter):
    """jaxllm's length and repetition filters (prepare.filter_reason), unchanged."""
    name = "length + repetition (jaxllm.prepare.filter_reason)"
    def filter(self, doc):
        r = filter_reason(doc.text, OPTS)
        return True if r is None else (False, r)

class WhitespaceWords:
    """Words as jaxllm's MinHash takes them (str.split), instead of datatrove's spaCy tokenizer (not installed)."""
    def word_tokenize(self, text):
        return text.split()
    def span_tokenize(self, text):
        raise NotImplementedError
    def sent_tokenize(self, text):
        raise NotImplementedError

import datatrove.pipeline.dedup.minhash as _mh
_mh.load_word_tokenizer = lambda language: WhitespaceWords()

import xxhash
import datatrove.utils.hashes.xxhash as _xx  # the installed xxhash takes bytes only: datatrove passes str
_xx.xxhash64 = lambda d: xxhash.xxh64_intdigest(d.encode() if isinstance(d, str) else d)

if __name__ == "__main__":  # datatrove's worker pool (forkserver) re-imports this file
    corpus, work, workers, tokenizer, bands, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
    cfg = MinhashConfig(n_grams=5, num_buckets=bands, hashes_per_bucket=rows, hash_config=HashConfig(precision=64))
    T = workers  # tasks = workers
    stages = [
        [JsonlReader(corpus, glob_pattern="*.jsonl"), Clean(), SameFilters(),
         JsonlWriter(f"{work}/filtered", compression=None), MinhashDedupSignature(f"{work}/sigs", config=cfg)],
        [MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=cfg)],
        [MinhashDedupCluster(f"{work}/buckets", f"{work}/remove_ids", config=cfg)],
    ]
    tok = DocumentTokenizer(f"{work}/tokens", tokenizer_name_or_path=tokenizer, eos_token="</s>", shuffle_documents=False)
    tok.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    stages.append([JsonlReader(f"{work}/filtered", compression=None), MinhashDedupFilter(f"{work}/remove_ids"), tok])
    tasks = [T, bands, 1, T]
    for i, (pipe, t) in enumerate(zip(stages, tasks)):
        LocalPipelineExecutor(pipeline=pipe, tasks=t, workers=min(workers, t), logging_dir=f"{work}/logs{i}",
                              skip_completed=False).run()
    stats = json.load(open(f"{work}/logs3/stats.json"))
    out = {"stats": stats}
    print("RESULT=" + json.dumps(out))
'''


def datatrove_bench(corpus: str, workers: int, workdir: str, tokenizer: str) -> dict:
    """datatrove's equivalent local pipeline (4 LocalPipelineExecutor stages), fresh subprocess."""
    work = os.path.join(workdir, f"datatrove-{os.path.basename(corpus)}-w{workers}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    script = os.path.join(work, "run.py")
    with open(script, "w") as f:
        f.write(_DATATROVE_SCRIPT)
    m = run_measured([sys.executable, script, corpus, work, str(workers), tokenizer, str(BANDS),
                      str(NUM_PERM // BANDS)], work + ".log")
    kept, tokens = 0, 0
    for line in open(work + ".log"):
        if line.startswith("RESULT="):
            for step in json.loads(line[7:])["stats"]:
                st = {k: (v.get("total") if isinstance(v, dict) else v) for k, v in step["stats"].items()}
                if "DEDUP" in step["name"]:
                    kept = st.get("forwarded", 0)
                if "TOKENIZER" in step["name"]:
                    tokens = st.get("tokens", 0)
    m.update(kept=kept, tokens=tokens)
    shutil.rmtree(work, ignore_errors=True)
    return _rates(m, corpus)


# ---- suite -------------------------------------------------------------------------------------------
def _size(s: str) -> int:
    s = s.strip().upper()
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if s.endswith(unit):
            return int(float(s[:-len(unit)]) * mult)
    return int(s)


def versions() -> dict:
    import importlib.metadata as md
    import platform
    return {"python": platform.python_version(),
            **{k: md.version(k) for k in ("jax", "apache-beam", "datatrove", "tokenizers")}}


def prepare_suite(sizes: list[int], workers: list[int], workdir: str = DEFAULT_DIR,
                  tools: tuple = ("jaxllm", "datatrove"), runs: list | None = None, keep: bool = False,
                  extra: list | None = None, tag: str = "") -> dict:
    """Every (size, workers, tool) measured; `runs` = explicit [(size, workers, tool)] instead."""
    os.makedirs(workdir, exist_ok=True)
    results = []
    plan = runs or [(s, w, t) for s in sizes for w in workers for t in tools]
    for size, w, tool in plan:
        t0 = time.time()
        corpus = generate_corpus(workdir, size)
        gen = time.time() - t0
        tokenizer = make_tokenizer(workdir, generate_corpus(workdir, 20 << 20))  # one tokenizer for every run
        m = (prepare_bench(corpus, w, workdir, tokenizer, keep, extra, tag) if tool == "jaxllm"
             else datatrove_bench(corpus, w, workdir, tokenizer))
        label = f"{tool} ({tag.strip('-')})" if tag and tool == "jaxllm" else tool
        rec = {"tool": label, "size_bytes": corpus_meta(corpus)["bytes"], "workers": w, **m,
               "corpus": corpus_meta(corpus), "corpus_generate_s": round(gen, 1)}
        print(json.dumps(rec), flush=True)
        results.append(rec)
    ratios = []
    for r in results:
        if not r["tool"].startswith("jaxllm"):
            continue
        for d in results:
            if d["tool"] == "datatrove" and d["size_bytes"] == r["size_bytes"] and d["workers"] == r["workers"]:
                ratios.append({"size_bytes": r["size_bytes"], "workers": r["workers"],
                               "wall_ratio_jaxllm_over_datatrove": round(r["wall_s"] / d["wall_s"], 2),
                               "peak_rss_sum_ratio": round(r["peak_rss_sum_mb"] / d["peak_rss_sum_mb"], 2)})
    return {"runs": results, "ratios": ratios, "versions": versions()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="200MB")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--tools", default="jaxllm,datatrove")
    ap.add_argument("--workdir", default=DEFAULT_DIR)
    ap.add_argument("--name", default="")
    ap.add_argument("--keep-output", action="store_true", help="keep jaxllm's shards (for benchmarks/data_train.py)")
    ap.add_argument("--prepare-args", default="", help="more `jaxllm data prepare` options, space-separated "
                    "(e.g. '--memory-budget 1GiB')")
    ap.add_argument("--tag", default="", help="suffix for jaxllm's output directory and config names")
    a = ap.parse_args(argv)
    sizes = [_size(s) for s in a.sizes.split(",")]
    workers = [int(w) for w in a.workers.split(",")]
    res = prepare_suite(sizes, workers, a.workdir, tuple(a.tools.split(",")), keep=a.keep_output,
                        extra=a.prepare_args.split(), tag=a.tag)
    from benchmarks.common import write_record
    name = a.name or "prepare-" + "-".join(s.lower() for s in a.sizes.split(","))
    path = write_record("data_prepare", name, {"sizes": sizes, "workers": workers, "tools": a.tools,
                                       "num_perm": NUM_PERM, "bands": BANDS, "threshold": THRESHOLD,
                                       "min_chars": MIN_CHARS, "max_repeat_fraction": MAX_REPEAT,
                                       "prepare_args": a.prepare_args}, res, smoke=False)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
