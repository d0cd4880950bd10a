"""A run's identity: what it computes, pinned.

tests/data/identities.json holds the run id and identity of a fixed set of configurations. They
must not change when a component, or a parameter with a default, is added, nor when a default
is changed by accident: a deliberate change is made by rerunning this file with
DSGDBENCH_UPDATE_GOLDEN=1 and committing the new file (finished runs then train again).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms import OPTIMIZERS, PRESETS
from algorithms.base import preset
from bench import leaderboard as lb
from bench.config import RunConfig
from bench.errors import UserError
from bench.spec import Component, Param

GOLDEN = Path(__file__).parent / "data" / "identities.json"
MNIST1D = (4000, "cnn1d")  # (training samples, default model) the configurations are resolved with

# Diverse on purpose: every preset, components overridden, parameters short and full, schedules.
PINNED = {
    "csgd-default": dict(algo="csgd"),
    "dsgd-default": dict(algo="dsgd"),
    "dsgd-ac": dict(algo="dsgd-ac", ac_start="0.5", p=2.0, lr=0.4),
    "sam": dict(algo="sam", rho=0.1, seed=3),
    "ad-sam": dict(algo="ad-sam", sigma=0.02, samples=2),
    "lamb": dict(algo="lamb", lr=0.02, betas=(0.9, 0.99)),
    "d-lamb-torus": dict(algo="d-lamb", topology="torus", workers=16, lr=0.05),
    "dsgd-sam-atc": dict(algo="dsgd", grad="sam", order="atc", **{"sam.rho": 0.2}),
    "csgd-multistep": dict(algo="csgd", schedule="multistep", milestones=(0.3, 0.6), steps=300, warmup=20),
    "csgd-linear": dict(algo="csgd", batch=128, lr=0.1, lr_scaling="linear", ref_batch=512, val_fraction=0.1),
    "dsgd-dirichlet-fp64": dict(algo="dsgd", partition="dirichlet:0.5", precision="fp64", nesterov=True),
}


def resolved(**kw) -> RunConfig:
    return RunConfig(**kw).validate().resolve(*MNIST1D)


def current() -> dict:
    out = {}
    for name, kw in PINNED.items():
        c = resolved(**kw)
        out[name] = {"run_id": c.run_id(), "identity": c.identity()}
    return out


def test_pinned_identities():
    now = current()
    if os.environ.get("DSGDBENCH_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert set(golden) == set(PINNED)
    for name in PINNED:
        assert now[name]["identity"] == golden[name]["identity"], name
        assert now[name]["run_id"] == golden[name]["run_id"], name


def test_adding_a_component_or_a_parameter_changes_no_id(monkeypatch):
    before = current()

    @OPTIMIZERS.register("test-adagrad", "a component added after the ids were taken")
    class Added(Component):
        params = (Param("lr_power", 0.5, "a parameter of its own"),)

    preset("test-added", "plain", "test-adagrad", "gossip", "a preset added after the ids were taken")
    sgd = OPTIMIZERS.get("sgd")
    monkeypatch.setattr(sgd, "params", sgd.params + (Param("dampening", 0.0, "a parameter added with a default"),))
    try:
        assert current() == before
        # the new parameter at a non-default value is another run
        assert resolved(algo="csgd", dampening=0.1).run_id() != resolved(algo="csgd").run_id()
    finally:
        OPTIMIZERS.unregister("test-adagrad")
        PRESETS.unregister("test-added")


def test_identity_holds_only_what_the_run_uses():
    base = resolved(algo="csgd")
    assert resolved(algo="csgd", rho=0.5, p=7.0, ac_start="0.9").run_id() == base.run_id()  # not C-SGD's
    assert resolved(algo="csgd", executor="loop", results="elsewhere", device="cpu").run_id() == base.run_id()
    assert resolved(algo="csgd", topology="torus").run_id() == base.run_id()  # all-reduce has no graph
    assert resolved(algo="csgd", milestones=(0.1, 0.2)).run_id() == base.run_id()  # cosine ignores them
    assert resolved(algo="csgd", lr=0.8).run_id() == resolved(algo="csgd", lr=0.2, lr_scaling="linear",
                                                             ref_batch=128).run_id()  # the same final lr
    assert resolved(algo="csgd", momentum=0.8).run_id() != base.run_id()
    assert resolved(algo="csgd", **{"sgd.momentum": 0.8}).run_id() == resolved(algo="csgd", momentum=0.8).run_id()
    assert resolved(algo="csgd", seed=1).config_id() == base.config_id() != resolved(algo="dsgd").config_id()


def _ring(n: int, a: float) -> np.ndarray:
    W = np.eye(n) * (1 - 2 * a)
    for i in range(n):
        W[i, (i + 1) % n] = W[i, (i - 1) % n] = a
    return W


def test_files_enter_by_content(tmp_path):
    w1, w2 = tmp_path / "W.npy", tmp_path / "copy" / "W_same.npy"
    np.save(w1, _ring(16, 1 / 3))
    first = resolved(algo="dsgd", topology=f"file:{w1}")
    w2.parent.mkdir()
    shutil.copy(w1, w2)
    assert resolved(algo="dsgd", topology=f"file:{w2}").run_id().rsplit("-", 1)[1] == first.run_id().rsplit("-", 1)[1]
    np.save(w1, _ring(16, 0.25))  # other weights at the same path: another run
    assert resolved(algo="dsgd", topology=f"file:{w1}").run_id() != first.run_id()
    init = tmp_path / "init.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, init)
    a = resolved(algo="csgd", init=str(init)).run_id()
    torch.save({"fc.weight": torch.ones(2, 2)}, init)
    assert resolved(algo="csgd", init=str(init)).run_id() != a


def _write(root: Path, name: str, seed: int, acc: float, config: dict) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"algo": config["algo"], "topology": config.get("topology", "ring"),
                                                "workers": 4, "total_batch": 32, "seed": seed, "status": "completed",
                                                "test_acc": acc}))
    (d / "config.json").write_text(json.dumps(config))


def test_legacy_config_layout_loads_in_compare(tmp_path):
    """A run folder of the first layout (every hyperparameter top-level) is read with full names."""
    legacy = {"algo": "sam", "grad": "sam", "opt": "sgd", "comm": "allreduce", "topology": "allreduce",
              "rho": 0.1, "p": 3.0, "momentum": 0.9, "lr": 0.2, "seed": 0}
    _write(tmp_path, "old", 0, 90.0, legacy)
    new = RunConfig(algo="sam", rho=0.1, seed=1).resolve(*MNIST1D).to_dict()
    _write(tmp_path, "new", 1, 91.0, new)
    df = lb.runs_frame(str(tmp_path))
    assert "cfg.sam.rho" in df and "cfg.p" not in df and "cfg.rho" not in df  # p: not a component of that run
    assert sorted(df["cfg.sam.rho"]) == [0.1, 0.1]


def test_a_seed_is_never_counted_twice(tmp_path):
    cfg = RunConfig(algo="dsgd", seed=0).resolve(*MNIST1D).to_dict()
    _write(tmp_path, "a", 0, 90.0, cfg)
    _write(tmp_path, "b", 0, 80.0, {**cfg, "executor": "loop"})  # the same run, executed otherwise
    with pytest.raises(UserError, match="seed 0 appears twice") as e:
        lb.leaderboard(lb.runs_frame(str(tmp_path)))
    assert "\n" not in str(e.value) and str(tmp_path / "a") in str(e.value)


@pytest.mark.parametrize("name", PRESETS.names())
def test_config_json_round_trips(name):
    """A run's config.json (the resolved configuration) read back gives the same run: C-SGD's recorded
    topology "allreduce" included."""
    c = resolved(algo=name)
    back = RunConfig.from_dict(json.loads(json.dumps(c.to_dict()))).validate().resolve(*MNIST1D)
    assert back.run_id() == c.run_id() and back.identity() == c.identity()
    with pytest.raises(UserError, match="unknown topology 'allreduce'"):
        RunConfig(algo="dsgd", topology="allreduce").validate()  # only a rule without a graph has none
