"""Test setup: 8 simulated CPU devices (set before JAX starts) and small-config helpers."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs (imported by etils/tfds) would probe each bucket's layout over gRPC; the fake GCS server
# of tests/test_remote.py does not serve that API. Must be set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# One persistent XLA compilation cache for the session and the subprocesses it starts: many tests
# compile the same tiny programs (and restarted runs compile them again).
_XLA_CACHE = tempfile.mkdtemp(prefix="jaxllm-test-xla-cache-")
atexit.register(shutil.rmtree, _XLA_CACHE, True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

from jaxllm.config import RunConfig, load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tmp_path, *overrides, base="configs/runs/pretrain_tiny.yaml") -> RunConfig:
    """The shipped tiny pretraining config, shrunk for tests, with overrides."""
    defaults = [f"output_dir={tmp_path}/run", "train.progress=false", "train.log_every=1",
                "checkpoint.async_save=false"]
    return load_config(os.path.join(ROOT, base), defaults + list(overrides))


@pytest.fixture
def tiny(tmp_path):
    return lambda *ov, **kw: tiny_config(tmp_path, *ov, **kw)


# ---- one shared chain of stages (session-scoped: post-training, RL and HF tests start from it) ----
def stage_config(tmp, name, *overrides) -> RunConfig:
    return tiny_config(tmp, *overrides, base=f"configs/runs/{name}.yaml")


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    from jaxllm.objectives import make_trainer
    cfg = tiny_config(tmp_path_factory.mktemp("pre"), "train.steps=150", "eval.every=0", "checkpoint.every=0")
    make_trainer(cfg).run()
    return cfg.output_dir


@pytest.fixture(scope="session")
def sft(pretrained, tmp_path_factory):
    from jaxllm.objectives import make_trainer
    cfg = stage_config(tmp_path_factory.mktemp("sft"), "sft_tiny", f"checkpoint.init_from={pretrained}",
                       "train.steps=400", "eval.every=400", "objective.eval_generate=100", "checkpoint.every=0")
    make_trainer(cfg).run()
    return cfg.output_dir


@pytest.fixture(scope="session")
def reward_model(sft, tmp_path_factory):
    """(output_dir, Trainer) of a 200-step Bradley-Terry RM from the SFT model."""
    from jaxllm.objectives import make_trainer
    cfg = stage_config(tmp_path_factory.mktemp("rm"), "rm_tiny", f"checkpoint.init_from={sft}", "train.steps=200",
                       "eval.every=200", "checkpoint.every=0")
    t = make_trainer(cfg)
    t.run()
    return cfg.output_dir, t
