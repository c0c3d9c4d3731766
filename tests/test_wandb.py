"""Weights & Biases logging (offline runs, read back from wandb's own transaction log), resume into
the same W&B run, and metrics.jsonl / TensorBoard on a remote (append-less) output_dir."""

import glob
import json
import os
import struct
import sys

import pytest

from jaxllm.config import WandbConfig
from jaxllm.core import monitor, storage
from jaxllm.core.monitor import MetricsLogger, read_metrics
from jaxllm.errors import ConfigError

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

# a one-layer model (compiles in seconds), no TensorBoard (tensorboardX imports torch when present)
TINY = ["model.n_layers=1", "model.d_model=64", "model.mlp_dim=128", "model.n_heads=2", "model.n_kv_heads=1",
        "train.steps=6", "train.batch_size=8", "train.seq_len=32", "eval.every=0", "eval.batches=1",
        "checkpoint.every=0", "log.tensorboard=false", "log.wandb.project=jaxllm-test", "log.wandb.tags=[unit]"]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """wandb in offline mode, quiet, with its home-dir files (cache, settings) under tmp_path."""
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                 "WANDB_CACHE_DIR": tmp_path / "wb-cache", "WANDB_CONFIG_DIR": tmp_path / "wb-config",
                 "WANDB_DATA_DIR": tmp_path / "wb-data"}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)


def _wandb_records(path: str):
    """The protobuf Records of a `.wandb` transaction log. Its framing is LevelDB's log format:
    a 7-byte file header (':W&B', magic, version), then 32 KiB blocks of records, each with a 7-byte
    header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); a block tail shorter than a
    header is zero padding."""
    data = open(path, "rb").read()
    ident, _, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _offline_runs(output_dir: str) -> list[dict]:
    """Each offline run under output_dir/wandb: its id, config, name, tags and history rows by step."""
    runs = []
    for path in sorted(glob.glob(os.path.join(output_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        run = {"history": {}}
        for r in _wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(id=r.run.run_id, name=r.run.display_name, tags=list(r.run.tags),
                           config={u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                run["history"].setdefault(r.history.step.num, {}).update(row)
        runs.append(run)
    return runs


@pytest.mark.slow
def test_offline_run_logs_every_step_and_a_restart_resumes_it(tiny, offline):
    from jaxllm.objectives import make_trainer
    first = tiny(*TINY, "train.stop_at=3")
    make_trainer(first).run()
    out = first.output_dir
    run_id = storage.read_text(os.path.join(out, "wandb_run_id")).strip()
    [run] = _offline_runs(out)
    assert run["id"] == run_id and run["name"] == "run" and run["tags"] == ["unit"]
    assert run["config"]["train"]["steps"] == 6 and run["config"]["log"]["wandb"]["project"] == "jaxllm-test"
    assert sorted(run["history"]) == [1, 2, 3]
    jsonl = {m["step"]: m for m in read_metrics(out) if "loss" in m}
    for step, row in run["history"].items():
        assert row["loss"] == pytest.approx(jsonl[step]["loss"]) and "grad_norm" in row and "lr" in row

    make_trainer(tiny(*TINY)).run()  # same output_dir: resumes from the step-3 checkpoint
    assert storage.read_text(os.path.join(out, "wandb_run_id")).strip() == run_id
    runs = _offline_runs(out)
    # offline, a resumed run is a second offline-run dir with the same id (`wandb sync` joins them)
    assert [r["id"] for r in runs] == [run_id, run_id]
    assert sorted(runs[1]["history"]) == [4, 5, 6]
    assert "eval_loss" in runs[1]["history"][6]  # the final eval
    jsonl = {m["step"]: m for m in read_metrics(out) if "loss" in m}
    assert all(runs[1]["history"][s]["loss"] == pytest.approx(jsonl[s]["loss"]) for s in (4, 5, 6))


def test_nonfinite_and_text_values_do_not_reach_wandb(tmp_path, offline):
    logger = MetricsLogger(str(tmp_path / "run"), tensorboard=False, wandb=WandbConfig(project="jaxllm-test"))
    logger.log(1, {"loss": float("nan"), "note": "text", "lr": 0.5})
    logger.log(2, {"loss": 1.0, "grad_norm": float("inf")})
    logger.close()
    [run] = _offline_runs(str(tmp_path / "run"))
    assert run["history"][1]["lr"] == 0.5 and "loss" not in run["history"][1] and "note" not in run["history"][1]
    assert run["history"][2]["loss"] == 1.0 and "grad_norm" not in run["history"][2]
    assert [m.get("loss") for m in read_metrics(str(tmp_path / "run"))] == ["nan", 1.0]  # jsonl keeps them


def test_missing_wandb_is_a_config_error_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'jaxllm\[wandb\]'"):
        MetricsLogger(str(tmp_path / "run"), wandb=WandbConfig(project="p"))
    assert not os.path.exists(tmp_path / "run")  # failed before writing anything


def test_bad_wandb_mode_names_the_key(tiny):
    with pytest.raises(ConfigError, match=r"log\.wandb\.mode='sometimes'"):
        tiny("log.wandb.mode=sometimes")
    assert tiny("log.wandb.mode=offline").log.wandb.mode == "offline"


def test_metrics_on_a_remote_output_dir_are_rewritten_whole_and_resume(tmp_path, monkeypatch):
    """epath routes only gs/s3/az/hf URLs to fsspec (no memory://), so the remote code path runs on
    a tmp dir that storage.is_remote calls remote: no append mode, whole-object rewrites."""
    monkeypatch.setattr(storage, "is_remote", lambda p: True)
    out = str(tmp_path / "run")
    os.makedirs(os.path.join(out, "tensorboard"))  # a real object store needs no directories
    first = MetricsLogger(out)
    first.log(1, {"loss": 3.0})
    first.log(2, {"loss": float("nan")})
    assert read_metrics(out) == []  # not yet synced: written every SYNC_EVERY_S and on close
    first.close()
    assert [(m["step"], m["loss"]) for m in read_metrics(out)] == [(1, 3.0), (2, "nan")]
    events = glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
    assert len(events) == 1 and os.path.getsize(events[0]) > 0  # copied up from the local temp dir

    monkeypatch.setattr(monitor, "SYNC_EVERY_S", 0.0)
    second = MetricsLogger(out)  # a resumed run: keeps the earlier lines
    second.log(3, {"loss": 2.0})
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]  # synced at once (SYNC_EVERY_S=0)
    second.log(4, {"loss": 1.0})
    second.close()
    assert [(m["step"], m["loss"]) for m in read_metrics(out)] == [(1, 3.0), (2, "nan"), (3, 2.0), (4, 1.0)]
    assert len(glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))) == 2


def test_local_metrics_repair_a_torn_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-line
    logger = MetricsLogger(str(out), tensorboard=False)
    logger.log(3, {"loss": 1.0})
    assert [m["step"] for m in read_metrics(str(out))] == [1, 3]  # flushed per line, before close
    logger.close()
