"""Results on disk: one directory per run.

    <results>/<run_id>/config.json    the fully resolved RunConfig
    <results>/<run_id>/metrics.csv    one row per evaluation
    <results>/<run_id>/summary.json   final metrics, costs, status, versions
    <results>/<run_id>/model.pt       the final averaged model's state_dict

Every file is written to a temporary name and renamed, so a crash never leaves
half a file. summary.json is written last: its presence with status
"completed" or "diverged" marks a finished run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.errors import UserError

FINISHED = ("completed", "diverged")


def atomic_write(path: Path, data: bytes | str) -> None:
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (tuple, set)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    if rows:
        keys = list(rows[0])
        for r in rows[1:]:
            keys += [k for k in r if k not in keys]
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    atomic_write(path, buf.getvalue())


def save_model(path: Path, state_dict: dict) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    atomic_write(path, buf.getvalue())


def prepare_results_dir(root: str) -> Path:
    """Create the results folder (or fail with one line if it cannot be written)."""
    p = Path(root)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=p, prefix=".probe", delete=True)
        probe.close()
    except OSError as e:
        raise UserError(f"results folder {root!r} is not writable ({e.strerror}); pass --results DIR") from None
    return p


def read_summary(run_dir: Path) -> dict | None:
    """The run's summary, or None if there is none yet. Raises ValueError if it is corrupt."""
    f = Path(run_dir) / "summary.json"
    if not f.exists():
        return None
    try:
        s = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(s, dict) or "status" not in s or "algo" not in s:
        raise ValueError(f"{f}: not a dsgdbench summary (no status/algo)")
    return s


def is_finished(run_dir: Path) -> bool:
    try:
        s = read_summary(run_dir)
    except ValueError:
        return False
    return s is not None and s.get("status") in FINISHED


def load_runs(root: str, warn=None) -> list[dict]:
    """Every run summary under root (recursively). Corrupt ones are skipped with a warning."""
    p = Path(root)
    if not p.is_dir():
        raise UserError(f"results folder {root!r} does not exist; run `dsgdbench run` first or pass the folder")
    runs = []
    for f in sorted(p.rglob("summary.json")):
        try:
            s = read_summary(f.parent)
        except ValueError as e:
            if warn:
                warn(f"skipped: {e}")
            continue
        if s is not None:
            s["run_dir"] = str(f.parent)
            runs.append(s)
    return runs


def load_metrics(run_dir: str):
    import pandas as pd

    return pd.read_csv(Path(run_dir) / "metrics.csv")


def versions() -> dict:
    import bench

    rev = None
    try:
        here = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            rev = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"torch": torch.__version__, "dsgdbench": bench.__version__, "git": rev,
            "python": ".".join(map(str, __import__("sys").version_info[:3]))}
