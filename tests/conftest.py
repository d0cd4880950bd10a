"""Shared fixtures: the tiny synthetic data set and a small run configuration."""

import pytest

from bench.config import RunConfig
from bench.data import load_dataset


@pytest.fixture(scope="session")
def synthetic():
    """512 x (1, 16) Gaussian-mixture signals, 4 classes (built in memory, no download)."""
    return load_dataset("synthetic")


@pytest.fixture
def tiny_cfg(tmp_path):
    """A run small enough for a unit test: mlp on synthetic data, 4 workers of batch 8, 10 steps."""
    return RunConfig(dataset="synthetic", model="mlp", workers=4, batch=8, steps=10, lr=0.1,
                     schedule="constant", momentum=0.9, weight_decay=5e-4, hessian=False,
                     device="cpu", executor="auto", results=str(tmp_path / "results"))

