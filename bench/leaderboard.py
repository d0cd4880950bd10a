"""From run summaries to leaderboard tables: group over seeds, mean ± std, export.

Runs are grouped by their configuration without the seed (config_id), or by the
keys given with --by. Diverged runs are counted and shown ("1/3 diverged"); they
never enter a mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from bench import results
from bench.errors import UserError

# (column key in the runs table, header, format of the value)
METRICS = {
    "test_acc": ("test acc (%)", "{:.2f}"),
    "test_loss": ("test loss", "{:.3f}"),
    "train_loss": ("train loss", "{:.3f}"),
    "consensus_distance": ("consensus dist.", "{:.2e}"),
    "top_eig": ("top-1 eigenvalue", "{:.2f}"),
    "hessian_trace": ("Hessian trace", "{:.1f}"),
    "train_seconds": ("train s", "{:.1f}"),
}
DEFAULT_METRICS = ("test_acc", "test_loss", "top_eig", "consensus_distance", "train_seconds")
LABEL_KEYS = ("algo", "topology", "workers", "total_batch")
FORMATS = ("table", "csv", "md")


def runs_frame(root: str, warn=None) -> pd.DataFrame:
    """One row per finished run: its summary, plus the configuration fields as cfg.<key>."""
    rows = []
    for s in results.load_runs(root, warn):
        if s.get("status") not in results.FINISHED:
            continue
        cfg_file = Path(s["run_dir"]) / "config.json"
        try:
            cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            cfg = {}
        row = {k: v for k, v in s.items() if not isinstance(v, (dict, list))}
        row.update({f"cfg.{k}": json.dumps(v) if isinstance(v, list) else v for k, v in cfg.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def group_keys(df: pd.DataFrame, by: list[str] | None) -> list[str]:
    """Columns that identify a group: --by, or the usual labels plus any config field that varies."""
    if by:
        missing = [k for k in by if k not in df.columns and f"cfg.{k}" not in df.columns]
        if missing:
            valid = sorted(c for c in df.columns if not c.startswith("cfg.")) + sorted(
                c[4:] for c in df.columns if c.startswith("cfg."))
            raise UserError(f"--by: unknown column {missing[0]!r}; valid: {', '.join(dict.fromkeys(valid))}")
        return [k if k in df.columns else f"cfg.{k}" for k in by]
    keys = [k for k in LABEL_KEYS if k in df.columns]
    skip = {"cfg.seed", "cfg.results", "cfg.data_dir", "cfg.download", "cfg.device", "cfg.executor",
            "cfg.backend", "cfg.procs", "cfg.dist_timeout",
            "cfg.epochs"}  # the resolved cfg.steps is what counts; epochs may be an unused default
    for c in df.columns:
        if c.startswith("cfg.") and c not in skip and c[4:] not in keys:
            # Only a field that splits a group formed so far (csgd's comm=allreduce follows from algo).
            if df.astype({c: str}).groupby(keys, dropna=False)[c].nunique().max() > 1:
                keys.append(c)
    return keys


def _mean_std(values: pd.Series, fmt: str) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return "—"
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))}"


def leaderboard(df: pd.DataFrame, by: list[str] | None = None, metrics=DEFAULT_METRICS):
    """Two frames: `numeric` (mean, std, n per metric; for CSV) and `display` (mean ± std strings)."""
    if df.empty:
        raise UserError("no finished runs found; run `dsgdbench run` first")
    keys = group_keys(df, by)
    metrics = [m for m in metrics if m in df.columns and pd.to_numeric(df[m], errors="coerce").notna().any()]
    numeric_rows, display_rows = [], []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        labels = {k.removeprefix("cfg."): v for k, v in zip(keys, key)}
        ok = g[g["status"] == "completed"]
        n_div = int((g["status"] == "diverged").sum())
        num = {**labels, "seeds": len(g), "diverged": n_div}
        disp = {**labels, "seeds": str(len(g))}
        for m in metrics:
            v = pd.to_numeric(ok[m], errors="coerce").dropna()
            num[f"{m}_mean"] = v.mean() if len(v) else np.nan
            num[f"{m}_std"] = v.std(ddof=1) if len(v) > 1 else np.nan
            disp[METRICS[m][0]] = _mean_std(v, METRICS[m][1])
        if "grad_evals_per_step" in g:
            ge = pd.to_numeric(g["grad_evals_per_step"], errors="coerce").max()
            num["computation"] = ge
            disp["computation"] = f"{ge:g}x"
        if "bytes_per_step" in g:
            b = pd.to_numeric(g["bytes_per_step"], errors="coerce").mean()
            num["bytes_per_step"] = b
            disp["bytes/step"] = _human_bytes(b)
        disp["status"] = "ok" if n_div == 0 else f"{n_div}/{len(g)} diverged"
        numeric_rows.append(num)
        display_rows.append(disp)
    numeric = pd.DataFrame(numeric_rows)
    display = pd.DataFrame(display_rows)
    if "test_acc_mean" in numeric:
        order = numeric["test_acc_mean"].fillna(-1).sort_values(ascending=False, kind="stable").index
        numeric, display = numeric.loc[order].reset_index(drop=True), display.loc[order].reset_index(drop=True)
    return numeric, display


def _human_bytes(b: float) -> str:
    if not np.isfinite(b):
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(b) < 1000 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} GB"


def render(numeric: pd.DataFrame, display: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return numeric.to_csv(index=False)
    if fmt == "md":
        return display.to_markdown(index=False) + "\n"
    raise ValueError(fmt)


def format_from_path(path: str) -> str:
    ext = Path(path).suffix.lower()
    table = {".csv": "csv", ".md": "md", ".markdown": "md"}
    if ext not in table:
        raise UserError(f"--out {path!r}: unknown extension {ext or '(none)'}; use .csv or .md")
    return table[ext]
