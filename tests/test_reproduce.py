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
    dirs = sorted(p.parent for p in (tmp_path / "stored").glob("*/summary.json"))
    assert len(dirs) == 2
    script = _script()
    assert script.main([str(tmp_path / "again"), *map(str, dirs)]) == 0
    assert "2 of 2 runs reproduced exactly" in capsys.readouterr().out
    summary = dirs[1] / "summary.json"
    s = json.loads(summary.read_text())
    s["test_loss"] = s["test_loss"] * (1 + 1e-12)  # one number off in its last digits
    summary.write_text(json.dumps(s))
    assert script.main([str(tmp_path / "again2"), str(dirs[1])]) == 1
    assert "DIFFERS in test_loss" in capsys.readouterr().out
