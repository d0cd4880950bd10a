"""From run summaries to leaderboard tables: group over seeds, summarise, compare, export.

Groups
    Runs are grouped by their configuration without the seed: the usual labels
    (algo, topology, workers, total batch) plus every config field that splits
    them, or exactly the keys given with --by.

Statistics over seeds (every metric, every group)
    Over the n completed seeds of a group: the mean, the sample standard
    deviation (ddof=1) and the half-width of the 95% confidence interval of the
    mean from Student's t distribution,

        ci95 = t_{0.975, n-1} * std / sqrt(n)        (t = 12.706, 4.303, 2.776 for n = 2, 3, 4)

    The interval is mean ± ci95. With one seed there is no spread: std and ci95
    are NaN and the table shows the value alone. Diverged runs are counted and
    shown ("1/3 diverged"); they never enter a mean.

Paired differences against a baseline (--baseline ALGO)
    A worker's batch at step t depends only on (seed, worker, t), so two runs with
    the same seed saw the same data in the same order. For a group and its
    baseline group, d_s = metric(group, seed s) - metric(baseline, seed s) over
    the k seeds both completed; the table shows mean(d) ± t_{0.975, k-1} std(d) /
    sqrt(k) and k, with "*" when that interval excludes 0. Pairing removes the
    seed-to-seed noise the two runs share, so it detects smaller differences than
    two independent intervals would.
    The baseline group of a row is the ALGO group with the same workload: equal
    on every group key except those that follow from the algorithm
    (is_algorithm_key: RunConfig's fields of the algorithm role, such as the
    algorithm, its topology, components and lr, and every component parameter). If several ALGO groups fit (an lr grid, say),
    the match is refined on the keys they differ on (the same lr as the row);
    if that does not leave exactly one, it is an error.

Tuning (--tune KEY)
    Within each set of runs equal on everything but KEY and the seed, the value
    of KEY with the best validation accuracy (val_acc, from runs made with
    --val-fraction) is kept and the others dropped; the table then reports the
    test metrics of the winners. Divergence counts as failure: values are
    ranked first by the fraction of their seeds that diverged (fewer is better,
    so a value with a diverged seed ranks below every value whose seeds all
    completed), then by the mean val_acc of their completed seeds. A tie goes
    to the smaller value. The test set never takes part in the choice.

Time to accuracy (--target-acc X)
    For each completed run, the first evaluation in its metrics.csv with
    test_acc >= X gives the step and the training seconds (evaluation time
    excluded). The mean is over the seeds that reached X; "k/n reached" says
    how many of the group's n runs did (a diverged run never counts as having
    reached it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from bench import results
from bench.config import ALGORITHM, EXECUTION, RunConfig
from bench.errors import UserError
from bench.registry import unknown_name

# Metrics summarised over seeds: column in the runs table -> (header, format of a value).
METRICS = {
    "test_acc": ("test acc (%)", "{:.2f}"),
    "test_loss": ("test loss", "{:.3f}"),
    "train_acc": ("train acc (%)", "{:.2f}"),
    "train_loss": ("train loss", "{:.3f}"),
    "val_acc": ("val acc (%)", "{:.2f}"),
    "val_loss": ("val loss", "{:.3f}"),
    "consensus_distance": ("consensus dist.", "{:.2e}"),
    "top_eig": ("top-1 eigenvalue", "{:.2f}"),
    "hessian_trace": ("Hessian trace", "{:.1f}"),
    "train_seconds": ("train time (s)", "{:.1f}"),
}
# Costs of one step, the same for every seed: name -> (column in the runs table, header).
COSTS = {
    "computation": ("grad_evals_per_step", "computation"),
    "bytes_per_step": ("bytes_per_step", "bytes/step"),
}
COLUMNS = (*METRICS, *COSTS)
# As in the DSGD-AC paper: accuracy, loss, sharpness, computation, plus communication and time.
DEFAULT_COLUMNS = ("test_acc", "test_loss", "top_eig", "computation", "bytes_per_step", "train_seconds")
# Metrics that get paired differences with --baseline (the display shows the first).
PAIRED = ("test_acc", "test_loss", "top_eig")
LABEL_KEYS = ("algo", "topology", "workers", "total_batch")
FORMATS = ("table", "csv", "md", "tex")
EXTENSIONS = {".csv": "csv", ".md": "md", ".markdown": "md", ".tex": "tex"}

# Config fields that never split a group: the seed, where and how a run was executed (the
# execution role of RunConfig), epochs (the resolved steps is what counts) and bookkeeping.
GROUP_SKIP = tuple(f.name for f in RunConfig.core(EXECUTION)) + ("seed", "epochs", "format", "resolved")


def is_algorithm_key(key: str) -> bool:
    """Group keys that follow from the algorithm rather than the workload: not matched when looking
    for a row's baseline group (csgd's topology is "allreduce", its lr its own). They are the core
    fields of the algorithm role and every component parameter (full names: "sam.rho")."""
    key = key.removeprefix("cfg.")
    return key in ALGORITHM_FIELDS or "." in key


ALGORITHM_FIELDS = frozenset(f.name for f in RunConfig.core(ALGORITHM))

CANDIDATES = "tune.candidates"  # column added by tune_runs: how many values of the tuned key(s) competed
SIGNIFICANT = "*"


class Stats(NamedTuple):
    """Mean, sample std, 95% CI half-width and count of the finite values."""

    mean: float
    std: float
    ci95: float
    n: int


NO_VALUES = Stats(math.nan, math.nan, math.nan, 0)


def t_quantile(dof: int) -> float:
    """t_{0.975, dof}: the two-sided 95% quantile of Student's t distribution."""
    return float(stats.t.ppf(0.975, dof))


def summarize(values) -> Stats:
    v = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return NO_VALUES
    if n == 1:
        return Stats(float(v[0]), math.nan, math.nan, 1)
    std = float(v.std(ddof=1))
    return Stats(float(v.mean()), std, t_quantile(n - 1) * std / math.sqrt(n), n)


def excludes_zero(s: Stats) -> bool:
    """Whether the 95% interval mean ± ci95 lies on one side of 0 (needs two pairs or more)."""
    return s.n >= 2 and abs(s.mean) > s.ci95


# ----------------------------------------------------------------------------------------------
# the runs table


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
        if not isinstance(cfg, dict):  # valid JSON, but not a configuration
            cfg = {}
        row = {k: v for k, v in s.items() if not isinstance(v, (dict, list))}
        row.update({f"cfg.{k}": json.dumps(v) if isinstance(v, list) else v for k, v in flat_config(cfg).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def flat_config(cfg: dict) -> dict:
    """A config.json as one level: core fields, component parameters by full name ("sam.rho"), and
    "file:<what>" content hashes. A config.json of the first layout (every hyperparameter a
    top-level field, no "format") is mapped to full names through the run's components; the
    parameters of components it did not use are dropped."""
    from algorithms.base import all_components

    out = {k: v for k, v in cfg.items() if not isinstance(v, dict) and k not in ("format", "resolved")}
    if "format" in cfg:
        out.update(cfg.get("params") or {})
        out.update({f"file:{k}": v for k, v in (cfg.get("files") or {}).items()})
        return out
    core = RunConfig.core_names()
    used = {c.name: c for c in all_components() if c.name in (cfg.get("grad"), cfg.get("opt"), cfg.get("comm"))}
    for k in [k for k in out if k not in core]:
        v = out.pop(k)
        for c in used.values():
            if any(p.name == k for p in c.params):
                out[f"{c.name}.{k}"] = v
    return out


def check_duplicate_seeds(g: pd.DataFrame, where: str) -> None:
    """A group may hold each seed once: two runs of one configuration and seed would count it twice."""
    if "seed" not in g or "run_dir" not in g:
        return
    dup = g[g["seed"].duplicated(keep=False)].sort_values("run_dir")
    if len(dup):
        a, b = dup["run_dir"].iloc[0], dup["run_dir"].iloc[1]
        raise UserError(f"seed {dup['seed'].iloc[0]} appears twice in the group {where}: {a} and {b} (the same "
                        f"configuration run twice, or runs that differ only in how they ran); remove one, or "
                        f"split the groups with --by")


def _config_fields(df: pd.DataFrame) -> list[str]:
    return [c[4:] for c in df.columns if c.startswith("cfg.") and c[4:] not in GROUP_SKIP]


def group_keys(df: pd.DataFrame, by: list[str] | None, exclude=()) -> list[str]:
    """Columns that identify a group: --by, or the usual labels plus any config field that varies.

    Columns in `exclude` (the tuned keys) are never added automatically.
    """
    if by:
        missing = [k for k in by if k not in df.columns and f"cfg.{k}" not in df.columns]
        if missing:
            valid = sorted(c for c in df.columns if not c.startswith("cfg.")) + sorted(
                c[4:] for c in df.columns if c.startswith("cfg."))
            raise UserError(f"--by: unknown column {missing[0]!r}; valid: {', '.join(dict.fromkeys(valid))}")
        return [k if k in df.columns else f"cfg.{k}" for k in by]
    keys = [k for k in LABEL_KEYS if k in df.columns]
    for c in df.columns:
        if c.startswith("cfg.") and c[4:] not in GROUP_SKIP and c[4:] not in keys and c not in exclude:
            # Only a field that splits a group formed so far (csgd's comm=allreduce follows from algo).
            if df.astype({c: str}).groupby(keys, dropna=False)[c].nunique().max() > 1:
                keys.append(c)
    return keys


def _key_column(df: pd.DataFrame, key: str, flag: str) -> str:
    """The runs-table column of a config field: cfg.<key>, or the summary's own column."""
    if key in GROUP_SKIP:
        raise UserError(f"{flag} {key!r}: not a setting that can be tuned")
    if f"cfg.{key}" in df.columns:
        return f"cfg.{key}"
    if key in df.columns and key not in METRICS:
        return key
    short = [c for c in df.columns if c.startswith("cfg.") and "." in c[4:] and c.rpartition(".")[2] == key]
    if short:  # a component parameter by its short name: the value of whichever component a run has
        df[f"cfg.{key}"] = df[short].bfill(axis=1).iloc[:, 0]
        return f"cfg.{key}"
    raise UserError(unknown_name(f"{flag} key", key, _config_fields(df) or sorted(df.columns)))


def _with_components(df: pd.DataFrame, cols: list[str]) -> list[str]:
    """cols plus the component-parameter columns a short-name column stands for (cfg.rho: cfg.sam.rho)."""
    short = {c[4:] for c in cols if c.startswith("cfg.") and "." not in c[4:]}
    return list(cols) + [c for c in df.columns if c.startswith("cfg.") and "." in c[4:]
                         and c.rpartition(".")[2] in short]


def _isna(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _same(a, b) -> bool:
    return (_isna(a) and _isna(b)) or (not _isna(a) and not _isna(b) and a == b)


def _value(v) -> str:
    if _isna(v):
        return "—"
    if isinstance(v, (float, np.floating)):
        return f"{v:g}"
    return str(v)


# ----------------------------------------------------------------------------------------------
# tuning on the validation split


def tune_runs(df: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep, per configuration, the runs of the value(s) of `keys` with the best validation accuracy.

    A configuration is a set of runs equal on every config field except the tuned
    keys and the seed. Returns (selected, choices): the rows of df that won (with
    the column tune.candidates, the number of values compared), and one row per
    configuration with the winning value(s), candidates, seeds, diverged and the
    winner's val_acc mean. The ranking rule is in the module docstring.
    """
    if df.empty:
        raise UserError("no finished runs found; run `dsgdbench run` first")
    keys = list(dict.fromkeys(keys))
    if not keys:
        raise UserError("--tune: give a config key, e.g. --tune lr")
    cols = [_key_column(df, k, "--tune") for k in keys]
    if "val_acc" not in df.columns or pd.to_numeric(df["val_acc"], errors="coerce").isna().all():
        raise UserError("--tune picks on validation accuracy, and these runs have none: "
                        "run them with --val-fraction 0.1 (the test set is never used to choose)")
    for k, c in zip(keys, cols):
        if df[c].astype(str).nunique() < 2:
            raise UserError(f"--tune {k}: every run has {k} = {_value(df[c].iloc[0])}; nothing to choose from")

    if any(c.startswith("cfg.") for c in df.columns):
        tuned = _with_components(df, cols)
        context = [c for c in df.columns if c.startswith("cfg.") and c[4:] not in GROUP_SKIP and c not in tuned]
    else:
        context = [k for k in ("algo", "topology", "workers", "dataset", "model", "batch", "total_batch", "steps",
                               "grad", "opt", "comm", "lr") if k in df.columns and k not in cols]
    key_str = df[context + cols].astype(str)  # text, so that missing values group like any other
    key_str["_all"] = ""  # a configuration column that always exists
    val = pd.to_numeric(df["val_acc"], errors="coerce")
    diverged = df["status"] == "diverged"
    varying = [c for c in context if key_str[c].nunique() > 1 or c in ("cfg.algo", "algo")]

    keep: dict = {}  # winning row index -> number of values it was chosen from
    choices = []
    for _, g in key_str.groupby(["_all", *context], sort=False, dropna=False):
        ranking = []
        for _, v in g.groupby(cols, sort=False, dropna=False):
            completed = v.index[~diverged[v.index]]
            ranking.append(_Candidate(rows=v.index, diverged=float(diverged[v.index].mean()),
                                      val_acc=float(val[completed].mean()), completed=len(completed),
                                      order=_sort_key(df.loc[v.index[0], cols])))
        if any(r.completed for r in ranking) and all(math.isnan(r.val_acc) for r in ranking):
            first = df.loc[g.index[0]]
            where = ", ".join(f"{c.removeprefix('cfg.')}={_value(first[c])}" for c in varying)
            raise UserError(f"--tune: the runs with {where} have no val_acc; rerun them with --val-fraction 0.1")
        ranking.sort(key=_Candidate.rank)
        best = ranking[0].rows
        keep.update({i: len(ranking) for i in best})
        first = df.loc[best[0]]
        v_best = summarize(val[best[~diverged[best]]])
        choices.append({**{c.removeprefix("cfg."): first[c] for c in varying},
                        **{k: first[c] for k, c in zip(keys, cols)},
                        "candidates": len(ranking), "seeds": len(best), "diverged": int(diverged[best].sum()),
                        "val_acc_mean": v_best.mean, "val_acc_std": v_best.std})
    selected = df.loc[sorted(keep)].copy()
    selected[CANDIDATES] = pd.Series(keep)
    return selected, pd.DataFrame(choices)


class _Candidate(NamedTuple):
    """One value of the tuned key(s) within a configuration."""

    rows: pd.Index  # its runs, every seed
    diverged: float  # fraction of its seeds that diverged
    val_acc: float  # mean val_acc of its completed seeds (NaN if none)
    completed: int
    order: tuple  # the value itself, for ties

    def rank(self) -> tuple:
        """Smaller is better: fewer diverged seeds first, then higher val_acc, then the smaller value."""
        return self.diverged, (math.inf if math.isnan(self.val_acc) else -self.val_acc), self.order


def _sort_key(values: pd.Series) -> tuple:
    """Order of candidate values for ties: numbers ascending, then text."""
    out = []
    for v in values:
        try:
            out.append((0, float(v), ""))
        except (TypeError, ValueError):
            out.append((1, 0.0, str(v)))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# baseline matching and time to accuracy


def match_baselines(groups: list[dict], keys: list[str], algo: str) -> list[int | None]:
    """The index of each group's baseline group (see the module docstring).

    groups: the key values of each group. A group of `algo` is its own baseline;
    None where no `algo` group ran the same workload.
    """
    if "algo" not in keys:
        raise UserError("--baseline compares algorithms: add algo to --by")
    workload = [k for k in keys if not is_algorithm_key(k)]
    other = [k for k in keys if k not in workload and k != "algo"]
    base = [j for j, g in enumerate(groups) if g["algo"] == algo]
    out: list[int | None] = []
    for i, g in enumerate(groups):
        if g["algo"] == algo:
            out.append(i)
            continue
        cands = [j for j in base if all(_same(groups[j][k], g[k]) for k in workload)]
        if len(cands) > 1:
            differ = [k for k in other if len({_value(groups[j][k]) for j in cands}) > 1]
            refined = [j for j in cands if all(_same(groups[j][k], g[k]) for k in differ)]
            if len(refined) != 1:
                names = [k.removeprefix("cfg.") for k in differ]
                spread = "; ".join(f"{n} = {', '.join(sorted({_value(groups[j][k]) for j in cands}))}"
                                   for n, k in zip(names, differ))
                row = ", ".join([g["algo"]] + [f"{n}={_value(g[k])}" for n, k in zip(names, differ)])
                raise UserError(f"--baseline {algo}: {len(cands)} {algo} groups fit the row {row} ({spread}); "
                                f"keep one per setting with --tune {names[0] if names else 'lr'} "
                                f"or group with --by")
            cands = refined
        out.append(cands[0] if cands else None)
    return out


def paired_differences(runs: pd.DataFrame, base: pd.DataFrame, metric: str) -> Stats:
    """Statistics of metric(run) - metric(baseline run) over the seeds both completed."""
    a, b = _by_seed(runs, metric), _by_seed(base, metric)
    shared = a.index.intersection(b.index)
    return summarize(a[shared] - b[shared])


def _by_seed(g: pd.DataFrame, metric: str) -> pd.Series:
    ok = g[g["status"] == "completed"]
    dup = ok["seed"][ok["seed"].duplicated()]
    if len(dup):
        raise UserError(f"--baseline pairs runs by seed, but seed {dup.iloc[0]} appears twice in the group of "
                        f"{ok['algo'].iloc[0]}: group finer with --by")
    v = pd.to_numeric(ok[metric], errors="coerce") if metric in ok else pd.Series(np.nan, index=ok.index)
    return pd.Series(v.to_numpy(dtype=float), index=ok["seed"].to_numpy()).dropna()


def time_to_target(df: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per run (index of df): target_step and target_seconds, NaN where it never reached `target` % test acc."""
    rows = []
    for _, r in df.iterrows():
        step = seconds = math.nan
        run_dir = r.get("run_dir")
        if r.get("status") == "completed" and isinstance(run_dir, str):
            try:
                m = results.load_metrics(run_dir)
            except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
                m = pd.DataFrame()
            if {"step", "test_acc"} <= set(m.columns):
                m = m.sort_values("step", kind="stable")
                hit = m[pd.to_numeric(m["test_acc"], errors="coerce") >= target]
                if len(hit):
                    step = float(hit["step"].iloc[0])
                    if "train_seconds" in m.columns:
                        seconds = float(hit["train_seconds"].iloc[0])
        rows.append({"target_step": step, "target_seconds": seconds})
    return pd.DataFrame(rows, index=df.index, columns=["target_step", "target_seconds"])


# ----------------------------------------------------------------------------------------------
# the leaderboard


def leaderboard(df: pd.DataFrame, by: list[str] | None = None, metrics=DEFAULT_COLUMNS, baseline: str | None = None,
                target_acc: float | None = None, tuned: list[str] | None = None):
    """Two frames: `numeric` (for CSV) and `display` (strings, for the tables).

    numeric has, per group, the key values, seeds, diverged and for every metric
    <m>_mean, _std, _ci95, _n; with a baseline delta_<m>_mean, _std, _ci95, _n;
    with a target target_reached, target_steps_mean, target_seconds_mean. Rows are
    sorted by mean test accuracy, best first. display.attrs holds "labels" (the key
    columns) and "notes" (lines to print under the table).
    """
    if df.empty:
        raise UserError("no finished runs found; run `dsgdbench run` first")
    if baseline is not None and baseline not in set(df["algo"]):
        raise UserError(f"--baseline {baseline!r}: no such algo among the runs; "
                        f"present: {', '.join(sorted(set(df['algo'].astype(str))))}")
    if target_acc is not None and not 0 < target_acc <= 100:
        raise UserError(f"--target-acc {target_acc:g}: give a test accuracy in percent, in (0, 100]")
    tuned = list(tuned or [])
    tuned_cols = [_key_column(df, k, "--tune") for k in tuned]
    keys = group_keys(df, by, exclude=_with_components(df, tuned_cols))
    shown = [c for c in metrics if _available(df, c)]
    groups = [(dict(zip(keys, key if isinstance(key, tuple) else (key,))), g)
              for key, g in df.groupby(keys, sort=False, dropna=False)]
    base_of = match_baselines([k for k, _ in groups], keys, baseline) if baseline else None
    reach = time_to_target(df, target_acc) if target_acc is not None else None

    numeric_rows, display_rows = [], []
    for i, (key, g) in enumerate(groups):
        labels = {k.removeprefix("cfg."): v for k, v in key.items()}
        check_duplicate_seeds(g, ", ".join(f"{k}={_value(v)}" for k, v in labels.items()))
        ok = g[g["status"] == "completed"]
        n_div = int((g["status"] == "diverged").sum())
        num = {**labels}
        disp = {**labels}
        for k, c in zip(tuned, tuned_cols):
            values = list(dict.fromkeys(_value(v) for v in g[c]))
            of = list(dict.fromkeys(str(int(v)) for v in g[CANDIDATES].dropna())) if CANDIDATES in g else []
            num[f"tuned_{k}"] = g[c].iloc[0] if len(values) == 1 else "/".join(values)
            num[f"tuned_{k}_of"] = int(g[CANDIDATES].max()) if of else np.nan
            disp[f"{k} (tuned)"] = "/".join(values) + (f" (of {'/'.join(of)})" if of else "")
        num.update(seeds=len(g), diverged=n_div)
        disp["seeds"] = str(len(g))
        if base_of is not None:
            j = base_of[i]
            num["is_baseline"] = j == i
        for c in shown:
            if c in COSTS:
                col, header = COSTS[c]
                if c == "computation":
                    v = pd.to_numeric(g[col], errors="coerce").max()
                    num[c], disp[header] = v, ("—" if pd.isna(v) else f"{v:g}x")
                else:
                    v = pd.to_numeric(g[col], errors="coerce").mean()
                    num[c], disp[header] = v, _human_bytes(v)
                continue
            header, fmt = METRICS[c]
            s = summarize(ok[c])
            num.update({f"{c}_mean": s.mean, f"{c}_std": s.std, f"{c}_ci95": s.ci95, f"{c}_n": s.n})
            disp[header] = _mean_std(s, fmt)
            if c == "test_acc":
                disp["95% CI"] = _interval(s, fmt)
            if base_of is not None and c in PAIRED:
                d = paired_differences(g, groups[j][1], c) if j is not None and j != i else NO_VALUES
                num.update({f"delta_{c}_mean": d.mean, f"delta_{c}_std": d.std, f"delta_{c}_ci95": d.ci95,
                            f"delta_{c}_n": d.n})
                if c == PAIRED[0]:
                    disp[f"Δ {header.split(' (')[0]} vs {baseline}"] = (
                        "baseline" if j == i else f"no {baseline} run" if j is None else _difference(d, fmt))
        if reach is not None:
            r = reach.loc[g.index]
            reached = int(r["target_step"].notna().sum())
            st, sec = summarize(r["target_step"]), summarize(r["target_seconds"])
            num.update(target_acc=target_acc, target_reached=reached, target_steps_mean=st.mean,
                       target_steps_std=st.std, target_seconds_mean=sec.mean, target_seconds_std=sec.std)
            note = "" if reached == len(g) else f" ({reached}/{len(g)} reached)"
            disp[f"steps to {target_acc:g}%"] = "—" if reached == 0 else f"{st.mean:.0f}{note}"
            disp[f"train s to {target_acc:g}%"] = "—" if math.isnan(sec.mean) else f"{sec.mean:.1f}{note}"
        disp["status"] = "ok" if n_div == 0 else f"{n_div}/{len(g)} diverged"
        numeric_rows.append(num)
        display_rows.append(disp)

    numeric = pd.DataFrame(numeric_rows)
    display = pd.DataFrame(display_rows)
    if "test_acc_mean" in numeric:
        order = numeric["test_acc_mean"].fillna(-1).sort_values(ascending=False, kind="stable").index
        numeric, display = numeric.loc[order].reset_index(drop=True), display.loc[order].reset_index(drop=True)
    notes = []
    if baseline is not None and "test_acc" in shown:
        notes.append(f"Δ: paired difference to {baseline} on the same seeds, mean ± 95% CI half-width "
                     f"(pairs); {SIGNIFICANT} the CI excludes 0")
    display.attrs.update(labels=[k.removeprefix("cfg.") for k in keys] + [f"{k} (tuned)" for k in tuned],
                         notes=notes)
    return numeric, display


def _available(df: pd.DataFrame, name: str) -> bool:
    col = COSTS[name][0] if name in COSTS else name
    return col in df.columns and pd.to_numeric(df[col], errors="coerce").notna().any()


def _mean_std(s: Stats, fmt: str) -> str:
    if s.n == 0:
        return "—"
    if s.n == 1:
        return fmt.format(s.mean)
    return f"{fmt.format(s.mean)} ± {fmt.format(s.std)}"


def _interval(s: Stats, fmt: str) -> str:
    if s.n < 2:
        return "—"
    return f"[{fmt.format(s.mean - s.ci95)}, {fmt.format(s.mean + s.ci95)}]"


def _difference(d: Stats, fmt: str) -> str:
    signed = fmt.replace("{:", "{:+")
    if d.n == 0:
        return "no shared seed"
    if d.n == 1:
        return f"{signed.format(d.mean)} (1)"
    mark = f" {SIGNIFICANT}" if excludes_zero(d) else ""
    return f"{signed.format(d.mean)} ± {fmt.format(d.ci95)} ({d.n}){mark}"


def _human_bytes(b: float) -> str:
    if not np.isfinite(b):
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(b) < 1000 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} GB"


# ----------------------------------------------------------------------------------------------
# export


def render(numeric: pd.DataFrame, display: pd.DataFrame, fmt: str) -> str:
    """The leaderboard as text: csv (numbers), md (GitHub markdown) or tex (LaTeX booktabs)."""
    notes = display.attrs.get("notes", [])
    if fmt == "csv":
        return numeric.to_csv(index=False)
    if fmt == "md":
        text = display.to_markdown(index=False) + "\n"
        return text + "".join(f"\n{n}\n" for n in notes)
    if fmt == "tex":
        return _latex(display, notes)
    raise ValueError(fmt)


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "±": r"$\pm$", "Δ": r"$\Delta$", "—": "--"}


def tex_escape(text) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


def text_columns(display: pd.DataFrame) -> set:
    """Columns to align left: the labels that are text (algo, topology...) and the status."""
    labels = display.attrs.get("labels", [])
    return {c for c in labels if c in display and not pd.api.types.is_numeric_dtype(display[c])} | {"status"}


def _latex(display: pd.DataFrame, notes: list[str]) -> str:
    left = text_columns(display)
    align = "".join("l" if c in left else "r" for c in display.columns)
    lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(tex_escape(c) for c in display.columns) + r" \\", r"\midrule"]
    for _, r in display.iterrows():
        lines.append(" & ".join(tex_escape(v) for v in r) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {n}" for n in notes]
    return "\n".join(lines) + "\n"


def format_from_path(path: str) -> str:
    ext = Path(path).suffix.lower()
    if ext not in EXTENSIONS:
        raise UserError(f"--out {path!r}: unknown extension {ext or '(none)'}; use .csv, .md or .tex")
    return EXTENSIONS[ext]
