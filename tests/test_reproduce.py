"""scripts/reproduce_runs.py: a stored run retrained by this code compares equal; a changed number does not."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from bench.runner import run

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("reproduce_runs", ROOT / "scripts" / "reproduce_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reproduce_a_stored_run_and_catch_a_changed_number(tiny_cfg, tmp_path, capsys):
    for algo in ("csgd", "dsgd"):  # C-SGD's config.json records topology "allreduce"
        run(tiny_cfg.replace(algo=algo, results=str(tmp_path / "stored"), val_fraction=0.25))
    # a run that diverges before its first evaluation (an empty metrics.csv) reproduces too
    run(tiny_cfg.replace(algo="dsgd", lr=1e6, eval_every=1000, results=str(tmp_path / "stored")))
    dirs = sorted(p.parent for p in (tmp_path / "stored").glob("*/summary.json"))
    status = {d: json.loads((d / "summary.json").read_text())["status"] for d in dirs}
    assert sorted(status.values()) == ["completed", "completed", "diverged"]
    assert any((d / "metrics.csv").stat().st_size == 0 for d in dirs if status[d] == "diverged")
    script = _script()
    assert script.main([str(tmp_path / "again"), *map(str, dirs)]) == 0
    assert "3 of 3 runs reproduced exactly" in capsys.readouterr().out
    target = next(d for d in dirs if status[d] == "completed" and d.name.startswith("dsgd"))
    summary = target / "summary.json"
    s = json.loads(summary.read_text())
    s["test_loss"] = s["test_loss"] * (1 + 1e-12)  # one number off in its last digits
    summary.write_text(json.dumps(s))
    assert script.main([str(tmp_path / "again2"), str(target)]) == 1
    assert "DIFFERS in test_loss" in capsys.readouterr().out
