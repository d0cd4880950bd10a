"""Figures from a folder of runs: accuracy curves, consensus distance, sharpness vs accuracy.

make_plots(df, out_dir) takes a runs frame (bench.leaderboard.runs_frame: one row per
finished run, its summary keys, the cfg.<field> configuration keys and run_dir) and
writes up to three PNG files:

    acc_vs_step.png  test accuracy vs step per configuration (runs equal except the seed,
                     grouped as bench.leaderboard.group_keys does): the mean over seeds
                     with a ±std band (Figure 1 of Zhu et al., ICML 2023)
    consensus.png    consensus distance vs step (log scale) of the decentralized runs,
                     with gamma_t where the rule logs it (DSGD-AC) on a secondary axis
    eig_vs_acc.png   top-1 Hessian eigenvalue vs final test accuracy, one point per run

Encodings are shared by every figure: the colour says the algorithm (a fixed colour
for each of the seven presets, a fallback palette for other names), the marker says
the topology, and the line style tells apart configurations that share both. When the runs span several values of a workload key (data set, model,
workers, total batch), each figure has one panel per value.

Diverged runs keep their own thin curve, which ends at their last evaluation (an "x"
marks it); they never enter a mean or a band, and the legend says "(k diverged)".
On the log axis of the consensus distance, the range fits the completed runs, so a
blow-up before divergence does not flatten them (an end beyond it is marked on the edge).
A figure without data (no decentralized run, no Hessian eigenvalue) is skipped with
a note. The figures are matplotlib Figure objects drawn on the Agg canvas, with no
pyplot state, so nothing stays open after they are saved.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from bench import results
from bench.errors import UserError
from bench.leaderboard import group_keys

# One colour per algorithm preset, the same in every figure.
ALGO_COLORS = {
    "csgd": "#1f77b4",     # blue
    "dsgd": "#d62728",     # red
    "dsgd-ac": "#ff7f0e",  # orange
    "sam": "#2ca02c",      # green
    "ad-sam": "#9467bd",   # purple
    "lamb": "#8c564b",     # brown
    "d-lamb": "#e377c2",   # pink
}
# For any other algorithm name, in sorted order of the names present.
FALLBACK_COLORS = ("#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173",
                   "#3182bd", "#e6550d", "#31a354", "#756bb1")

TOPOLOGY_MARKERS = {
    "ring": "o", "torus": "s", "grid": "D", "exponential": "^", "star": "*", "one-peer-ring": "v",
    "one-peer-exp": "<", "complete": "P", "random": "X", "file": "h", "allreduce": "p",  # C-SGD's run_id
}
FALLBACK_MARKERS = ("d", ">", "H", "8")
LINESTYLES = ("-", "--", "-.", ":")

# Keys whose values get a panel of their own (when the groups differ in them).
WORKLOAD_KEYS = ("dataset", "model", "workers", "total_batch", "partition")
KEY_NAMES = {"workers": "n", "total_batch": "total batch", "dataset": "data", "model": "model",
             "partition": "partition"}
LEGEND_ROW_INCHES = 0.19  # height of one legend row under a panel (fontsize small), added to the figure

FILES = {"acc": "acc_vs_step.png", "consensus": "consensus.png", "eig": "eig_vs_acc.png"}
ACC_LABEL = "test accuracy (%)"
STEP_LABEL = "step"
CONSENSUS_LABEL = "consensus distance (1/n Σ‖x_i − x̄‖²)"
GAMMA_LABEL = "γ_t (DSGD-AC consensus weight)"
EIG_LABEL = "top-1 Hessian eigenvalue"

PANEL_WIDTH, PANEL_HEIGHT, MAX_COLUMNS = 6.5, 4.6, 3
BELOW = dict(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize="small")  # legends under a panel


# ----------------------------------------------------------------------------------------------
# encodings


def algo_colors(names) -> dict[str, str]:
    """Colour of each algorithm: the fixed one of a preset, else the fallback palette in sorted order.

    A preset's colour never depends on which other names are present.
    """
    names = sorted({str(n) for n in names})
    others = [n for n in names if n not in ALGO_COLORS]
    out = {n: ALGO_COLORS[n] for n in names if n in ALGO_COLORS}
    out.update({n: FALLBACK_COLORS[i % len(FALLBACK_COLORS)] for i, n in enumerate(others)})
    return out


def topology_markers(names) -> dict[str, str]:
    """Marker of each topology (by its base name, before any ':' arguments)."""
    names = sorted({str(n) for n in names})
    others = [n for n in names if n.split(":")[0] not in TOPOLOGY_MARKERS]
    out = {n: TOPOLOGY_MARKERS[n.split(":")[0]] for n in names if n not in others}
    out.update({n: FALLBACK_MARKERS[i % len(FALLBACK_MARKERS)] for i, n in enumerate(others)})
    return out


def _algo_order(name: str) -> tuple:
    presets = list(ALGO_COLORS)
    return (presets.index(name), "") if name in presets else (len(presets), name)


# ----------------------------------------------------------------------------------------------
# configurations and panels


@dataclass
class _Config:
    """Runs equal except the seed."""

    label: str
    algo: str
    topology: str
    comm: str
    completed: list[str] = field(default_factory=list)  # run_dir of each completed run
    diverged: list[str] = field(default_factory=list)

    def legend(self) -> str:
        n = len(self.completed) + len(self.diverged)
        text = f"{self.label}, {n} seed{'s' if n != 1 else ''}"
        return text + (f" ({len(self.diverged)} diverged)" if self.diverged else "")


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "—"
        if float(v).is_integer():
            return str(int(v))
        return f"{v:g}"
    return str(v)


def _key_text(key: str, value) -> str:
    name = key.removeprefix("cfg.")
    if name in ("algo", "topology"):
        return _fmt(value)
    return f"{KEY_NAMES.get(name, name)}={_fmt(value)}"


def _varying(df: pd.DataFrame, keys: list[str]) -> list[str]:
    return [k for k in keys if df[k].astype(str).nunique(dropna=False) > 1]


def _panel_keys(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """The group keys that are workload keys and take several values."""
    chosen = []
    for w in WORKLOAD_KEYS:
        for k in (w, f"cfg.{w}"):
            if k in keys and k not in chosen and df[k].astype(str).nunique(dropna=False) > 1:
                chosen.append(k)
    return chosen


def _panel_title(pdf: pd.DataFrame) -> str:
    """The workload of a panel, e.g. "data=mnist1d, model=cnn1d, n=16, total batch=512"."""
    parts = []
    for w in WORKLOAD_KEYS:
        col = w if w in pdf else f"cfg.{w}"
        if col in pdf:
            values = sorted({_fmt(v) for v in pdf[col]})
            parts.append(f"{KEY_NAMES[w]}={'|'.join(values)}")
    return ", ".join(parts)


@dataclass
class _Panel:
    title: str
    configs: list[_Config]


def _panels(df: pd.DataFrame, keys: list[str]) -> list[_Panel]:
    """Panels (one per workload value) of configurations (groups by keys), in a fixed order."""
    panel_keys = _panel_keys(df, keys)
    label_keys = [k for k in _varying(df, keys) if k not in panel_keys and k != "algo"]
    panels = []
    panel_groups = df.groupby(panel_keys, sort=True, dropna=False) if panel_keys else [((), df)]
    for _, pdf in panel_groups:
        configs = []
        for gvalue, g in pdf.groupby(keys, sort=False, dropna=False):
            gvalue = gvalue if isinstance(gvalue, tuple) else (gvalue,)
            values = dict(zip(keys, gvalue))
            first = g.iloc[0]
            algo = str(first.get("algo", "?"))
            parts = [algo] + [_key_text(k, values[k]) for k in label_keys]
            cfg = _Config(label=" ".join(parts), algo=algo, topology=str(first.get("topology", "")),
                          comm=str(first.get("comm", "")))
            for _, r in g.sort_values("seed" if "seed" in g else "run_dir").iterrows():
                (cfg.diverged if r.get("status") == "diverged" else cfg.completed).append(str(r["run_dir"]))
            configs.append(cfg)
        configs.sort(key=lambda c: (_algo_order(c.algo), c.label))
        panels.append(_Panel(_panel_title(pdf), configs))
    return panels


def _load_curves(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """metrics.csv of every run that has rows, by run_dir."""
    curves = {}
    for d in df["run_dir"].astype(str):
        try:
            m = results.load_metrics(d)
        except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError):
            continue
        if "step" in m and len(m):
            curves[d] = m
    return curves


def _series(curves: dict, run_dir: str, column: str, positive: bool = False) -> Optional[pd.Series]:
    m = curves.get(run_dir)
    if m is None or column not in m:
        return None
    s = pd.Series(pd.to_numeric(m[column], errors="coerce").to_numpy(), index=m["step"].to_numpy(), name=run_dir)
    s = s[np.isfinite(s)]
    if positive:
        s = s[s > 0]
    s = s.groupby(level=0).last()
    return s if len(s) else None


# ----------------------------------------------------------------------------------------------
# drawing


def _new_figure(n_panels: int, title: str, legend_entries: int = 0):
    """legend_entries: the most entries of a legend under a panel; the figure grows to hold them, so
    the panels keep their size however many configurations a suite has."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(MAX_COLUMNS, n_panels)
    rows = math.ceil(n_panels / cols)
    legend = LEGEND_ROW_INCHES * math.ceil(legend_entries / BELOW["ncol"])
    fig = Figure(figsize=(PANEL_WIDTH * cols, (PANEL_HEIGHT + legend) * rows + 0.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    fig.suptitle(title, fontsize="large")
    return fig, axes


def _styles(configs: list[_Config]) -> list[str]:
    """A line style per configuration: the k-th one of the same algorithm and topology gets the k-th style."""
    seen: dict[tuple, int] = {}
    out = []
    for c in configs:
        k = seen.get((c.algo, c.topology), 0)
        seen[(c.algo, c.topology)] = k + 1
        out.append(LINESTYLES[k % len(LINESTYLES)])
    return out


def _draw_config(ax, cfg: _Config, curves: dict, column: str, color: str, marker: str, linestyle: str,
                 band: str, positive: bool = False):
    """Mean over the completed seeds with a band, and one thin curve per diverged run.

    Returns (span, ends): the (min, max) of the completed data drawn (None if none) and the
    "x" markers that end the diverged curves.
    """
    gid = f"algo:{cfg.algo}"
    label = cfg.legend()
    span, ends = None, []
    done = [s for s in (_series(curves, d, column, positive) for d in cfg.completed) if s is not None]
    if done:
        table = pd.concat(done, axis=1).sort_index()
        mean, count = table.mean(axis=1), table.count(axis=1)
        steps = table.index.to_numpy(dtype=float)
        ax.plot(steps, mean.to_numpy(), color=color, linestyle=linestyle, linewidth=1.8, marker=marker,
                markersize=4, markevery=max(1, len(steps) // 10), label=label, gid=gid)
        several = (count >= 2).to_numpy()
        shown = mean
        if several.any():
            if band == "std":
                std = table.std(axis=1, ddof=1)
                lo, hi = mean - std, mean + std
            else:  # "range": min to max, which stays positive on a log axis
                lo, hi = table.min(axis=1), table.max(axis=1)
            ax.fill_between(steps, lo.to_numpy(), hi.to_numpy(), where=several, color=color, alpha=0.18,
                            linewidth=0, gid=gid)
            shown = pd.concat([mean, lo[several], hi[several]])
        span = (float(shown.min()), float(shown.max()))
        label = "_nolegend_"
    for d in cfg.diverged:
        s = _series(curves, d, column, positive)
        if s is None:
            continue
        ax.plot(s.index.to_numpy(dtype=float), s.to_numpy(), color=color, linestyle=(0, (2, 1.5)),
                linewidth=1.0, alpha=0.7, label=label, gid=gid)
        ends += ax.plot([float(s.index[-1])], [float(s.iloc[-1])], color=color, marker="x", markersize=7,
                        linestyle="none", gid=gid)
        label = "_nolegend_"
    return span, ends


def _fit_log_axis(ax, spans: list, ends: list) -> None:
    """Fit a log y axis to the completed runs, so that a diverged run's blow-up does not flatten them.

    The end of a diverged curve beyond the range is marked on the edge (a triangle pointing out).
    """
    spans = [s for s in spans if s is not None]
    if not spans or not ends:
        return
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    pad = max(1.5, (hi / lo) ** 0.05)
    lo, hi = lo / pad, hi * pad
    ax.set_ylim(lo, hi)
    for end in ends:
        y = end.get_ydata()[0]
        if not lo <= y <= hi:
            end.set_ydata([hi if y > hi else lo])
            end.set_marker("^" if y > hi else "v")
            end.set_clip_on(False)


def _acc_figure(df: pd.DataFrame, all_panels: list[_Panel], curves: dict):
    """Test accuracy vs step, mean ± std over seeds per configuration; None if no run has any."""
    colors = algo_colors(df["algo"])
    markers = topology_markers(df["topology"])
    panels = [p for p in all_panels
              if any(_series(curves, d, "test_acc") is not None for c in p.configs for d in c.completed + c.diverged)]
    if not panels:
        return None
    fig, axes = _new_figure(len(panels), "Test accuracy of the averaged model vs step\n"
                                         "line: mean over seeds, band: ±std", max(len(p.configs) for p in panels))
    for ax, panel in zip(axes, panels):
        for cfg, ls in zip(panel.configs, _styles(panel.configs)):
            _draw_config(ax, cfg, curves, "test_acc", colors[cfg.algo], markers[cfg.topology], ls, band="std")
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(ACC_LABEL)
        ax.set_title(panel.title or "all runs", fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend(**BELOW)
    return fig


def _consensus_figure(df: pd.DataFrame, all_panels: list[_Panel], curves: dict):
    """Consensus distance vs step (log y) of the decentralized runs, gamma_t of DSGD-AC on a second axis."""
    colors = algo_colors(df["algo"])
    markers = topology_markers(df["topology"])
    panels = []
    for p in all_panels:
        configs = [c for c in p.configs if any(  # all-reduce runs have none: one model
            _series(curves, d, "consensus_distance", positive=True) is not None for d in c.completed + c.diverged)]
        if configs:
            panels.append(_Panel(p.title, configs))
    if not panels:
        return None
    fig, axes = _new_figure(len(panels), "Consensus distance of the decentralized runs vs step\n"
                                         "line: mean over seeds, band: min–max over seeds",
                            max(len(p.configs) for p in panels) + 1)  # + DSGD-AC's gamma
    for ax, panel in zip(axes, panels):
        twin, spans, ends = None, [], []
        for cfg, ls in zip(panel.configs, _styles(panel.configs)):
            color = colors[cfg.algo]
            span, cfg_ends = _draw_config(ax, cfg, curves, "consensus_distance", color, markers[cfg.topology], ls,
                                          band="range", positive=True)
            spans.append(span)
            ends += cfg_ends
            # gamma_t where the rule logs it (DSGD-AC: Rule.log)
            gamma = next((s for s in (_series(curves, d, "gamma") for d in cfg.completed + cfg.diverged)
                          if s is not None), None)
            if gamma is not None:
                twin = twin or ax.twinx()
                twin.plot(gamma.index.to_numpy(dtype=float), gamma.to_numpy(), color=color, linestyle=":",
                          linewidth=1.5, label=f"γ_t {cfg.label}", gid=f"algo:{cfg.algo}")
        ax.set_yscale("log")
        _fit_log_axis(ax, spans, ends)
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(CONSENSUS_LABEL)
        ax.set_title(panel.title or "decentralized runs", fontsize="medium")
        ax.grid(alpha=0.3, which="both")
        handles, labels = ax.get_legend_handles_labels()
        if twin is not None:
            twin.set_ylim(0, 1.05)
            twin.set_ylabel(GAMMA_LABEL)
            h2, l2 = twin.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        (twin or ax).legend(handles, labels, **BELOW)
    return fig


def _eig_figure(df: pd.DataFrame, all_panels: list[_Panel]):
    """Top-1 Hessian eigenvalue vs final test accuracy, one point per run; None if no run has both."""
    from matplotlib.lines import Line2D

    colors = algo_colors(df["algo"])
    markers = topology_markers(df["topology"])
    points = df.assign(_eig=pd.to_numeric(df.get("top_eig"), errors="coerce"),
                       _acc=pd.to_numeric(df.get("test_acc"), errors="coerce"))
    points = points[np.isfinite(points["_eig"]) & np.isfinite(points["_acc"])]
    if points.empty:
        return None
    panels = []
    for p in all_panels:
        dirs = {d for c in p.configs for d in c.completed}
        sub = points[points["run_dir"].astype(str).isin(dirs)]
        if len(sub):
            panels.append((p.title, sub))
    fig, axes = _new_figure(len(panels), "Sharpness vs test accuracy\none point per run")
    for ax, (title, sub) in zip(axes, panels):
        algos = sorted(sub["algo"].astype(str).unique(), key=_algo_order)
        topos = sorted(sub["topology"].astype(str).unique())
        for algo in algos:
            for topo in topos:
                pts = sub[(sub["algo"].astype(str) == algo) & (sub["topology"].astype(str) == topo)]
                if len(pts):
                    ax.scatter(pts["_acc"], pts["_eig"], color=colors[algo], marker=markers[topo], s=55,
                               edgecolors="black", linewidths=0.5, alpha=0.9, gid=f"algo:{algo}")
        ax.set_xlabel(ACC_LABEL)
        ax.set_ylabel(EIG_LABEL)
        ax.set_title(title or "all runs", fontsize="medium")
        ax.grid(alpha=0.3)
        by_algo = ax.legend(handles=[Line2D([], [], color=colors[a], marker="o", linestyle="none", label=a)
                                     for a in algos], title="algorithm", fontsize="small", loc="upper left",
                            bbox_to_anchor=(1.02, 1.0))
        ax.add_artist(by_algo)
        ax.legend(handles=[Line2D([], [], color="0.4", marker=markers[t], linestyle="none", label=t)
                           for t in topos], title="topology", fontsize="small", loc="lower left",
                  bbox_to_anchor=(1.02, 0.0))
    return fig


# ----------------------------------------------------------------------------------------------
# entry point

SKIP_REASONS = {
    "acc": "no run has a test accuracy in its metrics.csv",
    "consensus": "no decentralized run with a consensus distance > 0 (all-reduce runs have none)",
    "eig": "no run has a top-1 Hessian eigenvalue (train with --hessian)",
}


def build_figures(df: pd.DataFrame, by: Optional[list[str]] = None,
                  note: Optional[Callable[[str], None]] = None) -> dict:
    """{"acc" | "consensus" | "eig": Figure} for the figures that have data; a note for each skipped one.

    The figures are not saved (make_plots does that); their artists carry gid "algo:<name>".
    """
    df, keys = _checked(df, by)
    return _build(df, keys, note)


def _build(df: pd.DataFrame, keys: list[str], note) -> dict:
    curves = _load_curves(df)
    panels = _panels(df, keys)
    figures = {"acc": _acc_figure(df, panels, curves), "consensus": _consensus_figure(df, panels, curves),
               "eig": _eig_figure(df, panels)}
    for name, fig in list(figures.items()):
        if fig is None:
            del figures[name]
            if note:
                note(f"skipped {FILES[name]}: {SKIP_REASONS[name]}")
    return figures


def _checked(df: pd.DataFrame, by: Optional[list[str]]) -> tuple[pd.DataFrame, list[str]]:
    """The runs frame and its group keys, or a UserError for no runs or an unknown --by key."""
    if df is None or df.empty:
        raise UserError("no finished runs to plot; run `dsgdbench run` first or pass the results folder")
    missing = [c for c in ("run_dir", "algo", "topology") if c not in df.columns]
    if missing:
        raise ValueError(f"not a runs frame: no column {missing[0]!r}")
    df = df.reset_index(drop=True)
    return df, group_keys(df, by)


def _writable_dir(out_dir: Path) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=out_dir, prefix=".probe").close()
    except OSError as e:
        raise UserError(f"--out {str(out_dir)!r} is not a writable folder ({e.strerror or e}); "
                        f"pass --out DIR") from None
    return out_dir


def make_plots(df: pd.DataFrame, out_dir, by: Optional[list[str]] = None,
               note: Optional[Callable[[str], None]] = None) -> list[Path]:
    """Write acc_vs_step.png, consensus.png and eig_vs_acc.png (those with data) to out_dir; their paths."""
    df, keys = _checked(df, by)  # no runs, an unknown --by key: reported before a folder is made
    out_dir = _writable_dir(Path(out_dir))  # an unwritable --out: reported before any drawing
    figures = _build(df, keys, note)
    written = []
    for name, fig in figures.items():
        path = out_dir / FILES[name]
        try:
            fig.savefig(path, format="png")
        except OSError as e:
            raise UserError(f"cannot write {path} ({e.strerror or e}); pass --out DIR") from None
        fig.clear()
        written.append(path)
    return written
