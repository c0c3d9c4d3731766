"""Benchmarks are not unit tests: CI only checks that each suite runs (seconds, no records)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("suite", [pytest.param("train", marks=pytest.mark.slow), "data", "checkpoint", pytest.param("rollout", marks=pytest.mark.slow),
                                   pytest.param("posttrain", marks=pytest.mark.slow)])
def test_suite_smoke(suite):
    env = dict(os.environ, XLA_FLAGS="")
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", suite, "--smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(suite)


@pytest.mark.slow  # long learning test: `pytest -m slow`
def test_peer_smoke():
    pytest.importorskip("torch")
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "peer", "--smoke"], cwd=ROOT,
                       env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "peer ratio" in r.stdout
