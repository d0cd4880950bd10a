"""Test helpers shared by several test files (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import torch

from algorithms.base import own
from bench.spec import BuildContext


def component(cfg, kind: str, layout=None, n_local: int = 1, device="cpu", total_steps: int = 100,
              epoch_len: int = 10, dtype=torch.float32, topology=None):
    """Build the `kind` component (grad, opt, comm) of cfg alone, as the runner would."""
    r = cfg.hyper()
    a = next(a for a in r.active if a.kind == kind)
    ctx = BuildContext(layout=layout, n_local=n_local, n=n_local, device=torch.device(device), dtype=dtype,
                       total_steps=total_steps, epoch_len=epoch_len, warmup=cfg.warmup,
                       lr_at=lambda t: cfg.lr, seed=cfg.seed, topology=topology)
    hp = own(a, r.values)
    for p in a.cls.params:  # a component-valued parameter: its component, built with its own values
        if p.registry is not None:
            sub = next(b for b in r.active if b.kind == f"{a.name}.{p.name}")
            setattr(hp, p.name, sub.cls(own(sub, r.values), ctx))
    return a.cls(hp, ctx)


# ----------------------------------------------------------------------------------------------
# CLI results (typer's CliRunner)


def stderr_of(res) -> str:
    try:
        return res.stderr
    except ValueError:  # click < 8.2 without mix_stderr: stderr is mixed into output
        return res.output


def assert_user_error(res, *needles, redact: dict | None = None) -> str:
    """Exit 2, no traceback, exactly one line on stderr starting with 'error:', containing the needles.

    A needle may be a tuple of alternatives. redact: {path: placeholder} replaced in the line before the
    needles are looked for (the test's own temporary paths must not supply a needle such as 'folder')."""
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"unexpected exception {res.exception!r}\n{res.output}\n{getattr(res, 'where', '')}")
    assert res.exit_code == 2, f"exit {res.exit_code}\n{res.output}"
    assert "Traceback" not in res.output
    err = stderr_of(res).strip()
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("error:"), line
    for path, placeholder in (redact or {}).items():
        line = line.replace(path, placeholder)
    for n in needles:
        alts = n if isinstance(n, tuple) else (n,)
        assert any(a.lower() in line.lower() for a in alts), f"{n!r} not in {line!r}"
    return line


# ----------------------------------------------------------------------------------------------
# files in the CIFAR on-disk format


class Py2Pickler(pickle._Pickler):
    """Writes `bytes` as Python 2 `str` (BINSTRING), so the file reads like the CIFAR originals:
    keys are b"data" with encoding="bytes" and "data" with encoding="latin1"."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def snapshot(root) -> dict:
    """Every file and folder under root: (size, mtime_ns, sha1) of files, None for folders; equal
    snapshots before and after a command mean it changed nothing there."""
    snap = {}
    for f in sorted(Path(root).rglob("*")):
        if f.is_file():
            st = f.stat()
            snap[str(f.relative_to(root))] = (st.st_size, st.st_mtime_ns, hashlib.sha1(f.read_bytes()).hexdigest())
        else:
            snap[str(f.relative_to(root))] = None
    return snap
