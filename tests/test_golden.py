"""The golden test: the numbers of a tiny suite (tests/data/golden.toml) are pinned in tests/data/golden.json.

Every summary number of every run (accuracies, losses, consensus distance, both Hessian eigenvalues,
the cost counters) must match. The runs are in float64, so a correct code gives the same numbers on
any CPU and thread count up to rounding: rel 1e-9 (rounding after 30 steps is ~1e-13; any change of an
update rule, a schedule, the data order or the evaluation moves them by far more). Only a deliberate
update changes the file: DSGDBENCH_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py, committed
with the change that moves the numbers (and the regenerated reference results).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsgdbench import app

DATA = Path(__file__).parent / "data"
NUMBERS = ("status", "test_acc", "test_loss", "train_acc", "train_loss", "val_acc", "val_loss", "consensus_distance",
           "top_eig", "adaptive_top_eig", "steps_done", "grad_evals_per_step", "bytes_per_step", "flops_per_step",
           "params", "spectral_gap")


def numbers(root: Path) -> dict:
    out = {}
    for f in sorted(root.glob("*/summary.json")):
        s = json.loads(f.read_text())
        out[f"{s['algo']}-s{s['seed']}"] = {k: s.get(k) for k in NUMBERS}
    return out


def test_golden_suite(tmp_path):
    res = CliRunner().invoke(app, ["suite", str(DATA / "golden.toml"), "--results", str(tmp_path)])
    assert res.exit_code == 0, res.output
    got = numbers(tmp_path)
    if os.environ.get("DSGDBENCH_UPDATE_GOLDEN"):
        (DATA / "golden.json").write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads((DATA / "golden.json").read_text())
    assert sorted(got) == sorted(want)
    for run, values in want.items():
        for k, v in values.items():
            g = got[run][k]
            if isinstance(v, float) and isinstance(g, float):
                assert g == pytest.approx(v, rel=1e-9, abs=1e-12), (run, k)
            else:
                assert g == v, (run, k)
