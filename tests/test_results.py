"""Result files (bench/results.py) and the leaderboard (bench/leaderboard.py).

No training here: summaries and frames are built by hand, so the expected numbers are
computed independently. Fixtures live in this file on purpose.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench import leaderboard as lb
from bench import results
from bench.errors import UserError


def leftovers(folder: Path, keep) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in keep)


# ----------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    f = tmp_path / "summary.json"
    results.atomic_write(f, "first\n")
    assert f.read_text() == "first\n"
    results.atomic_write(f, "second, longer content\n")
    assert f.read_text() == "second, longer content\n"
    results.atomic_write(f, b"\x00\x01bytes")
    assert f.read_bytes() == b"\x00\x01bytes"
    results.atomic_write(str(f), "")  # a str path, empty content
    assert f.read_text() == ""
    assert leftovers(tmp_path, {"summary.json"}) == []


def test_atomic_write_crash_at_rename_keeps_old_file(tmp_path, monkeypatch):
    f = tmp_path / "summary.json"
    results.atomic_write(f, '{"status": "completed"}\n')

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        results.atomic_write(f, "half")
    assert f.read_text() == '{"status": "completed"}\n'
    assert leftovers(tmp_path, {"summary.json"}) == []


def test_atomic_write_crash_while_writing_keeps_old_file(tmp_path, monkeypatch):
    f = tmp_path / "model.pt"
    results.atomic_write(f, b"old model")

    def boom(fd):
        raise KeyboardInterrupt  # the user hits Ctrl-C mid-write

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        results.atomic_write(f, b"new model")
    assert f.read_bytes() == b"old model"
    assert leftovers(tmp_path, {"model.pt"}) == []


def test_atomic_write_missing_folder_raises(tmp_path):
    with pytest.raises(OSError):
        results.atomic_write(tmp_path / "nope" / "x.json", "x")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_honours_umask(tmp_path):
    old = os.umask(0o022)
    try:
        ref = tmp_path / "ref.json"
        ref.write_text("x")
        f = tmp_path / "summary.json"
        results.atomic_write(f, "x")
        assert stat.S_IMODE(f.stat().st_mode) == stat.S_IMODE(ref.stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_write_json_and_csv(tmp_path):
    results.write_json(tmp_path / "a.json", {"t": (1, 2), "x": np.float32(0.5), "y": torch.tensor(3),
                                             "p": Path("/x")})
    assert json.loads((tmp_path / "a.json").read_text()) == {"t": [1, 2], "x": 0.5, "y": 3, "p": "/x"}
    results.write_csv(tmp_path / "m.csv", [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4, "acc": 90.0}])
    df = pd.read_csv(tmp_path / "m.csv")
    assert list(df.columns) == ["step", "loss", "acc"]
    assert df["step"].tolist() == [1, 2] and math.isnan(df["acc"][0]) and df["acc"][1] == 90.0
    results.write_csv(tmp_path / "empty.csv", [])
    assert (tmp_path / "empty.csv").read_text() == ""
    results.save_model(tmp_path / "model.pt", {"w": torch.ones(2, requires_grad=True)})
    sd = torch.load(tmp_path / "model.pt")
    assert torch.equal(sd["w"], torch.ones(2)) and not sd["w"].requires_grad
    assert leftovers(tmp_path, {"a.json", "m.csv", "empty.csv", "model.pt"}) == []


def test_prepare_results_dir(tmp_path):
    p = results.prepare_results_dir(str(tmp_path / "a" / "b"))
    assert p.is_dir() and list(p.iterdir()) == []  # the write probe is gone
    afile = tmp_path / "afile"
    afile.write_text("keep")
    with pytest.raises(UserError, match="not writable"):
        results.prepare_results_dir(str(afile / "sub"))
    with pytest.raises(UserError, match="--results"):
        results.prepare_results_dir(str(afile))
    assert afile.read_text() == "keep"


def test_versions():
    v = results.versions()
    assert v["torch"] == torch.__version__ and {"dsgdbench", "git", "python"} <= set(v)


# ----------------------------------------------------------------------------------------------
# reading summaries


def _summary(**kw) -> dict:
    base = {"algo": "dsgd", "topology": "ring", "workers": 4, "total_batch": 32, "seed": 0, "status": "completed",
            "test_acc": 80.0, "test_loss": 0.5, "config_id": "A"}
    base.update(kw)
    return base


def _write_run(root: Path, name: str, summary=None, config=None, raw: str | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if raw is not None:
        (d / "summary.json").write_text(raw)
    elif summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def test_read_summary(tmp_path):
    assert results.read_summary(tmp_path) is None
    _write_run(tmp_path, "ok", _summary())
    assert results.read_summary(tmp_path / "ok")["algo"] == "dsgd"
    for name, raw in [("garbage", b"not json {"), ("list", b"[1, 2]"), ("nostatus", b'{"algo": "dsgd"}'),
                      ("noalgo", b'{"status": "completed"}'), ("binary", b"\xff\xfe\x00garbage"), ("empty", b"")]:
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_bytes(raw)
        with pytest.raises(ValueError, match="summary.json"):
            results.read_summary(d)


def test_is_finished(tmp_path):
    assert not results.is_finished(tmp_path / "nothing")
    assert results.is_finished(_write_run(tmp_path, "c", _summary(status="completed")))
    assert results.is_finished(_write_run(tmp_path, "d", _summary(status="diverged")))
    assert not results.is_finished(_write_run(tmp_path, "r", _summary(status="running")))
    assert not results.is_finished(_write_run(tmp_path, "x", raw="{{{"))


def test_load_runs_skips_corrupt_with_warning(tmp_path):
    _write_run(tmp_path, "a", _summary(seed=0))
    _write_run(tmp_path, "group/deeper/b", _summary(seed=1))  # found recursively
    bad = {
        "garbage": _write_run(tmp_path, "garbage", raw="\x00\x01 definitely not json"),
        "nostatus": _write_run(tmp_path, "nostatus", {"algo": "dsgd", "test_acc": 1.0}),
        "noalgo": _write_run(tmp_path, "noalgo", {"status": "completed", "test_acc": 1.0}),
        "list": _write_run(tmp_path, "list", raw="[]"),
    }
    (tmp_path / "not-a-run").mkdir()  # a folder without summary is no run and no warning
    warnings: list[str] = []
    runs = results.load_runs(str(tmp_path), warn=warnings.append)
    assert sorted(r["seed"] for r in runs) == [0, 1]
    assert {Path(r["run_dir"]).name for r in runs} == {"a", "b"}
    assert len(warnings) == 4
    for d in bad.values():
        assert sum(str(d / "summary.json") in w for w in warnings) == 1
    # without a callback the corrupt ones are still skipped quietly
    assert len(results.load_runs(str(tmp_path))) == 2


def test_load_runs_missing_root(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        results.load_runs(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------------------------
# leaderboard on hand-built frames


def _frame() -> pd.DataFrame:
    rows = []
    for seed, acc, loss in zip(range(3), (80.0, 82.0, 87.0), (0.50, 0.40, 0.30)):
        rows.append(_summary(seed=seed, test_acc=acc, test_loss=loss, config_id="A", **{"cfg.lr": 0.1}))
    for seed, acc, loss in zip(range(2), (90.0, 91.0), (0.20, 0.25)):
        rows.append(_summary(algo="csgd", topology="allreduce", seed=seed, test_acc=acc, test_loss=loss,
                             config_id="B", **{"cfg.lr": 0.1}))
    rows.append(_summary(algo="csgd", topology="allreduce", seed=2, status="diverged", test_acc=None,
                         test_loss=None, config_id="B", **{"cfg.lr": 0.1}))
    return pd.DataFrame(rows)


def test_leaderboard_mean_std_and_diverged():
    numeric, display = lb.leaderboard(_frame(), metrics=("test_acc", "test_loss"))
    assert len(numeric) == len(display) == 2
    # best mean first: csgd (90.5) before dsgd (83)
    assert list(numeric["algo"]) == ["csgd", "dsgd"]
    c, d = numeric.iloc[0], numeric.iloc[1]
    assert c["seeds"] == 3 and c["diverged"] == 1
    assert c["test_acc_mean"] == pytest.approx(90.5)  # the diverged seed is not averaged
    assert c["test_acc_std"] == pytest.approx(math.sqrt(0.5))
    assert c["test_loss_mean"] == pytest.approx(0.225)
    assert d["seeds"] == 3 and d["diverged"] == 0
    assert d["test_acc_mean"] == pytest.approx(83.0)
    assert d["test_acc_std"] == pytest.approx(math.sqrt(13.0))  # deviations -3, -1, 4; ddof=1
    assert d["test_loss_std"] == pytest.approx(0.1)
    dc, dd = display.iloc[0], display.iloc[1]
    assert dc["test acc (%)"] == "90.50 ± 0.71" and dc["test loss"] == "0.225 ± 0.035"
    assert dd["test acc (%)"] == "83.00 ± 3.61" and dd["test loss"] == "0.400 ± 0.100"
    # 1 failure in 3 runs, with the 95% Clopper-Pearson interval [0.0084, 0.9057] of the rate
    assert dc["status"] == "1/3 failed (1 diverged; 1–91%)" and dd["status"] == "ok"
    assert c["failed"] == 1 and c["failure_rate"] == pytest.approx(1 / 3)
    assert (c["failure_lo"], c["failure_hi"]) == pytest.approx((0.0084038, 0.9057007), abs=1e-6)
    assert d["failed"] == 0 and d["failure_lo"] == 0.0 and d["failure_hi"] == pytest.approx(0.7075982, abs=1e-6)
    assert dc["seeds"] == "3"


def test_leaderboard_single_seed_and_all_diverged():
    df = pd.DataFrame([
        _summary(config_id="A", test_acc=70.0),
        _summary(algo="lamb", config_id="L", status="diverged", test_acc=None, test_loss=None),
    ])
    numeric, display = lb.leaderboard(df, metrics=("test_acc",))
    assert list(numeric["algo"]) == ["dsgd", "lamb"]  # the diverged group ranks last
    assert display.iloc[0]["test acc (%)"] == "70.00"  # one seed: no ±
    assert math.isnan(numeric.iloc[0]["test_acc_std"])
    assert display.iloc[1]["test acc (%)"] == "—" and math.isnan(numeric.iloc[1]["test_acc_mean"])
    # 1 of 1 failed: the Clopper-Pearson interval of the rate is [0.025, 1] (the lower end solves p^1 = 0.025)
    assert display.iloc[1]["status"] == "1/1 failed (1 diverged; 3–100%)"
    assert numeric.iloc[1]["failure_lo"] == pytest.approx(0.025) and numeric.iloc[1]["failure_hi"] == 1.0


def test_leaderboard_by_algo_and_unknown_key():
    numeric, _ = lb.leaderboard(_frame(), by=["algo"], metrics=("test_acc",))
    assert list(numeric.columns[:1]) == ["algo"] and sorted(numeric["algo"]) == ["csgd", "dsgd"]
    assert "topology" not in numeric.columns
    numeric, _ = lb.leaderboard(_frame(), by=["lr"], metrics=("test_acc",))  # a config field, via cfg.lr
    assert len(numeric) == 1 and numeric.iloc[0]["seeds"] == 6 and numeric.iloc[0]["diverged"] == 1
    assert numeric.iloc[0]["test_acc_mean"] == pytest.approx(np.mean([80, 82, 87, 90, 91]))
    with pytest.raises(UserError, match="--by: unknown column 'colour'"):
        lb.leaderboard(_frame(), by=["colour"])


def test_leaderboard_empty():
    with pytest.raises(UserError, match="no finished runs"):
        lb.leaderboard(pd.DataFrame())


def test_metric_columns_missing_or_empty_are_dropped():
    df = _frame()
    df["top_eig"] = None
    numeric, display = lb.leaderboard(df, metrics=("test_acc", "top_eig", "hessian_trace"))
    assert "top_eig_mean" not in numeric.columns and "hessian_trace_mean" not in numeric.columns
    assert "top-1 eigenvalue" not in display.columns


def test_render_and_format_from_path():
    numeric, display = lb.leaderboard(_frame(), metrics=("test_acc",))
    csv = lb.render(numeric, display, "csv")
    back = pd.read_csv(io.StringIO(csv))
    assert back["test_acc_mean"].tolist() == pytest.approx([90.5, 83.0])
    md = lb.render(numeric, display, "md")
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert "90.50 ± 0.71" in md and len(table) == 4  # header, rule, two groups
    # a group has a failed run: the table is followed by the note that explains the status
    assert md.splitlines()[:4] == table and md.strip().splitlines()[-1].startswith("failed runs (diverged")
    assert lb.format_from_path("x/board.csv") == "csv"
    assert lb.format_from_path("board.MD") == "md"
    assert lb.format_from_path("board.markdown") == "md"
    for bad in ("board.txt", "board", "board.csv.bak"):
        with pytest.raises(UserError, match="--out"):
            lb.format_from_path(bad)


# ----------------------------------------------------------------------------------------------
# runs_frame -> leaderboard, from files


def _config(**kw) -> dict:
    base = {"algo": "dsgd", "topology": "ring", "workers": 4, "batch": 8, "seed": 0, "lr": 0.1, "steps": 50,
            "epochs": 150.0, "dataset": "synthetic", "results": "results", "device": "cpu", "executor": "auto",
            "milestones": [0.5, 0.75]}
    base.update(kw)
    return base


def _file_run(root, name, acc, **cfg_kw):
    cfg = _config(**cfg_kw)
    s = _summary(algo=cfg["algo"], topology=cfg["topology"], workers=cfg["workers"],
                 total_batch=cfg["workers"] * cfg["batch"], seed=cfg["seed"], test_acc=acc,
                 versions={"torch": "x"}, config_id=f"{cfg['lr']}-{cfg['steps']}")
    _write_run(root, name, s, cfg)


def test_runs_frame_groups_seeds_and_splits_configs(tmp_path):
    for seed, acc in enumerate((70.0, 72.0, 74.0)):
        # the seed and where/how fields differ between seeds: they must not split the group
        _file_run(tmp_path, f"lr01-s{seed}", acc, seed=seed, results=f"r{seed}", device=["cpu", "cuda"][seed % 2])
    for seed, acc in enumerate((60.0, 64.0)):
        _file_run(tmp_path, f"lr1-s{seed}", acc, seed=seed, lr=1.0)
    _write_run(tmp_path, "running", _summary(status="running"), _config())  # unfinished: not in the frame
    (tmp_path / "badcfg").mkdir()
    (tmp_path / "badcfg" / "summary.json").write_text(json.dumps(_summary(algo="lamb", test_acc=10.0)))
    (tmp_path / "badcfg" / "config.json").write_text("{broken")

    df = lb.runs_frame(str(tmp_path))
    assert len(df) == 6
    assert "cfg.lr" in df.columns and "versions" not in df.columns
    numeric, display = lb.leaderboard(df, metrics=("test_acc",))
    assert len(numeric) == 3
    by_lr = {(r["algo"], r.get("lr")): r for _, r in numeric.iterrows()}
    a = by_lr[("dsgd", 0.1)]
    assert a["seeds"] == 3 and a["test_acc_mean"] == pytest.approx(72.0) and a["test_acc_std"] == pytest.approx(2.0)
    b = by_lr[("dsgd", 1.0)]
    assert b["seeds"] == 2 and b["test_acc_mean"] == pytest.approx(62.0)
    assert "seed" not in numeric.columns and "results" not in numeric.columns and "device" not in numeric.columns
    assert "lr" in display.columns


def test_runs_differing_in_steps_are_not_merged(tmp_path):
    _file_run(tmp_path, "short", 60.0, steps=5)
    _file_run(tmp_path, "long", 99.0, steps=500)
    df = lb.runs_frame(str(tmp_path))
    assert df["config_id"].nunique() == 2
    numeric, _ = lb.leaderboard(df, metrics=("test_acc",))
    assert len(numeric) == 2 and set(numeric["seeds"]) == {1}


def test_runs_frame_warns_on_corrupt(tmp_path):
    _file_run(tmp_path, "good", 50.0)
    _write_run(tmp_path, "bad", raw="garbage")
    warnings: list[str] = []
    df = lb.runs_frame(str(tmp_path), warn=warnings.append)
    assert len(df) == 1 and len(warnings) == 1 and str(tmp_path / "bad" / "summary.json") in warnings[0]
