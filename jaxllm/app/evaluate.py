"""`jaxllm eval`: a jaxllm checkpoint as an lm-evaluation-harness model, and `run_eval`.

`JaxLLM` (an `lm_eval.api.model.LM`) answers the harness's three request types with the model's own
forward pass and the KV-cache sampler:
  loglikelihood          (context, continuation) -> (sum of the continuation's token log-probs, whether
                         every continuation token is the argmax)
  loglikelihood_rolling  (text,) -> log-prob of the whole text, in windows of max_seq_len tokens
  generate_until         (context, gen_kwargs) -> text, cut at the first `until` string
Requests run in batches of `batch_size` rows padded to a bucketed length (powers of two), so a whole
task compiles a handful of programs, not one per request. Texts are encoded with the checkpoint's
tokenizer, BOS first (as jaxllm documents and chat prompts start); special-token text in a prompt
(e.g. `<|user|>`) becomes that token, so a task may spell out the chat format itself, or pass
`chat=True` (the harness's apply_chat_template) to have it rendered by the tokenizer's chat format.

lm-evaluation-harness is an optional dependency (`pip install 'jaxllm[eval]'`), imported only when
an evaluation runs; `JaxLLM` is built on first access for the same reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.core import checkpoint as ckpt_lib
from jaxllm.core import storage
from jaxllm.core.arrays import host_to_global, positions_from_segments
from jaxllm.core.loading import single_device_mesh
from jaxllm.core.model import dense
from jaxllm.core.sampler import completions, generate_ids, pad_prompts, prompt_masks
from jaxllm.core.sharding import data_parallel_size, make_rules, use_mesh_rules
from jaxllm.core.xent import chunking
from jaxllm.errors import UserError

INSTALL_HINT = "pip install 'jaxllm[eval]'"
RESULTS = ("eval", "results.json")  # under the checkpoint's run dir
DEFAULT_MAX_GEN_TOKS = 256  # the harness's own default for generate_until


def check_installed() -> None:
    """A UserError naming the extra when lm-evaluation-harness is missing (cheap: no import)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"jaxllm eval needs lm-evaluation-harness: {INSTALL_HINT}")


def _lm_eval():
    check_installed()
    import lm_eval
    import lm_eval.api.model
    import lm_eval.evaluator
    import lm_eval.tasks
    return lm_eval


# ---- the jitted scoring forward -------------------------------------------------------------------
def bucket(n: int, cap: int, smallest: int = 32) -> int:
    """Padded length for n tokens: the next power of two (>= smallest), at most cap (but >= n).
    Few distinct shapes, so few jit compiles."""
    return max(n, min(max(smallest, 1 << (max(n, 1) - 1).bit_length()), cap))


def head_logps(h, w, targets, chunk_tokens: int = 2048):
    """h [B, T, D], w [D, V], targets [B, T] -> (log p(target) [B, T] float32, target has the top
    logit [B, T] bool; ties count). The head runs in chunks of ~chunk_tokens tokens along the
    sequence, so [B, T, V] logits never exist at once (a 128k vocabulary at B x T = 8 x 2048 would
    be 8 GB of float32; a chunk is 1 GB)."""
    B, T = targets.shape
    length, n = chunking(B, T, chunk_tokens)
    pad = length * n - T
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = jnp.moveaxis(h.reshape(B, n, length, -1), 1, 0)  # [n, B, C, D]
    ts = jnp.moveaxis(targets.reshape(B, n, length), 1, 0)  # [n, B, C]

    def one(xs):
        hc, tc = xs
        z = dense(hc, w).astype(jnp.float32)  # [B, C, V]: the same math as Transformer.logits
        zt = jnp.take_along_axis(z, tc[..., None], axis=-1)[..., 0]
        return zt - jax.nn.logsumexp(z, axis=-1), zt >= z.max(axis=-1)

    logp, greedy = jax.lax.map(one, (hs, ts))
    unsplit = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, n * length)[:, :T]
    return unsplit(logp), unsplit(greedy)


@partial(jax.jit, static_argnames=("mesh", "rules"))
def _score(graphdef, state, tokens, segment_ids, targets, *, mesh=None, rules=None):
    """tokens / segment_ids / targets [B, T] (right padding = segment 0) -> head_logps [B, T] x2."""
    with use_mesh_rules(mesh, dict(rules or ())):
        model = nnx.merge(graphdef, state)
        h = model.hidden(tokens, positions_from_segments(segment_ids), segment_ids)  # [B, T, D]
        return head_logps(h, model.head_weight(), targets)


def cut_at(text: str, until: Sequence[str]) -> str:
    """text up to the first occurrence of any stop string."""
    for s in until:
        if s:
            text = text.split(s)[0]
    return text


def _gen_options(kwargs: dict) -> tuple:
    """The harness's gen_kwargs -> (until, max_gen_toks, temperature, top_k, top_p); greedy unless
    do_sample (default: temperature > 0)."""
    kw = dict(kwargs or {})
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    if not kw.pop("do_sample", temperature > 0):
        temperature = 0.0
    return (tuple(until), int(kw.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), temperature,
            int(kw.pop("top_k", 0) or 0), float(kw.pop("top_p", 1.0) or 1.0))


class JaxLLMCore:
    """The scoring and generation behind `JaxLLM`, without lm_eval (so it imports without it).

    model: a causal LM (jaxllm.app.inference.load_model), tok: its Tokenizer. mesh: where the model
    lives (default one device; load the model on a bigger mesh and pass it here to shard the batch
    over its data axes). batch_size is rounded up to a multiple of the data-parallel size."""

    def __init__(self, model, tok, *, batch_size: int = 8, max_length: Optional[int] = None, mesh=None,
                 rules=None, seed: int = 0):
        self.model, self.tok = model, tok
        self.graphdef, self.state = nnx.split(model)
        self.max_length = int(max_length or model.cfg.max_seq_len)
        self.mesh = mesh if mesh is not None else single_device_mesh()
        self.rules = rules if rules is not None else make_rules()
        dp = data_parallel_size(self.mesh)
        self.batch_size = -(-max(1, int(batch_size)) // dp) * dp
        self.seed = seed
        # the token that conditions a text's first token: BOS as in training, else EOS (harness default)
        self.prefix_id = tok.bos_id if tok.bos_id is not None else tok.eos_id

    # -- encoding --
    def encode(self, text: str) -> list[int]:
        """text -> ids with BOS first (unless the text already starts with it, e.g. from a template)."""
        ids = self.tok.encode(text)
        bos = self.tok.bos_id
        return ids if bos is None or ids[:1] == [bos] else [bos] + ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As the harness's own models do: trailing spaces of the context move to the continuation,
        and the continuation's ids are those of context + continuation after the context's ids."""
        if not context:
            return [self.prefix_id], self.tok.encode(continuation)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = self.encode(context)
        return ctx, self.encode(context + continuation)[len(ctx):]

    # -- batches --
    def _global(self, x: np.ndarray) -> jax.Array:
        return host_to_global(x, self.mesh, self.rules, process_local=False)

    def _batches(self, n: int, key) -> list[list[int]]:
        """Indices 0..n-1, longest first, in groups of batch_size: similar lengths share a batch."""
        order = sorted(range(n), key=key, reverse=True)
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _rows(self, rows: list) -> list:
        """A batch topped up to batch_size with copies of its first row: one static batch shape."""
        return rows + [rows[0]] * (self.batch_size - len(rows))

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum log-prob of the continuation, all greedy). Sequences
        longer than max_length + 1 lose their oldest context tokens."""
        seqs = []
        for ctx, cont in pairs:
            seq = (list(ctx) + list(cont))[-(self.max_length + 1):]
            seqs.append((seq, min(len(cont), len(seq) - 1)))
        out: list = [None] * len(seqs)
        for idx in self._batches(len(seqs), key=lambda i: len(seqs[i][0])):
            T = bucket(max(len(seqs[i][0]) - 1 for i in idx), self.max_length)
            tokens = np.full((self.batch_size, T), self.tok.pad_id, np.int32)
            targets, segs = np.zeros_like(tokens), np.zeros_like(tokens)  # pad: segment 0
            for r, i in enumerate(self._rows(idx)):
                seq = seqs[i][0]
                tokens[r, :len(seq) - 1], targets[r, :len(seq) - 1], segs[r, :len(seq) - 1] = seq[:-1], seq[1:], 1
            logp, greedy = _score(self.graphdef, self.state, *map(self._global, (tokens, segs, targets)),
                                  mesh=self.mesh, rules=tuple(sorted(self.rules.items())))
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for r, i in enumerate(idx):
                L, n = len(seqs[i][0]) - 1, seqs[i][1]
                out[i] = (float(logp[r, L - n:L].sum()), bool(greedy[r, L - n:L].all()))
        return out

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """A text's ids in disjoint (context, continuation) windows of at most max_length inputs;
        every token is predicted once, the first from the prefix token."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        windows = get_rolling_token_windows(token_list=self.tok.encode(text), prefix_token=self.prefix_id,
                                            max_seq_len=self.max_length, context_len=1)
        return [make_disjoint_window(w) for w in windows]

    def generate_texts(self, contexts: Sequence[str], gen_kwargs: dict) -> list[str]:
        """Contexts sharing one gen_kwargs -> texts, cut at the first `until` string."""
        until, max_new, temperature, top_k, top_p = _gen_options(gen_kwargs)
        max_new = max(1, min(max_new, self.max_length - 1))
        # stop early at the eos ids and at stop strings that are one token (a chat format's <|end|>):
        # the text would be cut at or before that token anyway
        one_token = [ids[0] for s in until if s and len(ids := self.tok.encode(s)) == 1]
        stops = tuple(dict.fromkeys([*self.tok.eos_ids, *one_token]))
        prompts = [self.encode(c)[-(self.max_length - max_new):] for c in contexts]  # keep the newest tokens
        out: list = [None] * len(prompts)
        for b, idx in enumerate(self._batches(len(prompts), key=lambda i: len(prompts[i]))):
            rows = [prompts[i] for i in self._rows(idx)]
            P = bucket(max(len(p) for p in rows), self.max_length - max_new)
            roll = generate_ids(self.graphdef, self.state, self._global(pad_prompts(rows, P, self.tok.pad_id)),
                                max_new, rng=jax.random.fold_in(jax.random.key(self.seed), b),
                                temperature=temperature, top_k=top_k, top_p=top_p, eos_id=stops,
                                pad_id=self.tok.pad_id, prompt_mask=self._global(prompt_masks(rows, P)),
                                mesh=self.mesh, rules=self.rules)
            for r, ids in zip(idx, completions(roll.tokens, roll.mask, stops)):
                out[r] = cut_at(self.tok.decode(ids), until)
        return out

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Messages -> prompt text in the tokenizer's chat format (its template, or jaxllm's tokens)."""
        chat = self.tok.chat
        if hasattr(chat, "text"):
            return chat.text(messages, add_generation_prompt)
        return self.tok.decode(chat.render(messages, add_generation_prompt)[0])


def _make_lm_class():
    """JaxLLM = JaxLLMCore answering lm_eval's LM interface (built once lm_eval is importable)."""
    LM = _lm_eval().api.model.LM

    class JaxLLM(JaxLLMCore, LM):
        """A jaxllm checkpoint as an lm-evaluation-harness model: `JaxLLM(model, tok, batch_size=8)`,
        or `JaxLLM.from_checkpoint(path)`."""

        def __init__(self, model, tok, **kwargs):
            LM.__init__(self)
            JaxLLMCore.__init__(self, model, tok, **kwargs)

        @classmethod
        def from_checkpoint(cls, path: str, mesh=None, **kwargs):
            from jaxllm.app.inference import load_model  # here: `jaxllm info` imports this module too
            model, tok, _ = load_model(path, mesh)
            return cls(model, tok, mesh=mesh, **kwargs)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            out = self.score_tokens([self.encode_pair(*r.args) for r in requests])
            for r, o in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood", r.args, o)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            windows = [self.rolling_windows(r.args[0]) for r in requests]
            scores = iter(self.score_tokens([w for ws in windows for w in ws]))  # all windows batched together
            out = [sum(next(scores)[0] for _ in ws) for ws in windows]
            for r, o in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood_rolling", r.args, o)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            groups: dict = {}  # requests with the same gen_kwargs share batches (and compiled programs)
            for i, r in enumerate(requests):
                groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
            out: list = [None] * len(requests)
            for idx in groups.values():
                texts = self.generate_texts([requests[i].args[0] for i in idx], requests[idx[0]].args[1])
                for i, t in zip(idx, texts):
                    out[i] = t
                    self.cache_hook.add_partial("generate_until", requests[i].args, t)
            return out

        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
            return self.chat_text(chat_history, add_generation_prompt)

        @property
        def tokenizer_name(self) -> str:
            return f"{os.path.basename(self.tok.path)}-{self.tok.sha256[:12]}"

        def chat_template(self, chat_template=False) -> str:
            return self.tok.chat_template or "jaxllm"

    return JaxLLM


_CLASSES: dict = {}


def __getattr__(name: str):
    if name == "JaxLLM":  # `from jaxllm.app.evaluate import JaxLLM` imports lm_eval only now
        if name not in _CLASSES:
            _CLASSES[name] = _make_lm_class()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- tasks and the evaluation run ----------------------------------------------------------------
def _local_path(p: str) -> str:
    if storage.is_remote(p):
        raise UserError(f"--include-path {p}: lm-evaluation-harness reads task YAMLs from a local directory")
    return os.path.abspath(p)


def task_manager(tasks: Sequence[str], include_path: Optional[str] = None):
    """A TaskManager that knows every name in `tasks`, else a UserError naming the unknown ones.
    Local tasks are looked up first: indexing the harness's ~15k built-in tasks takes ~15 s on a
    small CPU, so it happens only when a name is not found under include_path."""
    TaskManager = _lm_eval().tasks.TaskManager
    if include_path:
        include_path = _local_path(include_path)
        if not os.path.isdir(include_path):
            raise UserError(f"--include-path {include_path}: no such directory")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(_known(local, t) for t in tasks):
            return local
    tm = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not _known(tm, t)]
    if unknown:
        import difflib
        hints = [m for t in unknown for m in difflib.get_close_matches(t, tm.all_tasks, n=1)]
        raise UserError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
                        + (f"; did you mean {', '.join(map(repr, hints))}?" if hints else "")
                        + ("" if include_path else " (local task YAMLs: --include-path DIR)"))
    return tm


def _known(tm, name: str) -> bool:
    return name in tm.all_tasks or (name.endswith((".yaml", ".yml")) and os.path.isfile(name))


def run_dir_of(checkpoint: str) -> tuple[str, int]:
    """Checkpoint path (run dir, checkpoints dir or step dir) -> (its run dir, the step evaluated)."""
    src, step = ckpt_lib.open_for_read(checkpoint)
    directory = src.directory
    src.close()
    p = storage.path(directory)
    return (str(p.parent) if p.name == "checkpoints" else directory), step


def results_path(run_dir: str) -> str:
    return storage.join(run_dir, *RESULTS)


def _json_part(res: dict) -> dict:
    """The harness's results without per-sample logs and task configs (these hold functions)."""
    keep = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples", "config")
    return json.loads(json.dumps({k: res[k] for k in keep if k in res}, default=str))


@contextlib.contextmanager
def _jax_env_info(lm_eval):
    """simple_evaluate records torch's environment report when torch is installed: importing torch
    and running pip / nvidia-smi subprocesses (~10 s on a small CPU), none of it about a JAX model.
    Record JAX's versions and devices instead."""
    evaluator = lm_eval.evaluator
    if not hasattr(evaluator, "add_env_info"):
        yield
        return

    def add_env_info(record: dict) -> None:
        import jaxlib
        record.update({"jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
                       "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                       "lm_eval_version": getattr(lm_eval, "__version__", "")})

    original = evaluator.add_env_info
    evaluator.add_env_info = add_env_info
    try:
        yield
    finally:
        evaluator.add_env_info = original


def run_eval(checkpoint: str, tasks, *, include_path: Optional[str] = None, limit: Optional[float] = None,
             batch_size: int = 8, num_fewshot: Optional[int] = None, output: Optional[str] = None,
             chat: bool = False, mesh=None, seed: int = 0) -> dict:
    """Evaluates a checkpoint on lm-evaluation-harness tasks (names, or a "t1,t2" string) and writes
    the JSON part of the results to `output` (default {run dir}/eval/results.json). -> that record,
    with "path" added."""
    tasks = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not tasks:
        raise UserError("no tasks given: --tasks NAME[,NAME...]")
    include_path = _local_path(include_path) if include_path else None
    limit = int(limit) if limit is not None and limit >= 1 else limit  # < 1: a fraction of each task
    lm_eval = _lm_eval()
    tm = task_manager(tasks, include_path)
    run_dir, step = run_dir_of(checkpoint)
    lm = __getattr__("JaxLLM").from_checkpoint(checkpoint, mesh=mesh, batch_size=batch_size, seed=seed)
    t0 = time.time()
    try:
        with _jax_env_info(lm_eval):
            res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                          batch_size=lm.batch_size, task_manager=tm, log_samples=False,
                                          apply_chat_template=chat, random_seed=seed, torch_random_seed=None)
    except FileNotFoundError as e:  # a local task's data_files (relative ones resolve against the cwd)
        raise UserError(f"lm-eval task data not found: {e}") from None
    record = _json_part(res or {})
    record["jaxllm"] = {"checkpoint": storage.join(checkpoint), "run_dir": run_dir, "step": step, "tasks": tasks,
                        "include_path": include_path, "limit": limit, "num_fewshot": num_fewshot,
                        "batch_size": lm.batch_size, "chat": chat, "wall_s": round(time.time() - t0, 2)}
    path = output or results_path(run_dir)
    if jax.process_index() == 0:
        storage.write_atomic(path, json.dumps(record, indent=2))
    return {**record, "path": path}


# ---- showing results --------------------------------------------------------------------------------
def metric_rows(record: dict) -> list[tuple[str, str, float, Optional[float]]]:
    """results.json -> (task, metric, value, stderr) rows; lm_eval keys read "metric,filter"."""
    rows = []
    for task, metrics in (record.get("results") or {}).items():
        for key, value in metrics.items():
            name = key.split(",")[0]  # keys without a filter part are bookkeeping (alias, sample_len)
            if "," not in key or name.endswith("_stderr") or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            stderr = metrics.get(key.replace(name, f"{name}_stderr", 1))
            rows.append((task, key.replace(",none", ""), float(value),
                         float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


def format_table(record: dict) -> str:
    rows = metric_rows(record)
    if not rows:
        return "(no metrics)"
    w1 = max(len("task"), *(len(r[0]) for r in rows))
    w2 = max(len("metric"), *(len(r[1]) for r in rows))
    lines = [f"{'task':<{w1}}  {'metric':<{w2}}  value", f"{'-' * w1}  {'-' * w2}  ------"]
    for task, metric, value, stderr in rows:
        lines.append(f"{task:<{w1}}  {metric:<{w2}}  {value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
    return "\n".join(lines)


def describe_results(run_dir: str) -> Optional[str]:
    """`jaxllm info`'s eval section: the table of {run_dir}/eval/results.json, if there is one."""
    path = results_path(run_dir)
    if not storage.exists(path):
        return None
    record = json.loads(storage.read_text(path))
    meta = record.get("jaxllm") or {}
    return f"eval: {path} (step {meta.get('step')})\n" + format_table(record)
