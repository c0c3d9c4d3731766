"""`jaxllm eval` through lm-evaluation-harness, on the tiny SFT checkpoint and two local tasks
(tests/fixtures/lm_eval: multiple choice and greedy generation on held-out generated-task prompts):
the harness's accuracies equal hand-computed loops over plain jaxllm calls, the rolling
log-likelihood equals the direct sum of token log-probs, results land next to the checkpoint and in
`jaxllm info`, an eval pipeline stage runs once, and user mistakes end in one line."""

import atexit
import contextlib
import io
import json
import os
import shutil
import tempfile

os.environ["HF_DATASETS_OFFLINE"] = "1"  # never download: the tasks' data are local JSONL files
if "HF_DATASETS_CACHE" not in os.environ:  # datasets' Arrow cache, away from the home directory
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="jaxllm-test-hf-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

pytest.importorskip("lm_eval")

from jaxllm.app.cli import main  # noqa: E402
from jaxllm.app.inference import generate, load_model  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "lm_eval")
MC, GEN = "jaxllm_tasks_mc", "jaxllm_tasks_gen"


def _docs(task: str) -> list[dict]:
    with open(os.path.join(FIXTURES, f"{task}.jsonl")) as f:
        return [json.loads(line) for line in f]


def _prompt(doc: dict) -> str:
    """The tasks' doc_to_text: jaxllm's chat format spelled out."""
    return f"<|user|>{doc['prompt']}<|end|><|assistant|>"


def _instance(kind: str, args: tuple):
    from lm_eval.api.instance import Instance
    return Instance(kind, {}, args, 0)


_FORWARDS: dict = {}


def _forward(model, inputs, targets):
    """Under jit (eager nnx runs op by op, and eager ops compile per shape): inputs / targets [1, W] ->
    (log-prob of each target [W], target is the argmax [W]) from the model's plain forward."""
    if id(model) not in _FORWARDS:
        graphdef, state = nnx.split(model)

        def fn(st, x, y):
            logits = nnx.merge(graphdef, st)(x)[0]  # [W, V]
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[0, :, None], -1)[:, 0]
            return logp, jnp.argmax(logits, -1) == y[0]
        _FORWARDS[id(model)] = (state, jax.jit(fn))
    state, fn = _FORWARDS[id(model)]
    return [np.asarray(a) for a in fn(state, inputs, targets)]


def _direct(model, ids: list[int], n: int, width: int = 64) -> tuple[float, bool]:
    """One plain unbatched forward over ids -> (sum of the last n tokens' log-probs, all argmax).
    The input is right-padded to `width` so that one program serves every length: the model is
    causal, so the first len(ids) - 1 positions do not see the padding."""
    T = len(ids) - 1
    assert T <= width
    pad = lambda x: jnp.asarray([list(x) + [0] * (width - T)], jnp.int32)
    logp, match = _forward(model, pad(ids[:-1]), pad(ids[1:]))
    return float(logp[T - n:T].sum()), bool(match[T - n:T].all())


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The shipped task YAMLs with absolute data_files: lm_eval hands data_files to HF datasets,
    which resolves relative ones against the working directory, not the YAML's."""
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    for task in (MC, GEN):
        with open(os.path.join(FIXTURES, f"{task}.yaml")) as f:
            text = f.read()
        rel = f"tests/fixtures/lm_eval/{task}.jsonl"
        assert rel in text
        (out / f"{task}.yaml").write_text(text.replace(rel, os.path.join(FIXTURES, f"{task}.jsonl")))
    return str(out)


@pytest.fixture(scope="module")
def run(sft, tmp_path_factory):
    """A copy of the session's SFT run: results are written into the run dir."""
    dst = tmp_path_factory.mktemp("eval") / "sft"
    shutil.copytree(sft, dst)
    return str(dst)


@pytest.fixture(scope="module")
def evaluated(run, task_dir):
    """`jaxllm eval` on both tasks (batch 5: ragged last batches, padded rows) -> (results.json, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["eval", run, "--tasks", f"{MC},{GEN}", "--include-path", task_dir, "--batch-size", "5"])
    assert code == 0
    with open(os.path.join(run, "eval", "results.json")) as f:
        return json.load(f), out.getvalue()


@pytest.fixture(scope="module")
def loaded(run):
    return load_model(run)[:2]


def test_multiple_choice_accuracy_equals_hand_loop(evaluated, loaded):
    from jaxllm.app.evaluate import JaxLLM
    model, tok = loaded
    docs = _docs(MC)
    correct, requests, direct = 0, [], []
    for doc in docs:
        ctx = tok.encode(_prompt(doc), bos=True)
        scores = []
        for choice in doc["choices"]:
            cont = tok.encode(choice)
            assert tok.encode(_prompt(doc) + choice, bos=True) == ctx + cont  # the harness's split is this one
            direct.append(_direct(model, ctx + cont, len(cont)))
            scores.append(direct[-1][0])
            requests.append(_instance("loglikelihood", (_prompt(doc), choice)))
        correct += int(np.argmax(scores) == doc["label"])
    acc = correct / len(docs)
    assert evaluated[0]["results"][MC]["acc,none"] == pytest.approx(acc, abs=1e-12)
    # per request too: batched + padded + chunked head == one plain forward
    got = JaxLLM(model, tok, batch_size=5).loglikelihood(requests)
    np.testing.assert_allclose([g[0] for g in got], [d[0] for d in direct], rtol=1e-4, atol=1e-4)
    assert [g[1] for g in got] == [d[1] for d in direct]
    print(f"\nmultiple choice acc {acc:.4f} ({correct}/{len(docs)})")


def test_generation_exact_match_equals_hand_loop(evaluated, loaded):
    from jaxllm.app.evaluate import JaxLLM
    model, tok = loaded
    docs = _docs(GEN)
    outs = generate(model, tok, [_prompt(d) for d in docs], max_new=12, temperature=0.0)
    preds = [o.split("<|end|>")[0] for o in outs]  # the task's `until`
    em = float(np.mean([p == d["answer"] for p, d in zip(preds, docs)]))
    assert evaluated[0]["results"][GEN]["exact_match,none"] == pytest.approx(em, abs=1e-12)
    kwargs = {"until": ["<|end|>"], "max_gen_toks": 12, "do_sample": False}
    got = JaxLLM(model, tok, batch_size=5).generate_until([_instance("generate_until", (_prompt(d), kwargs))
                                                          for d in docs])
    assert got == preds
    print(f"\ngeneration exact match {em:.4f}")


def test_loglikelihood_rolling_is_the_sum_of_token_logps(loaded):
    from jaxllm.app.evaluate import JaxLLM
    model, tok = loaded
    text = "The quick brown fox jumps over the lazy dog, twice."
    ids = [tok.bos_id] + tok.encode(text)
    [got] = JaxLLM(model, tok, batch_size=2).loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    assert got == pytest.approx(_direct(model, ids, len(ids) - 1)[0], rel=1e-5)
    # windows of 8 tokens: every token scored once, each window as a plain forward would
    small = JaxLLM(model, tok, batch_size=2, max_length=8)
    windows = small.rolling_windows(text)
    assert len(windows) > 2 and sum(len(c) for _, c in windows) == len(ids) - 1
    assert all(len(a) + len(b) - 1 <= 8 for a, b in windows)
    [got_small] = small.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    assert got_small == pytest.approx(sum(_direct(model, a + b, len(b))[0] for a, b in windows), rel=1e-5)


def test_full_mesh_matches_one_device(run, loaded):
    """The model sharded over 8 devices (data x fsdp x tensor), the batch over the data axes.
    (Generation goes through the sampler, whose sharding tests/test_sampler.py covers.)"""
    from jaxllm.app.evaluate import JaxLLM
    from jaxllm.config import MeshConfig
    from jaxllm.core.sharding import make_mesh
    docs = _docs(MC)[:3]
    scored = [_instance("loglikelihood", (_prompt(d), c)) for d in docs for c in d["choices"]]
    sharded = JaxLLM.from_checkpoint(run, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), batch_size=3)
    assert sharded.batch_size == 4  # a multiple of the data-parallel size
    one = JaxLLM(*loaded, batch_size=5)  # the shapes the tests above compiled
    got, want = sharded.loglikelihood(scored), one.loglikelihood(scored)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-4, atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]


def test_chat_template_renders_the_training_format(loaded):
    from jaxllm.app.evaluate import JaxLLMCore
    from jaxllm.data.chat import prompt_ids
    model, tok = loaded
    core = JaxLLMCore(model, tok)
    text = core.chat_text([{"role": "user", "content": "12+30="}])
    assert core.encode(text) == list(prompt_ids(tok, "12+30="))


def test_results_next_to_checkpoint_and_in_info(evaluated, run, capsys):
    record, stdout = evaluated
    assert record["jaxllm"]["run_dir"] == run and record["jaxllm"]["step"] == 400
    assert set(record["results"]) == {MC, GEN} and record["n-shot"] == {MC: 0, GEN: 0}
    acc = record["results"][MC]["acc,none"]
    assert [MC, "acc", f"{acc:.4f}"] in [line.split()[:3] for line in stdout.splitlines()]
    assert f"results: {os.path.join(run, 'eval', 'results.json')}" in stdout
    assert main(["info", run]) == 0
    out = capsys.readouterr().out
    assert f"eval: {os.path.join(run, 'eval', 'results.json')} (step 400)" in out
    assert f"{acc:.4f}" in out and "exact_match" in out


@pytest.mark.slow  # CI time: `pytest -m slow`
def test_unknown_task_is_one_line_exit_2(run, task_dir, capsys):
    assert main(["eval", run, "--tasks", f"{MC}x", "--include-path", task_dir]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: unknown lm-eval task {MC}x") and f"did you mean '{MC}'" in err, err
    assert len(err.splitlines()) == 1, err


def test_missing_lm_eval_names_the_extra(run, monkeypatch, capsys):
    from jaxllm.app import evaluate
    monkeypatch.setattr(evaluate.importlib.util, "find_spec", lambda name, *a: None)
    assert main(["eval", run, "--tasks", MC]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'jaxllm[eval]'" in err and len(err.splitlines()) == 1


def _pipeline(tmp_path, run, task_dir, **eval_stage) -> str:
    """A pipeline whose sft stage is already done (a copy of the SFT run), then an eval stage."""
    import yaml
    pipe = tmp_path / "pipe"
    shutil.copytree(run, pipe / "sft", ignore=shutil.ignore_patterns("eval"))
    (pipe / "sft" / "stage_done.json").write_text(json.dumps({"stage": "sft", "wall_s": 1.0, "result": {}}))
    stage = {"name": "sft_eval", "kind": "eval", "checkpoint": "sft", "tasks": [MC], "limit": 9,
             "include_path": task_dir, **eval_stage}
    spec = {"output_dir": str(pipe), "stages": [
        stage, {"name": "sft", "config": os.path.join(ROOT, "configs/runs/sft_tiny.yaml")}]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_pipeline_eval_stage_runs_after_its_checkpoint_and_once(tmp_path, run, task_dir, capsys):
    path = _pipeline(tmp_path, run, task_dir)
    assert main(["pipeline", path, "--no-report"]) == 0
    log = capsys.readouterr().out
    assert log.index("[sft] finished earlier") < log.index("[sft_eval] running")  # ordered by its checkpoint
    done = json.loads((tmp_path / "pipe" / "sft_eval" / "stage_done.json").read_text())
    results = json.loads((tmp_path / "pipe" / "sft_eval" / "results.json").read_text())
    assert done["depends_on"] == ["sft"] and results["n-samples"][MC]["effective"] == 9
    assert done["result"] == {f"{MC}/acc": results["results"][MC]["acc,none"]}
    assert main(["pipeline", path, "--no-report"]) == 0
    assert "[sft_eval] finished earlier, skipped" in capsys.readouterr().out


@pytest.mark.parametrize("edit, message", [
    ({"checkpoint": "sfft"}, "eval stage sft_eval: checkpoint='sfft' names no train stage; did you mean 'sft'?"),
    ({"tasks": []}, "eval stage sft_eval: tasks is empty"),
    ({"task": [MC]}, "unknown config key stages.0.task; did you mean 'tasks'?"),
])
def test_bad_eval_stage_fails_with_one_line(tmp_path, run, task_dir, capsys, edit, message):
    path = _pipeline(tmp_path, run, task_dir, **edit)
    assert main(["pipeline", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "pipe" / "sft_eval").exists()
