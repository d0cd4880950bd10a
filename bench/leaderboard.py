"""From run summaries to leaderboard tables: group over seeds, summarise, compare, export.

Groups
    Runs are grouped by their configuration without the seed: the usual labels
    (algo, topology, workers, total batch) plus every config field that splits
    them, or exactly the keys given with --by.

Statistics over seeds (every metric, every group; formulas in bench/stats.py)
    Each seed is one independent replicate. Over the n completed seeds of a group: the mean,
    the sample standard deviation (ddof=1), the half-width of the 95% confidence interval of the
    mean from Student's t distribution,

        ci95 = t_{0.975, n-1} * std / sqrt(n)        (t = 12.706, 4.303, 2.776 for n = 2, 3, 4)

    shown as [mean - ci95, mean + ci95] clipped to the metric's bounds (accuracy in [0, 100],
    losses >= 0), and the median, min and max (--robust shows them for test accuracy). With one
    seed there is no spread: std and ci95 are NaN and the table shows the value alone.

Failures
    Diverged (non-finite loss) and collapsed (at chance, see bench/runner.py) runs are results:
    counted per group (seeds, failed, diverged, collapsed, the status column), never averaged
    into a metric. The failure rate k/n comes with its exact 95% Clopper-Pearson interval.

Paired differences against a baseline (--baseline ALGO)
    A worker's batch at step t depends only on (seed, worker, t), so two runs with
    the same seed saw the same data in the same order. For a group and its
    baseline group, d_s = metric(group, seed s) - metric(baseline, seed s) over
    the k seeds both completed; the table shows mean(d) ± t_{0.975, k-1} std(d) /
    sqrt(k) and k. Pairing removes the seed-to-seed noise the two runs share.
    p is the two-sided paired t test of mean(d) = 0; the m comparisons of one metric in one
    table are one family, and their p-values are Holm-Bonferroni adjusted (p (Holm)); "*"
    marks p (Holm) < 0.05. "seeds for 80%" is the number of pairs a paired t test at
    alpha = 0.05 / m (Holm's strictest step) needs for 80% power, at the observed mean
    difference and at 1 point of accuracy, with the observed sd of the differences (noncentral t).
    The baseline group of a row is the ALGO group with the same workload: equal
    on every group key except those that follow from the algorithm
    (is_algorithm_key: RunConfig's fields of the algorithm role, such as the
    algorithm, its topology, components and lr, and every component parameter).
    If several ALGO groups fit (an lr grid, or D-SGD on two graphs), the match is
    refined on the keys they differ on (the same lr, the same topology as the row);
    a row whose value of such a key none of them has (C-SGD, no graph, against D-SGD
    on a ring and on an exponential graph) has no baseline: its cell says which key
    (e.g. "no dsgd run at topology=allreduce").

Tuning (--tune KEY [--tune-seeds S])
    Within each set of runs equal on everything but KEY and the seed, the value
    of KEY with the best validation accuracy (val_acc, from runs made with
    --val-fraction) is chosen on the runs of the tuning seeds S, and the runs of the
    other seeds (the report seeds) of that value are reported: the test set never takes
    part in the choice, and no reported seed was used to make it. (Without S, the choice
    and the report share their seeds, with a warning.) Failures count: values are
    ranked first by the fraction of their seeds that failed (fewer is better,
    so a value with a failed seed ranks below every value whose seeds all
    completed), then by the mean val_acc of their completed seeds. A tie goes
    to the smaller value. A chosen value at the smallest or largest point of a numeric
    grid is flagged ("edge"): the best may lie outside the grid.

Time to accuracy (--target-acc X)
    For each completed run, the first evaluation in its metrics.csv with
    test_acc >= X gives the step and the training seconds (evaluation time
    excluded). The mean is over the seeds that reached X; "k/n reached" says
    how many of the group's n runs did (a failed run never counts as having
    reached it).

Exports
    --format csv: one row per group, every number above; --format runs: one row per run
    (long format: labels, seed, status, every metric, every configuration field). Every
    export states the dsgdbench version, git revision and torch version of the code that
    made the runs and of the code that made the table, and the command (first lines, as
    comments: read a CSV with pandas.read_csv(path, comment="#")).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from bench import results
from bench import stats as stats_
from bench.config import ALGORITHM, EVALUATION, EXECUTION, RunConfig
from bench.errors import UserError
from bench.registry import unknown_name
from bench.stats import clip_interval, clopper_pearson, describe, holm, paired_t_test, seeds_for_power, t_interval

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
    "adaptive_top_eig": ("adaptive sharpness", "{:.3g}"),
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
DEFAULT_COLUMNS = ("test_acc", "test_loss", "train_loss", "train_acc", "top_eig", "adaptive_top_eig", "computation",
                   "bytes_per_step", "train_seconds")
# Metrics that get paired differences with --baseline (the display shows the first).
PAIRED = ("test_acc", "test_loss", "top_eig", "adaptive_top_eig")
ONE_POINT = {"test_acc": 1.0}  # the difference worth detecting, besides the observed one (1 point of accuracy)
BOUNDS = {"test_acc": (0.0, 100.0), "train_acc": (0.0, 100.0), "val_acc": (0.0, 100.0), "test_loss": (0.0, None),
          "train_loss": (0.0, None), "val_loss": (0.0, None), "consensus_distance": (0.0, None),
          "train_seconds": (0.0, None)}  # intervals are shown within them
ALPHA = 0.05
MAX_SEEDS = 10000
LABEL_KEYS = ("algo", "topology", "workers", "total_batch")
FORMATS = ("table", "csv", "md", "tex", "runs")
EXTENSIONS = {".csv": "csv", ".md": "md", ".markdown": "md", ".tex": "tex"}

# Config fields that never split a group: the seed, where and how a run was executed (the
# execution role of RunConfig), what is measured at its end (evaluation role), epochs (the
# resolved steps is what counts) and bookkeeping.
GROUP_SKIP = (tuple(f.name for f in RunConfig.core(EXECUTION))
              # what is measured, not what is trained (a tuned suite's tuning runs skip the Hessian)
              + tuple(f.name for f in RunConfig.core(EVALUATION) if f.name != "stop_on_collapse")
              + ("seed", "epochs", "format", "resolved"))


def is_algorithm_key(key: str) -> bool:
    """Group keys that follow from the algorithm rather than the workload: not matched when looking
    for a row's baseline group (csgd's topology is "allreduce", its lr its own). They are the core
    fields of the algorithm role and every component parameter (full names: "sam.rho")."""
    key = key.removeprefix("cfg.")
    return key in ALGORITHM_FIELDS or "." in key


ALGORITHM_FIELDS = frozenset(f.name for f in RunConfig.core(ALGORITHM))

CANDIDATES = "tune.candidates"  # column added by tune_runs: how many values of the tuned key(s) competed
EDGE = "tune.edge"  # column added by tune_runs: the tuned keys whose chosen value is at its grid's edge
SIGNIFICANT = "*"


Stats = stats_.Stats
NO_VALUES = Stats(math.nan, math.nan, math.nan, 0)


def t_quantile(dof: int) -> float:
    """t_{0.975, dof}: the two-sided 95% quantile of Student's t distribution."""
    return float(stats.t.ppf(0.975, dof))


def summarize(values) -> Stats:
    """Mean, sample std and 95% t half-width of the finite values (bench.stats.t_interval)."""
    return t_interval(pd.Series(values, dtype=object).tolist())


def excludes_zero(s: Stats) -> bool:
    """Whether the 95% interval mean ± ci95 lies on one side of 0 (needs two pairs or more)."""
    return s.n >= 2 and abs(s.mean) > s.ci95


# ----------------------------------------------------------------------------------------------
# the runs table


# Summary fields a table relies on, and what each must hold: a run that breaks them is skipped with a warning.
_INTS = ("workers", "seed", "batch", "total_batch", "steps")
_TEXT = ("algo", "topology")


def runs_frame(root: str, warn=None) -> pd.DataFrame:
    """One row per finished run: its summary, plus the configuration fields as cfg.<key>.

    Values of the wrong type are never used silently: a run whose status is not a known one, or
    whose identifying fields (algo, topology, workers, seed, ...) have the wrong type, is skipped
    with a warning naming its folder; a metric that is not a number is dropped (NaN) with a warning.
    The number of unfinished run folders is reported as a warning too.
    """
    warn = warn or (lambda m: None)
    rows = []
    for s in results.load_runs(root, warn):
        where = s["run_dir"]
        if s.get("status") not in results.FINISHED:
            warn(f"skipped {where}: status {s.get('status')!r} is not one of {', '.join(results.FINISHED)}")
            continue
        bad = [k for k in _INTS if k in s and (isinstance(s[k], bool) or not isinstance(s[k], int))]
        bad += [k for k in _TEXT if k in s and not isinstance(s[k], str)]
        if bad:
            warn(f"skipped {where}: {bad[0]} = {s[bad[0]]!r} is not a {'number' if bad[0] in _INTS else 'name'}")
            continue
        for k in (*METRICS, "bytes_per_step", "grad_evals_per_step", "val_acc"):
            v = s.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                warn(f"{where}: {k} = {v!r} is not a number; left out")
                s[k] = None
        cfg_file = Path(where) / "config.json"
        try:
            cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            warn(f"{where}: config.json is not readable JSON; its configuration fields are missing")
            cfg = {}
        if not isinstance(cfg, dict):  # valid JSON, but not a configuration
            cfg = {}
        row = {k: v for k, v in s.items() if not isinstance(v, (dict, list))}
        row.update({f"versions.{k}": v for k, v in (s.get("versions") or {}).items()})
        row.update({f"cfg.{k}": json.dumps(v) if isinstance(v, list) else v for k, v in flat_config(cfg).items()})
        rows.append(row)
    left = results.unfinished(root)
    if left:
        warn(f"{len(left)} run folder(s) are unfinished (no summary), e.g. {left[0]}: run the same command again "
             f"to resume them")
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


def tune_runs(df: pd.DataFrame, keys: list[str], tune_seeds=None, where: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep, per configuration, the runs of the value(s) of `keys` with the best validation accuracy.

    A configuration is a set of runs equal on every config field except the tuned keys and the
    seed. tune_seeds: the choice is made on the runs of these seeds alone and the runs of the
    other seeds (the report seeds) of the chosen value are returned: nothing reported was used to
    choose. Without tune_seeds the choice and the report share their seeds (a warning says so).
    Returns (selected, choices): the rows of df that are reported (with the column
    tune.candidates, the number of values compared), and one row per configuration with the
    winning value(s), candidates, tuning seeds, failed, the winner's val_acc mean and `edge`
    (the winner is the smallest or largest value of a numeric grid: the grid may not hold the
    best). The ranking rule is in the module docstring.
    """
    if df.empty:
        raise UserError(f"no finished runs found{where}; run `dsgdbench run` first or pass the folder of your runs")
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
    seeds = pd.to_numeric(df["seed"], errors="coerce")
    if tune_seeds is not None:
        tuning = seeds.isin(list(tune_seeds))
        if not tuning.any():
            raise UserError(f"--tune-seeds {','.join(map(str, tune_seeds))}: no run has these seeds "
                            f"(present: {','.join(str(int(v)) for v in sorted(seeds.dropna().unique()))})")
    else:
        tuning = pd.Series(True, index=df.index)

    if any(c.startswith("cfg.") for c in df.columns):
        tuned = _with_components(df, cols)
        context = [c for c in df.columns if c.startswith("cfg.") and c[4:] not in GROUP_SKIP and c not in tuned]
    else:
        context = [k for k in ("algo", "topology", "workers", "dataset", "model", "batch", "total_batch", "steps",
                               "grad", "opt", "comm", "lr") if k in df.columns and k not in cols]
    # text, so that missing values group and compare like any other (pandas 3 keeps NaN through astype(str))
    key_str = df[context + cols].astype(str).fillna("<missing>")
    key_str["_all"] = ""  # a configuration column that always exists
    val = pd.to_numeric(df["val_acc"], errors="coerce")
    failed = df["status"].isin(results.FAILED)
    varying = [c for c in context if key_str[c].nunique() > 1 or c in ("cfg.algo", "algo")]

    keep: dict = {}  # reported row index -> number of values it was chosen from
    at_edge: dict = {}  # reported row index -> the tuned keys whose chosen value is at its grid's edge
    choices = []
    for _, g in key_str[tuning].groupby(["_all", *context], sort=False, dropna=False):
        ranking = []
        for _, v in g.groupby(cols, sort=False, dropna=False):
            ok = v.index[~failed[v.index]]
            ranking.append(_Candidate(rows=v.index, failed=float(failed[v.index].mean()),
                                      val_acc=float(val[ok].mean()), completed=len(ok),
                                      order=_sort_key(df.loc[v.index[0], cols])))
        if any(r.completed for r in ranking) and all(math.isnan(r.val_acc) for r in ranking):
            first = df.loc[g.index[0]]
            where = ", ".join(f"{c.removeprefix('cfg.')}={_value(first[c])}" for c in varying)
            raise UserError(f"--tune: the runs with {where} have no val_acc; rerun them with --val-fraction 0.1")
        ranking.sort(key=_Candidate.rank)
        best = ranking[0].rows
        chosen = key_str.loc[best[0], ["_all", *context, *cols]]
        same = (key_str[["_all", *context, *cols]] == chosen).all(axis=1)
        reported = df.index[same & (~tuning if tune_seeds is not None else tuning)]
        keep.update({i: len(ranking) for i in reported})
        first = df.loc[best[0]]
        v_best = t_interval(val[best[~failed[best]]])
        # an edge means "the best may lie outside the grid"; where every value failed, none is best
        edge = [] if ranking[0].failed == 1.0 else \
            [k for k, c in zip(keys, cols) if _at_edge(first[c], [df.loc[r.rows[0], c] for r in ranking])]
        at_edge.update({i: ",".join(edge) for i in reported})
        choices.append({**{c.removeprefix("cfg."): first[c] for c in varying},
                        **{k: first[c] for k, c in zip(keys, cols)},
                        "candidates": len(ranking), "tune_seeds": len(best), "reported": len(reported),
                        "failed": int(failed[best].sum()), "val_acc_mean": v_best.mean, "val_acc_std": v_best.std,
                        "edge": ",".join(edge)})
    selected = df.loc[sorted(keep)].copy()
    selected[CANDIDATES] = pd.Series(keep)
    selected[EDGE] = pd.Series(at_edge, dtype=object)
    out = pd.DataFrame(choices)
    cfg_cols = ["_all", *context]  # one configuration = one tuple of these (all text)
    chosen = set(key_str.loc[tuning, cfg_cols].itertuples(index=False, name=None))
    rest = set(key_str.loc[~tuning, cfg_cols].itertuples(index=False, name=None))
    out.attrs["missing"] = len(rest - chosen) if tune_seeds is not None else 0
    return selected, out


def _at_edge(value, candidates) -> bool:
    """Whether a numeric value is the smallest or largest of (at least three) numeric candidates."""
    try:
        nums = sorted({float(c) for c in candidates})
        v = float(value)
    except (TypeError, ValueError):
        return False
    return len(nums) >= 3 and v in (nums[0], nums[-1])


def tune_warnings(choices: pd.DataFrame, keys: list[str], tune_seeds) -> list[str]:
    """Lines to print after tuning: chosen values at a grid edge; choice and report on the same seeds."""
    out = []
    if tune_seeds is None:
        out.append("--tune chose on the same seeds it reports, which inflates the winners; give --tune-seeds "
                   "(seeds used only to choose) or run a suite with tune_seeds")
    for _, r in choices[choices["edge"] != ""].iterrows():
        what = ", ".join(f"{k}={_value(r[k])}" for k in r.index if k not in (
            "candidates", "tune_seeds", "reported", "failed", "val_acc_mean", "val_acc_std", "edge")
            and not _isna(r[k]) and r[k] != "—")  # the keys of this configuration only
        out.append(f"--tune {r['edge']}: the chosen value is at the edge of its grid ({what}); widen the grid")
    if tune_seeds is not None and "missing" in choices.attrs and choices.attrs["missing"]:
        out.append(f"{choices.attrs['missing']} configuration(s) have no run on the tuning seeds and are left out "
                   f"of the table: run them on the tuning seeds too")
    if len(choices) and (choices["reported"] == 0).any():
        out.append("some chosen values have no run on a report seed: run them (dsgdbench suite runs the chosen "
                   "values on the report seeds when the suite has tune_seeds)")
    return out


class _Candidate(NamedTuple):
    """One value of the tuned key(s) within a configuration."""

    rows: pd.Index  # its runs on the tuning seeds
    failed: float  # fraction of its seeds that diverged or collapsed
    val_acc: float  # mean val_acc of its completed seeds (NaN if none)
    completed: int
    order: tuple  # the value itself, for ties

    def rank(self) -> tuple:
        """Smaller is better: fewer failed seeds first, then higher val_acc, then the smaller value."""
        return self.failed, (math.inf if math.isnan(self.val_acc) else -self.val_acc), self.order


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


def match_baselines(groups: list[dict], keys: list[str], algo: str) -> tuple[list[int | None], dict[int, str]]:
    """The index of each group's baseline group (see the module docstring).

    groups: the key values of each group. A group of `algo` is its own baseline;
    None where no `algo` group ran the same workload. Also, for rows left without a baseline by
    the refinement, the keys and values that none of the candidates has ("topology=allreduce").
    """
    if "algo" not in keys:
        raise UserError("--baseline compares algorithms: add algo to --by")
    workload = [k for k in keys if not is_algorithm_key(k)]
    other = [k for k in keys if k not in workload and k != "algo"]
    base = [j for j, g in enumerate(groups) if g["algo"] == algo]
    out: list[int | None] = []
    why: dict[int, str] = {}
    for i, g in enumerate(groups):
        if g["algo"] == algo:
            out.append(i)
            continue
        cands = [j for j in base if all(_same(groups[j][k], g[k]) for k in workload)]
        if len(cands) > 1:
            differ = [k for k in other if len({_value(groups[j][k]) for j in cands}) > 1]
            refined = [j for j in cands if all(_same(groups[j][k], g[k]) for k in differ)]
            # distinct groups equal on the workload differ on a key of `differ`: at most one is left
            if not refined:
                why[i] = ", ".join(f"{k.removeprefix('cfg.')}={_value(g[k])}" for k in differ
                                   if not any(_same(groups[j][k], g[k]) for j in cands))
            cands = refined
        out.append(cands[0] if cands else None)
    return out, why


def paired_differences(runs: pd.DataFrame, base: pd.DataFrame, metric: str) -> Stats:
    """Statistics of metric(run) - metric(baseline run) over the seeds both completed."""
    return summarize(paired_values(runs, base, metric))


def paired_values(runs: pd.DataFrame, base: pd.DataFrame, metric: str) -> pd.Series:
    """metric(run, seed s) - metric(baseline, seed s) for the seeds both completed, by seed."""
    a, b = _by_seed(runs, metric), _by_seed(base, metric)
    shared = a.index.intersection(b.index)
    return a[shared] - b[shared]


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
        if r.get("status") == "completed" and isinstance(run_dir, str):  # failed runs never count
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
                target_acc: float | None = None, tuned: list[str] | None = None, robust: bool = False,
                where: str = "", paired: tuple[str, ...] = PAIRED[:1]):
    """Two frames: `numeric` (for CSV) and `display` (strings, for the tables).

    numeric has, per group, the key values, seeds (runs), failed, diverged, collapsed,
    failure_rate with its Clopper-Pearson bounds failure_lo/_hi, and for every metric <m>_mean,
    _std, _ci95, _lo, _hi (the interval within the metric's bounds), _n, _median, _min, _max; with a
    baseline, per paired metric, delta_<m>_mean, _std, _ci95, _n, _p, _p_holm, _seeds80 (pairs for
    80% power at the observed difference) and, for test_acc, _seeds80_1pt (at 1 point); with a
    target target_reached, target_steps_mean, target_seconds_mean. Rows are sorted by mean test
    accuracy, best first. display.attrs holds "labels" (the key columns) and "notes".
    robust: also show median [min, max] of test accuracy.
    paired: the paired differences shown in display (all of PAIRED are in numeric); the first gets the
    columns "p (Holm)" and "seeds for 80%", the others their Holm p inside their Δ column.
    """
    bad = [c for c in paired if c not in PAIRED]
    if bad:
        raise UserError(f"--paired {bad[0]!r}: paired differences exist for {', '.join(PAIRED)}")
    if df.empty:
        raise UserError(f"no finished runs found{where}; run `dsgdbench run` first or pass the folder of your runs")
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
    base_of, no_base = match_baselines([k for k, _ in groups], keys, baseline) if baseline else (None, {})
    reach = time_to_target(df, target_acc) if target_acc is not None else None

    numeric_rows, display_rows, diffs = [], [], {}
    for i, (key, g) in enumerate(groups):
        labels = {k.removeprefix("cfg."): v for k, v in key.items()}
        check_duplicate_seeds(g, ", ".join(f"{k}={_value(v)}" for k, v in labels.items()))
        ok = g[g["status"] == "completed"]
        num = {**labels}
        disp = {k: _value(v) if _isna(v) or isinstance(v, (float, np.floating)) else v  # "—": p of D-SGD
                for k, v in labels.items()}
        for k, c in zip(tuned, tuned_cols):
            values = list(dict.fromkeys(_value(v) for v in g[c]))
            of = list(dict.fromkeys(str(int(v)) for v in g[CANDIDATES].dropna())) if CANDIDATES in g else []
            num[f"tuned_{k}"] = g[c].iloc[0] if len(values) == 1 else "/".join(values)
            num[f"tuned_{k}_of"] = int(g[CANDIDATES].max()) if of else np.nan
            edge = EDGE in g and any(k in str(e).split(",") for e in g[EDGE].dropna())
            num[f"tuned_{k}_edge"] = edge
            disp[f"{k} (tuned)"] = "/".join(values) + (f" (of {'/'.join(of)}{', grid edge' if edge else ''})"
                                                       if of else "")
        failures = {st: int((g["status"] == st).sum()) for st in results.FAILED}
        n_fail = sum(failures.values())
        lo, hi = clopper_pearson(n_fail, len(g))
        num.update(seeds=len(g), failed=n_fail, **failures, failure_rate=n_fail / len(g), failure_lo=lo,
                   failure_hi=hi)
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
            d = describe(pd.to_numeric(ok[c], errors="coerce").tolist() if c in ok else [])
            s_ = Stats(d["mean"], d["std"], d["ci95"], d["n"])
            lo_, hi_ = clip_interval(d["mean"] - d["ci95"], d["mean"] + d["ci95"], *BOUNDS.get(c, (None, None))) \
                if d["n"] >= 2 else (math.nan, math.nan)
            num.update({f"{c}_{k}": v for k, v in d.items()})
            num.update({f"{c}_lo": lo_, f"{c}_hi": hi_})
            disp[header] = _mean_std(s_, fmt)
            if c == "test_acc":
                disp["95% CI"] = "—" if d["n"] < 2 else f"[{fmt.format(lo_)}, {fmt.format(hi_)}]"
                if robust:
                    disp["median [min, max]"] = "—" if d["n"] == 0 else \
                        f"{fmt.format(d['median'])} [{fmt.format(d['min'])}, {fmt.format(d['max'])}]"
            if base_of is not None and c in PAIRED:
                vals = paired_values(g, groups[j][1], c) if j is not None and j != i else pd.Series(dtype=float)
                dd = summarize(vals)
                num.update({f"delta_{c}_mean": dd.mean, f"delta_{c}_std": dd.std, f"delta_{c}_ci95": dd.ci95,
                            f"delta_{c}_n": dd.n, f"delta_{c}_p": paired_t_test(vals.tolist())})
                if j is not None and j != i:
                    diffs.setdefault(c, []).append((i, dd))
        if reach is not None:
            r = reach.loc[g.index]
            reached = int(r["target_step"].notna().sum())
            st, sec = summarize(r["target_step"]), summarize(r["target_seconds"])
            num.update(target_acc=target_acc, target_reached=reached, target_steps_mean=st.mean,
                       target_steps_std=st.std, target_seconds_mean=sec.mean, target_seconds_std=sec.std)
            note = "" if reached == len(g) else f" ({reached}/{len(g)} reached)"
            disp[f"steps to {target_acc:g}%"] = "—" if reached == 0 else f"{st.mean:.0f}{note}"
            disp[f"train s to {target_acc:g}%"] = "—" if math.isnan(sec.mean) else f"{sec.mean:.1f}{note}"
        disp["status"] = _status(failures, len(g), lo, hi)
        numeric_rows.append(num)
        display_rows.append(disp)

    notes = []
    if base_of is not None:
        notes += _tests(numeric_rows, display_rows, diffs, groups, base_of, baseline, paired, no_base)
    numeric = pd.DataFrame(numeric_rows)
    display = pd.DataFrame(display_rows)
    if "test_acc_mean" in numeric:
        order = numeric["test_acc_mean"].fillna(-1).sort_values(ascending=False, kind="stable").index
        numeric, display = numeric.loc[order].reset_index(drop=True), display.loc[order].reset_index(drop=True)
    first = [c for c in display.columns if c in [k.removeprefix("cfg.") for k in keys]]
    first += [c for c in display.columns if c.endswith("(tuned)")] + ["seeds", METRICS["test_acc"][0], "95% CI",
                                                                       "median [min, max]"]
    first += [c for c in display.columns if c.startswith("Δ ")] + ["p (Holm)", "seeds for 80%"]
    cols = [c for c in dict.fromkeys(first) if c in display.columns]
    display = display[cols + [c for c in display.columns if c not in cols and c != "status"] + ["status"]]
    if (numeric["failed"] > 0).any():
        notes.append("failed runs (diverged: a non-finite loss; collapsed: at chance, bench/runner.py) are counted "
                     "in seeds and status, never averaged in; status gives the 95% Clopper-Pearson interval of "
                     "the failure rate")
    display.attrs.update(labels=[k.removeprefix("cfg.") for k in keys] + [f"{k} (tuned)" for k in tuned],
                         notes=notes)
    return numeric, display


def _tests(numeric_rows, display_rows, diffs, groups, base_of, baseline, paired=PAIRED[:1], no_base=None) -> list[str]:
    """Holm over each paired metric's comparisons in this table (one family per metric); power; the
    display columns of the metrics in `paired`. Notes."""
    notes = []
    for c, items in diffs.items():
        rows = [i for i, _ in items]
        p = [numeric_rows[i][f"delta_{c}_p"] for i in rows]
        adj = holm(p)
        m = int(np.sum(~np.isnan(np.asarray(p, dtype=float))))
        alpha = ALPHA / max(1, m)  # the strictest step of Holm: power stated at the level a test must pass
        for i, (_, d), pa in zip(rows, items, adj):
            num = numeric_rows[i]
            num[f"delta_{c}_p_holm"] = pa
            num[f"delta_{c}_seeds80"] = _power_seeds(d.mean, d.std, alpha)
            if c in ONE_POINT:
                num[f"delta_{c}_seeds80_1pt"] = _power_seeds(ONE_POINT[c], d.std, alpha)
        if c == paired[0]:
            one = " / at 1 point" if c in ONE_POINT else ""
            notes.append(f"Δ: paired difference to {baseline} on the seeds both completed, mean ± 95% CI "
                         f"half-width (pairs); p: two-sided paired t test, Holm-corrected over the {m} comparisons "
                         f"of this table with 2 or more pairs (each metric is its own family); {SIGNIFICANT} "
                         f"p (Holm) < {ALPHA}; seeds for 80%: pairs a paired t test at α = {ALPHA}/{max(1, m)} "
                         f"needs for 80% power at the observed difference{one} (with the observed sd of the "
                         f"differences)")
    for i, (key, g) in enumerate(groups):
        num, disp = numeric_rows[i], display_rows[i]
        for c in paired:
            if f"delta_{c}_mean" not in num:
                continue
            first = c == paired[0]
            header, fmt = METRICS[c]
            j = base_of[i]
            name = f"Δ {header.split(' (')[0]} vs {baseline}"
            if j == i:
                disp[name] = "baseline"
                if first:
                    disp["p (Holm)"], disp["seeds for 80%"] = "", ""
                continue
            if j is None:
                disp[name] = f"no {baseline} run" + (f" at {no_base[i]}" if no_base and i in no_base else "")
                if first:
                    disp["p (Holm)"], disp["seeds for 80%"] = "—", "—"
                continue
            d = Stats(num[f"delta_{c}_mean"], num[f"delta_{c}_std"], num[f"delta_{c}_ci95"], num[f"delta_{c}_n"])
            pa = num.get(f"delta_{c}_p_holm", math.nan)
            p_text = "—" if math.isnan(pa) else f"{pa:.3f}" if pa >= 0.001 else "<0.001"
            disp[name] = _difference(d, fmt, pa)
            if first:
                disp["p (Holm)"] = p_text
                disp["seeds for 80%"] = f"{_seeds_text(num.get(f'delta_{c}_seeds80'))}" + (
                    f" / {_seeds_text(num.get(f'delta_{c}_seeds80_1pt'))}" if c in ONE_POINT else "")
            elif d.n >= 2:
                disp[name] += f", p {p_text}"
    return notes


def _power_seeds(effect: float, sd: float, alpha: float) -> float:
    if any(not isinstance(v, float) or math.isnan(v) for v in (effect, sd)):
        return math.nan
    n = seeds_for_power(abs(effect), sd, alpha=alpha, power=0.8, max_n=MAX_SEEDS)
    return float(n) if n is not None else math.inf


def _seeds_text(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f">{MAX_SEEDS}" if math.isinf(v) else f"{int(v)}"


def _status(failures: dict, n: int, lo: float, hi: float) -> str:
    k = sum(failures.values())
    if k == 0:
        return "ok"
    what = ", ".join(f"{v} {st}" for st, v in failures.items() if v)
    return f"{k}/{n} failed ({what}; {100 * lo:.0f}–{100 * hi:.0f}%)"


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


def _difference(d: Stats, fmt: str, p_holm: float = math.nan) -> str:
    signed = fmt.replace("{:", "{:+")
    if d.n == 0:
        return "no shared seed"
    if d.n == 1:
        return f"{signed.format(d.mean)} (1)"
    mark = f" {SIGNIFICANT}" if p_holm < ALPHA else ""
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


def render(numeric: pd.DataFrame, display: pd.DataFrame, fmt: str, provenance=(), runs=None) -> str:
    """The leaderboard as text: csv (numbers), md (GitHub markdown), tex (LaTeX booktabs), or runs
    (one row per run of the frame `runs`, long format); the provenance lines go first as comments
    (csv, runs, tex) or last (md)."""
    notes = display.attrs.get("notes", [])
    if fmt in ("csv", "runs"):
        head = "".join(f"# {p}\n" for p in provenance)
        table = numeric if fmt == "csv" else runs_long(runs, display.attrs.get("labels", []))
        # every text quoted: a "#" inside a value (a folder name) then survives read_csv(comment="#")
        return head + table.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)
    if fmt == "md":
        text = display.to_markdown(index=False, disable_numparse=True) + "\n"  # the cells as shown, "1.000"
        return text + "".join(f"\n{n}\n" for n in notes) + "".join(f"\n{p}\n" for p in provenance)
    if fmt == "tex":
        return "".join(f"% {p}\n" for p in provenance) + _latex(display, notes)
    raise ValueError(fmt)


def runs_long(df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """One row per run: the group labels, seed, status, every metric, every configuration field."""
    first = [c for c in ("algo", "topology", "workers", "total_batch", "seed", "status", "run_id") if c in df]
    first += [c for c in labels if c in df and c not in first]
    metrics = [c for c in dict.fromkeys((*METRICS, "val_acc", "diverged_step", "collapsed_step", "steps_done"))
               if c in df and c not in first]
    cfg = sorted(c for c in df if c.startswith("cfg."))
    out = df[first + metrics + cfg].copy()
    return out.sort_values([c for c in ("algo", "topology", "total_batch", "seed") if c in out], kind="stable")


def provenance(df: pd.DataFrame, command: str) -> list[str]:
    """Where a table comes from: the command, the code that made it, the code that made its runs."""
    v = results.versions()
    lines = [f"made by `{command}` with dsgdbench {v['dsgdbench']} (git {v['git'] or 'unknown'}), "
             f"torch {v['torch']}, python {v['python']}"]
    cols = [c for c in ("versions.dsgdbench", "versions.git", "versions.torch") if c in df]
    if cols:
        sets = df[cols].astype(str).value_counts()
        made = "; ".join(f"{n} at dsgdbench {k[0]} (git {k[1]}), torch {k[2]}" if len(k) == 3 else
                         f"{n} at " + ", ".join(f"{c.removeprefix('versions.')} {v}" for c, v in zip(cols, k))
                         for k, n in sets.items())
        lines.append(f"runs: {made}")
    return lines


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
