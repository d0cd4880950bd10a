"""Results on disk: one directory per run.

    <results>/<run_id>/config.json    the fully resolved RunConfig
    <results>/<run_id>/metrics.csv    one row per evaluation
    <results>/<run_id>/summary.json   final metrics, costs, status, versions
    <results>/<run_id>/model.pt       the final averaged model's state_dict
    <results>/<run_id>/checkpoint.r<rank>[.prev].pt   while training (see bench/runner.py)
    <results>/.locks/<run_id>.lock    held (flock) by the process training the run
    <results>/.<run_id>.rerun/        where --force retrains a finished run before it replaces it

Every file is written to a temporary name and renamed, so a crash never leaves
half a file. summary.json is written before the optional model file: its presence
with a finished status (completed, diverged, collapsed) marks a finished run.
Checkpoints are read with torch.load(weights_only=True): tensors and plain values,
never code.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.errors import UserError

FINISHED = ("completed", "diverged", "collapsed")
FAILED = ("diverged", "collapsed")  # results, never averaged in


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


def save_torch(path: Path, obj) -> None:
    """Any nest of dicts, lists, plain values and tensors (moved to the CPU), written atomically."""
    buf = io.BytesIO()
    torch.save(_to_cpu(obj), buf)
    atomic_write(path, buf.getvalue())


def load_torch(path: Path):
    """The counterpart of save_torch: tensors and plain values only (weights_only: no code runs)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class RunLock:
    """One trainer per run folder: an exclusive flock on <results>/.locks/<run_id>.lock.

    The kernel drops the lock when the process dies (kill -9 included), so a stale lock is
    never left behind. acquire(wait=False) returns False when another process holds it.
    The lock file records the holder's pid and start time, for the message of the waiter.
    """

    def __init__(self, root: Path, run_id: str):
        self.path = Path(root) / ".locks" / f"{run_id}.lock"
        self.fd = None

    def acquire(self, wait: bool = True) -> bool:
        import fcntl

        self.path.parent.mkdir(exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            try:  # the holder may have removed the file while we waited: lock the file that is there now
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {time.time():.0f}\n".encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        try:
            pid, since = self.path.read_text().split()
            return f"process {pid} (since {time.strftime('%H:%M:%S', time.localtime(float(since)))})"
        except (OSError, ValueError):
            return "another process"

    def release(self, remove: bool = False) -> None:
        """Unlock; remove=True also deletes the lock file (a waiter then finds the run finished)."""
        if self.fd is not None:
            import fcntl

            if remove:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def check_free_space(folder: Path, need: int, what: str) -> None:
    """A one-line UserError before training when the folder's disk cannot hold `need` bytes."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need:
        raise UserError(f"{what}: {folder} has {free / 1e6:.1f} MB free, the run needs about {need / 1e6:.1f} MB "
                        f"(checkpoints and the model); free space or pass --results DIR on another disk")


def replace_dir(new: Path, old: Path) -> None:
    """Put the finished folder `new` where `old` is (old removed): a reader sees one or the other."""
    trash = old.with_name(f".{old.name}.old")
    if trash.exists():
        shutil.rmtree(trash)
    if old.exists():
        os.rename(old, trash)
    os.rename(new, old)
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)


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
    if not f.is_file():
        raise ValueError(f"{f}: not a file")
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
    """Every run summary under root (recursively). Corrupt ones are skipped with a warning.

    Run folders without a finished summary are not read: unfinished() lists them.
    """
    p = Path(root)
    if not p.is_dir():
        raise UserError(f"results folder {root!r} does not exist; run `dsgdbench run` first or pass the folder")
    runs = []
    for f in sorted(p.rglob("summary.json")):
        if any(part.startswith(".") for part in f.relative_to(p).parts[:-1]):
            continue  # .<run_id>.rerun, .locks: work in progress
        try:
            s = read_summary(f.parent)
        except (ValueError, OSError) as e:
            if warn:
                warn(f"skipped: {e}")
            continue
        if s is not None:
            s["run_dir"] = str(f.parent)
            runs.append(s)
    return runs


def unfinished(root: str) -> list[Path]:
    """Run folders under root with a config.json and no finished summary (killed, or still training)."""
    out = []
    for f in sorted(Path(root).rglob("config.json")):
        d = f.parent
        if not any(part.startswith(".") for part in d.relative_to(root).parts) and not is_finished(d):
            out.append(d)
    return out


def load_metrics(run_dir: str):
    import pandas as pd

    return pd.read_csv(Path(run_dir) / "metrics.csv")


def versions() -> dict:
    """torch, dsgdbench, git revision and python of the code this process runs.

    Read once, on the first call (the CLI makes it at start-up, before any run): a suite that
    runs for hours records the code it loaded, not commits made in the meantime.
    """
    global _VERSIONS
    if _VERSIONS is None:
        _VERSIONS = _read_versions()
    return dict(_VERSIONS)


_VERSIONS = None


def _read_versions() -> dict:
    import bench

    rev = None
    try:
        here = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            rev = out.stdout.strip()
            code = ["bench", "algorithms", "topologies", "dsgdbench.py"]  # uncommitted changes to the code
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--",
                                    *code], capture_output=True, text=True, timeout=5)
            if dirty.returncode == 0 and dirty.stdout.strip():
                rev += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"torch": torch.__version__, "dsgdbench": bench.__version__, "git": rev,
            "python": ".".join(map(str, __import__("sys").version_info[:3]))}
