"""Test setup: 8 simulated CPU devices (set before JAX starts) and small-config helpers."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
