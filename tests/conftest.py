"""Shared fixtures: the tiny synthetic data set and a small run configuration.

The test plug-in tests/plugins/signum.py (an optimizer with a parameter of its own, and a
preset) is registered for the whole session through DSGDBENCH_PLUGINS, set before anything
imports the registries; processes the tests start (distributed ranks, CLI subprocesses)
inherit it. Every test that loops over the registries therefore covers it as well.
"""

import os
from pathlib import Path

PLUGIN = str(Path(__file__).parent / "plugins" / "signum.py")
os.environ["DSGDBENCH_PLUGINS"] = ",".join(filter(None, [os.environ.get("DSGDBENCH_PLUGINS"), PLUGIN]))

import pytest  # noqa: E402

from bench.config import RunConfig  # noqa: E402
from bench.data import load_dataset  # noqa: E402


@pytest.fixture(scope="session")
def synthetic():
    """512 x (1, 16) Gaussian-mixture signals, 4 classes (built in memory, no download)."""
    return load_dataset("synthetic")


@pytest.fixture
def tiny_cfg(tmp_path):
    """A run small enough for a unit test: mlp on synthetic data, 4 workers of batch 8, 10 steps."""
    return RunConfig(dataset="synthetic", model="mlp", workers=4, batch=8, steps=10, lr=0.1,
                     schedule="constant", weight_decay=5e-4, hessian=False,
                     device="cpu", executor="auto", results=str(tmp_path / "results"))

