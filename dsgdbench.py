"""dsgdbench command line: run, compare, list, topology, speed.

Thin by design: options in, one call into bench/, a rich table or progress bar out.
A user's mistake (bench.errors.UserError) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
import typer.core
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bench.config import RunConfig
from bench.errors import RunFailed, UserError

class _Group(typer.core.TyperGroup):
    """Turns a user's mistake into one line on stderr and exit code 2 (a bug keeps its traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            Console(stderr=True).print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except RunFailed as e:  # not the input: a rank died or hung (exit 1, one line)
            Console(stderr=True).print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark data-parallel optimizers (centralized, decentralized, sharpness-aware, tracking, "
                       "compressed, push-sum, local-update; `dsgdbench list algorithms`) over communication "
                       "topologies.")
out = Console()
err = Console(stderr=True)


def _floats(text: Optional[str], name: str, count: Optional[int] = None):
    if text is None:
        return None
    try:
        v = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UserError(f"--{name} {text!r}: give comma-separated numbers, e.g. 0.5,0.75") from None
    if count is not None and len(v) != count:
        raise UserError(f"--{name} {text!r}: give exactly {count} numbers")
    return v


def _keys(texts) -> list[str]:
    """Comma-separated names, from one option or a repeated one ("algo,topology" or ["lr", "rho"])."""
    texts = [texts] if isinstance(texts, str) else texts or []
    return [k.strip() for t in texts for k in t.split(",") if k.strip()]


class RunCommand:
    """Train one configuration (per seed) and write results/<run_id>/.

    A flag under "Component parameters" sets that parameter in each component of the run that declares it (--rho is SAM's); --set NAME=VALUE takes short or full names (--set sam.rho=0.1). Precedence: defaults < --config FILE < flags < --set.
    """

    __name__ = "run"

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.Signature([inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                    annotation=ann) for name, ann, default in _run_options()])

    @property
    def __annotations__(self) -> dict:
        return {name: ann for name, ann, _ in _run_options()}

    def __call__(self, ctx: typer.Context, **kw):
        from bench.config import parse_seeds
        from bench.runner import run as run_one

        seeds, config, force, sets = kw.pop("seeds"), kw.pop("config"), kw.pop("force"), kw.pop("set_")
        core = {f.name: f for f in RunConfig.core()}
        typed = {k for k in kw if (src := ctx.get_parameter_source(k)) is not None and src.name != "DEFAULT"}
        given = {k: v for k, v in kw.items() if k in typed and v is not None}
        for k, v in given.items():
            if k in core and core[k].type == "tuple":
                given[k] = _floats(v, k.replace("_", "-"))
        values: dict = {}
        if config is not None:
            values = _read_toml(config)
            seeds = values.pop("seeds", seeds) if seeds is None else seeds  # a list, an int or "0-4"
            force = values.pop("force", force)
            if not isinstance(force, bool):
                raise UserError(f"--config {str(config)!r}: force must be true or false (got {force!r})")
        explicit = [(k, _typed(k, v)) for k, v in given.items() if k not in core] + _assignments(sets)
        try:
            from_file = RunConfig.from_dict(values)
        except UserError as e:
            raise UserError(f"--config {str(config)!r}: {e}") from None
        base = from_file.replace(**{k: v for k, v in given.items() if k in core}).with_params(explicit)
        _check_used(base, [k for k, _ in explicit])
        base.validate()  # once, before anything starts (the runner's own check is then a formality)
        if base.procs > 1 and base.backend == "simulated":
            base = base.replace(backend="dist")
        cfgs = [base.replace(seed=s) for s in (parse_seeds(seeds) if seeds is not None else [base.seed])]
        group, run_fn, quiet = contextlib.nullcontext(), run_one, False
        if base.backend == "dist":
            from bench import distributed

            if not distributed.under_torchrun():
                if base.procs < 2:
                    raise UserError(distributed.NEED_TORCHRUN)
                for summary in distributed.launch(cfgs, base.procs, force=force):
                    _print_run(summary)
                return
            group, run_fn = distributed.process_group(base), distributed.run_distributed
            quiet = os.environ.get("RANK", "0") != "0"  # one progress bar, on rank 0
        with group:
            for cfg in cfgs:
                summary = _run_with_progress(run_fn, cfg, force, quiet)
                if summary is not None:  # the other ranks of a torchrun job return None
                    _print_run(summary)


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple": str,
          "Optional[str]": str, "Optional[int]": int}
CLI_ONLY = ("seeds", "config", "force", "set_")


def _run_options() -> list[tuple[str, object, object]]:
    """(name, annotation, typer.Option) of every option of `run`: the core fields of RunConfig, one flag
    per component parameter name (all registered components, plug-ins included), and the CLI's own."""
    from algorithms.base import all_components

    d = RunConfig()  # option defaults come from RunConfig, in one place
    opts = [("ctx", typer.Context, inspect.Parameter.empty)]
    for f in RunConfig.core():
        flag = "--" + f.name.replace("_", "-")
        decls = f.metadata["flags"] or (f"{flag}/--no-{flag[2:]}" if f.type == "bool" else flag,)
        default = getattr(d, f.name)
        default = ",".join(f"{x:g}" for x in default) if isinstance(default, tuple) else default
        opts.append((f.name, Optional[_TYPES[f.type]], typer.Option(
            default, *decls, help=f.metadata["help"],
            rich_help_panel="Execution" if f.metadata["role"] == "execution" else None)))
    by_name: dict = {}
    for cls in all_components():
        for p in cls.params:
            by_name.setdefault(p.name, []).append((cls, p))
    for name, decl in sorted(by_name.items()):
        if name in RunConfig.core_names() or name in CLI_ONLY:
            continue  # reachable as --set COMPONENT.NAME=VALUE
        types = {p.type for _, p in decl}
        typ = decl[0][1].type if len(types) == 1 and tuple not in types else str
        flag = "--" + name.replace("_", "-")
        helps = {p.help for _, p in decl}
        if len(helps) == 1:  # one meaning: say it once, with every owner's default
            where = ", ".join(f"{c.name} {_show_default(p.default)}" for c, p in decl)
            text = f"{decl[0][1].help} (default: {where})"
        else:  # the same name means different things to different components: say each
            text = "; ".join(f"{c.name}: {p.help} (default {_show_default(p.default)})" for c, p in decl)
        opts.append((name, Optional[typ], typer.Option(
            None, f"{flag}/--no-{flag[2:]}" if typ is bool else flag, help=text,
            show_default=False, rich_help_panel="Component parameters")))
    opts += [
        ("seeds", Optional[str], typer.Option(None, help="Several seeds: 0,1,2 or 0-4 (overrides --seed).")),
        ("config", Optional[Path], typer.Option(None, help="TOML file of options (flags given here win).")),
        ("force", bool, typer.Option(False, "--force", help="Rerun even if a finished run exists.")),
        ("set_", Optional[List[str]], typer.Option(None, "--set", help="Component parameter NAME=VALUE, short or "
                                                                        "full name (sam.rho=0.1); repeatable.")),
    ]
    return opts


def _show_default(v) -> str:
    return ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else str(v)


def _typed(key: str, v):
    """A component flag's value: text for tuple-valued parameters (--betas 0.9,0.99) parsed as declared."""
    from algorithms.base import declared

    p = declared(key)[0][1]
    return p.parse(v, f"--{key.replace('_', '-')}") if isinstance(v, str) and p.type is not str else v


def _assignments(items) -> list[tuple[str, object]]:
    """--set NAME=VALUE items as (full-or-short name, value parsed with the declared type)."""
    from algorithms.base import check_key, declared

    out = []
    for item in items or []:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set {item!r}: use NAME=VALUE, e.g. --set sam.rho=0.1")
        k = check_key(key, "--set parameter")
        out.append((k, declared(k)[0][1].parse(text, f"--set {item}")))
    return out


def _check_used(cfg: RunConfig, keys: list[str]) -> None:
    """A parameter typed on the command line that none of the run's components declares is a mistake."""
    from algorithms.base import declared

    r = cfg.hyper()
    for k in r.unused:
        if k in keys:
            owners = sorted({c.name for c, _ in declared(k)})
            names = ", ".join(a.name for a in r.active)
            given = f"--set {k}" if "." in k else f"--{k.replace('_', '-')}"
            raise UserError(f"{given}: {cfg.algo} runs {names}, none of which has this parameter "
                            f"(it belongs to {', '.join(owners)}); choose a component with --grad/--opt/--comm")


app.command("run")(RunCommand())


def _run_with_progress(run_fn, cfg, force: bool, quiet: bool):
    from bench.runner import bar_progress

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err,
                  transient=True, disable=quiet or not err.is_terminal) as bar:
        task = bar.add_task(f"{cfg.algo} {cfg.topology} seed {cfg.seed}", total=None, info="")
        return run_fn(cfg, progress=bar_progress(bar, task), force=force)


def _read_toml(path: Path) -> dict:
    """The options of a --config file."""
    from bench.suites import tomllib  # tomllib, or tomli before Python 3.11

    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--config {str(path)!r}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--config {str(path)!r} is a folder; give a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {str(path)!r}: invalid TOML ({e})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"--config {str(path)!r}: not a TOML text file ({type(e).__name__})") from None
    except OSError as e:
        raise UserError(f"--config {str(path)!r}: cannot be read ({e.strerror})") from None


def _print_run(s: dict) -> None:
    from bench.runner import summary_line

    out.print(summary_line(s), highlight=False, soft_wrap=True)


@app.command()
def compare(
    ctx: typer.Context,
    results_dir: str = typer.Argument("results", help="Folder of runs (searched recursively)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv, md, tex, or runs (one CSV row per run)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write to FILE (.csv, .md or .tex)."),
    by: Optional[str] = typer.Option(None, help="Group by these keys, e.g. algo,topology (default: the config)."),
    columns: Optional[str] = typer.Option(None, help="Columns, e.g. test_acc,test_loss,top_eig,computation."),
    baseline: Optional[str] = typer.Option(None, help="Paired differences to this algo on shared seeds, e.g. csgd."),
    target_acc: Optional[float] = typer.Option(None, help="Steps and train seconds to this test accuracy (%)."),
    tune: Optional[List[str]] = typer.Option(None, help="Keep the value of KEY (e.g. lr) with the best mean val_acc "
                                                        "per configuration; repeatable or comma-separated "
                                                        "(default: a tuned suite's keys; none: every run)."),
    tune_seeds: Optional[str] = typer.Option(None, help="With --tune: choose on these seeds only and report the "
                                                        "others (e.g. 100-101); default: the suite's, if any."),
    robust: bool = typer.Option(False, "--robust", help="Also median \\[min, max] of test accuracy."),
    paired: Optional[str] = typer.Option(None, help="With --baseline: the paired differences shown, e.g. "
                                                    "test_acc,top_eig,adaptive_top_eig (default test_acc; the CSV "
                                                    "has all)."),
):
    """Leaderboard: group runs over seeds; mean ± std, 95% CI, failures, paired tests against a baseline."""
    from rich.text import Text

    from bench import leaderboard as lb
    from bench.config import parse_seeds

    if fmt not in lb.FORMATS:
        raise UserError(f"--format {fmt!r}: valid: {', '.join(lb.FORMATS)}")
    if out_file is not None:
        fmt = lb.format_from_path(str(out_file)) if fmt != "runs" else "runs"
    metrics = lb.DEFAULT_COLUMNS
    if columns:
        metrics = tuple(_keys(columns))
        bad = [c for c in metrics if c not in lb.COLUMNS]
        if bad:
            raise UserError(f"--columns: unknown metric {bad[0]!r}; valid: {', '.join(lb.COLUMNS)}")
    tune_keys = _tune_keys(tune, results_dir)
    warn = lambda m: err.print(f"[yellow]warning:[/yellow] {m}", soft_wrap=True)  # noqa: E731
    df = lb.runs_frame(results_dir, warn=warn)
    selected = df
    if tune_keys:
        seeds = parse_seeds(tune_seeds, "--tune-seeds") if tune_seeds is not None else _suite_tune_seeds(results_dir)
        selected, choices = lb.tune_runs(df, tune_keys, seeds, where=f" in {results_dir}")
        for m in lb.tune_warnings(choices, tune_keys, seeds):
            warn(m)
    elif tune_seeds is not None:
        raise UserError("--tune-seeds goes with --tune KEY (e.g. --tune lr --tune-seeds 100-101)")
    if paired is not None and baseline is None:
        raise UserError("--paired goes with --baseline ALGO (e.g. --baseline dsgd --paired test_acc,top_eig)")
    numeric, display = lb.leaderboard(selected, _keys(by) or None, metrics, baseline=baseline,
                                      target_acc=target_acc, tuned=tune_keys, robust=robust,
                                      where=f" in {results_dir}",
                                      paired=tuple(_keys(paired)) if paired else lb.PAIRED[:1])
    prov = lb.provenance(selected, _command_line(ctx))
    if out_file is not None:
        text = lb.render(numeric, display, fmt, prov, runs=selected)
        try:
            out_file.write_text(text)
        except OSError as e:
            raise UserError(f"--out {str(out_file)!r}: cannot write ({e.strerror})") from None
        err.print(f"wrote {out_file}")
        return
    if fmt == "table":
        title = f"dsgdbench leaderboard ({len(df)} runs in {results_dir}"
        title += f"; {len(selected)} reported by --tune {','.join(tune_keys)})" if tune_keys else ")"
        t = Table(title=title, caption="\n".join(display.attrs.get("notes", [])) or None)
        left = lb.text_columns(display)
        for c in display.columns:
            t.add_column(Text(str(c)), justify="left" if c in left else "right")
        for _, r in display.iterrows():
            t.add_row(*[Text(str(v)) for v in r])
        out.print(t)
    else:
        sys.stdout.write(lb.render(numeric, display, fmt, prov, runs=selected))


def _suite_info(results_dir: str) -> dict:
    """What a suite recorded in its results folder (suite.json), or {}."""
    f = Path(results_dir) / "suite.json"
    try:
        data = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _suite_tune_seeds(results_dir: str):
    """The tuning seeds a suite recorded in its results folder (suite.json), else None."""
    seeds = _suite_info(results_dir).get("tune_seeds")
    return list(seeds) if isinstance(seeds, list) and seeds else None


def _tune_keys(tune, results_dir: str) -> list[str]:
    """--tune KEYS; without it, a tuned suite's own keys (its folder mixes the tuning runs of every
    grid value with the report runs, which only make sense tuned); --tune none: every run."""
    keys = _keys(tune)
    if keys == ["none"]:
        return []
    if keys:
        return keys
    suite = _suite_info(results_dir).get("tune")
    if isinstance(suite, list) and suite and all(isinstance(k, str) for k in suite):
        err.print(f"tuned suite (suite.json): --tune {','.join(suite)} on seeds "
                  f"{','.join(map(str, _suite_tune_seeds(results_dir) or []))}; --tune none shows every run",
                  markup=False, highlight=False, soft_wrap=True)
        return list(suite)
    return []


def _command_line(ctx: typer.Context) -> str:
    """The command as typed (its parameters as given on the command line), for the provenance of a table."""
    import shlex

    words = ctx.command_path.split()
    words[0] = "dsgdbench"
    for p in ctx.command.params:
        src = ctx.get_parameter_source(p.name)
        v = ctx.params.get(p.name)
        if src is None or src.name != "COMMANDLINE" or v is None:
            continue
        if p.param_type_name == "argument":
            words.append(str(v))
            continue
        flag = max(p.opts, key=len)
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            words += [flag] if item is True else ([] if item is False else [flag, str(item)])
    return shlex.join(words)


@app.command()
def suite(
    name: str = typer.Argument(..., help="A shipped suite (dsgdbench list suites) or a FILE.toml."),
    results_dir: Optional[str] = typer.Option(None, "--results", help="Results folder (default: the suite's)."),
    seeds: Optional[str] = typer.Option(None, help="Seeds of every configuration, 0,1,2 or 0-4 (default: the suite's)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs (done or to do) and train nothing."),
    filter_: Optional[List[str]] = typer.Option(None, "--filter", help="Keep runs whose KEY is one of VALUE[,VALUE...], "
                                                                       "e.g. algo=csgd,dsgd; repeatable."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Set KEY=VALUE for every run, e.g. epochs=2 or "
                                                                 "device=cpu; repeatable."),
    data_dir: Optional[str] = typer.Option(None, help="Folder holding image data sets (CIFAR)."),
    force: bool = typer.Option(False, "--force", help="Rerun finished runs (otherwise they are skipped)."),
    max_runs: int = typer.Option(2000, help="Refuse a suite that expands to more configurations than this."),
):
    """Run a grid of configurations; finished runs are skipped, so running it again continues."""
    from bench import suites

    if max_runs < 1:
        raise UserError(f"--max-runs must be >= 1 (got {max_runs})")
    plan = suites.plan(suites.load_suite(name), results=results_dir, seeds=seeds, filters=filter_ or [],
                       overrides=set_ or [], data_dir=data_dir, force=force, check_run=not dry_run,
                       max_runs=max_runs)
    if dry_run:
        out.print(suites.plan_table(plan))
        out.print(suites.plan_counts(plan), highlight=False, markup=False)
        return
    from bench import suite_run

    suite_run.execute(plan, out, err)


@app.command("list")
def list_(what: str = typer.Argument("all", help="algorithms, components, topologies, datasets, models, suites "
                                                    "or all.")):
    """List the registered names and the shipped suites."""
    from rich.text import Text

    import algorithms
    import topologies
    from algorithms.base import registries
    from bench import suites
    from bench.data import DATASETS
    from bench.models import MODELS

    sections = {
        "algorithms": [(n, f"{algorithms.PRESETS.help(n)}  [{algorithms.PRESETS.get(n)}]")
                       for n in algorithms.PRESETS],
        "components": [(f"--{kind} {n}", _component_help(reg, n)) for kind, reg in algorithms.KINDS.items()
                       for n in reg] + [(f"{p.registry.kind} {n}", _component_help(p.registry, n))
                                        for reg in registries()[len(algorithms.KINDS):] for n in reg
                                        for p in [_named_by(reg)]],
        "topologies": [(n, topologies.TOPOLOGIES.help(n)) for n in topologies.TOPOLOGIES],
        "datasets": [(n, DATASETS.help(n)) for n in DATASETS],
        "models": [(n, MODELS.help(n)) for n in MODELS] + [("timm:<name>", "any timm model, randomly initialised")],
        "suites": [(n, Text(h)) for n, h in suites.listing()] if what in ("all", "suites") else [],
    }
    if what != "all" and what not in sections:
        from bench.registry import unknown_name

        raise UserError(unknown_name("list", what, list(sections) + ["all"]))
    for name, items in sections.items():
        if what in ("all", name):
            t = Table(title=name, show_header=False)
            t.add_column(style="bold")
            t.add_column()
            for k, h in items:
                t.add_row(k, h)
            out.print(t)


def _component_help(reg, name: str) -> str:
    """One line of help, then one line per parameter: --flag TYPE = default  help."""
    cls = reg.get(name)
    lines = [reg.help(name)]
    for p in cls.params:
        lines.append(f"  --{p.name.replace('_', '-')} ({cls.name}.{p.name}) {p.describe_type()} "
                     f"= {_show_default(p.default)}  {p.help}")
    return "\n".join(lines)


def _named_by(reg):
    """The component-valued parameter that chooses from this registry."""
    from algorithms.base import all_components

    return next(p for c in all_components() for p in c.params if p.registry is reg)


@app.command()
def topology(
    name: str = typer.Argument(..., help="Topology spec, e.g. ring, torus:4x4, file:W.npy."),
    workers: int = typer.Option(16, "--workers", "-n"),
    fmt: str = typer.Option("table", "--format", "-f", help="table or json."),
    model: str = typer.Option("cnn1d", help="Model whose size gives bytes/step (on mnist1d shapes)."),
):
    """Spectral and communication properties of a topology."""
    import topologies
    from bench.models import build_model
    from bench.workers import count_params

    if fmt not in ("table", "json"):
        raise UserError(f"--format {fmt!r}: valid: table, json")
    if workers < 1:
        raise UserError(f"--workers must be >= 1 (got {workers})")
    topo = topologies.get_topology(name, workers)
    props = dict(topo.properties())
    d = count_params(build_model(model, (1, 40), 10) if model in ("mlp", "cnn1d") else build_model(model, (3, 32, 32), 10))
    props["bytes_per_step"] = props["sends_per_step"] * d * 4
    props["bytes_model"] = f"{model} ({d} fp32 parameters)"
    if fmt == "json":
        sys.stdout.write(json.dumps(props, indent=2, default=float) + "\n")
        return
    t = Table(title=f"{name}, n = {workers}", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    for k, v in props.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(t)


@app.command()
def landscape(
    run_dirs: List[Path] = typer.Argument(..., help="One or more run folders (results/<run_id>)."),
    dim: int = typer.Option(1, help="1: curves of every run in one figure; 2: contour of the first run."),
    out_file: Path = typer.Option(Path("landscape.png"), "--out", help="PNG file to write."),
    points: int = typer.Option(25, help="Grid points per axis."),
    span: float = typer.Option(1.0, help="Extent of the grid along each direction: alpha in [-span, span]."),
    samples: Optional[int] = typer.Option(None, help="Training samples (default: the run's Hessian subset)."),
    seed: int = typer.Option(0, help="Seed of the random directions."),
):
    """Loss along filter-normalised random directions (Li et al. 2018) around the averaged model."""
    from bench.landscape import load_run_model, plot_landscape

    runs = []
    for d in run_dirs:
        module, data, idx = load_run_model(d, samples)
        label = d.name
        try:
            s = json.loads((d / "summary.json").read_text())
            label = f"{s['algo']} {s['topology']} seed {s['seed']}"
        except (OSError, ValueError, KeyError):
            pass
        runs.append((label, module, data, idx))
    plot_landscape(runs, dim=dim, points=points, span=span, seed=seed, out=str(out_file))
    err.print(f"wrote {out_file}")


@app.command()
def speed(
    device: str = typer.Option("cpu", help="cpu or cuda."),
    workers: int = typer.Option(16, "--workers", "-n"),
    repeats: Optional[int] = typer.Option(None, help="Timed steps per measurement (default: 50 on cpu, 10 on cuda)."),
    threads: int = typer.Option(0, help="torch threads (0: leave as is)."),
    models: Optional[str] = typer.Option(None, help="Models of the executor tables (cuda default: resnet18; "
                                                    "giving it on cpu times these instead of the cpu report)."),
    batches: Optional[str] = typer.Option(None, help="Local batches of the executor tables (default 64,512)."),
    precisions: str = typer.Option("fp32,bf16", help="fp32 and/or bf16 (executor tables)."),
    layouts: str = typer.Option("nchw,nhwc", help="nchw and/or nhwc = channels-last (executor tables)."),
    executors: str = typer.Option("loop,vmap,native", help="Executors to compare (native where the model has one)."),
    warmup: int = typer.Option(3, help="Untimed steps of every variant before timing."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile every variant (executor tables)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Also write the tables to FILE (.json or .md)."),
    scale: bool = typer.Option(False, "--scale", help="cpu: how the cost grows with n (16 to 4096 workers, local "
                                                      "batch 8): step vs single model, per sample, mixing alone."),
):
    """Steps per second: simulated D-SGD per executor vs a plain single-model SGD step at the same total batch.

    cpu (default): the simulator's overhead for cnn1d and cnn, and loop vs vectorized executors for
    the default model. cuda: resnet18 on 32x32, 16 workers, local batch 64 and 512, fp32/bf16,
    NCHW/channels-last, and the projected time of the zhu2023-fig1 run at total batch 8192.
    All variants of a table are timed interleaved in one process; medians.
    """
    from bench import speed as sp

    def names(text, what, valid=None, conv=str):
        try:
            vals = [conv(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--{what} {text!r}: give comma-separated values") from None
        bad = [v for v in vals if valid is not None and v not in valid]
        if bad or not vals:
            raise UserError(f"--{what} {text!r}: valid values: {', '.join(map(str, valid or ()))}")
        return tuple(vals)

    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: valid: cpu, cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    if workers < 1:
        raise UserError(f"--workers must be >= 1 (got {workers})")
    exs = names(executors, "executors", ("loop", "vmap", "native"))
    if scale and (device != "cpu" or workers != 16):
        raise UserError("--scale times the CPU simulator at n = 16 to 4096 itself; drop --device/--workers")
    log = lambda m: err.print(f"[dim]{m}[/dim]")  # noqa: E731
    load = sp.machine_load()
    if load is not None and load > sp.BUSY:
        err.print(f"[yellow]warning:[/yellow] the machine is busy (load {load:.2f} per core): timings and their "
                  f"ratios are unreliable; rerun when it is quiet")
    if scale:
        if threads:
            import torch

            torch.set_num_threads(threads)
        tables = sp.scale_report(repeats=repeats or 5, log=log)
    elif device == "cpu" and models is None and batches is None:
        tables = sp.cpu_report(workers, repeats or 50, threads, log, exs)
    else:
        if threads:
            import torch

            torch.set_num_threads(threads)
        from bench.models import MODELS

        mods = names(models or "resnet18", "models", list(MODELS) + [m.strip() for m in (models or "").split(",")
                                                                      if m.strip().startswith("timm:")])
        bs = names(batches or "64,512", "batches", None, int)
        if any(b < 1 for b in bs):
            raise UserError(f"--batches {batches!r}: batches are positive integers")
        tables = sp.gpu_report(mods, bs, names(precisions, "precisions", ("fp32", "bf16")),
                               names(layouts, "layouts", ("nchw", "nhwc")), workers, repeats or 10, warmup, exs,
                               compile, device, log)

    end = sp.machine_load()
    if end is not None and load is not None:
        tables = {f"{t} [load/core {load:.2f} before, {end:.2f} after]": rows for t, rows in tables.items()}
    cell = sp.cell
    for title, rows in tables.items():
        if not rows:
            continue
        cols = list(rows[0])
        if "step" in cols:  # an executor table: what every row shares is in the title
            cols = ["step", "ms", "min-max ms", "steps/s", "vs single", "vs loop"] + (
                ["note"] if any(r["note"] for r in rows) else [])
        t = Table(title=title)
        for c in cols:
            t.add_column(c, justify="left" if c in ("model", "step", "run", "note", "executor") else "right")
        for r in rows:
            t.add_row(*[cell(r[c]) for c in cols])
        out.print(t)
    if out_file is not None:
        text = json.dumps(tables, indent=2) + "\n" if out_file.suffix == ".json" else sp.to_markdown(tables)
        try:
            out_file.write_text(text)
        except OSError as e:
            raise UserError(f"--out {str(out_file)!r}: cannot write ({e.strerror})") from None
        err.print(f"wrote {out_file}")

@app.command()
def plot(
    results_dir: str = typer.Argument("results", help="Folder of runs (searched recursively)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the PNG files (default: DIR/plots)."),
    by: Optional[str] = typer.Option(None, help="Group runs into curves by these keys, e.g. algo,topology "
                                                "(default: the config)."),
    tune: Optional[List[str]] = typer.Option(None, help="Plot only the value of KEY (e.g. lr) with the best mean "
                                                        "val_acc per configuration, as compare --tune does "
                                                        "(default: a tuned suite's keys; none: every run)."),
    tune_seeds: Optional[str] = typer.Option(None, help="With --tune: choose on these seeds, plot the others "
                                                        "(default: the suite's tune_seeds in DIR/suite.json)."),
):
    """Figures: test accuracy vs step, consensus distance vs step, top-1 eigenvalue vs test accuracy."""
    from bench import leaderboard as lb
    from bench.config import parse_seeds
    from bench.plots import make_plots

    df = lb.runs_frame(results_dir, warn=lambda m: err.print(f"[yellow]warning:[/yellow] {m}"))
    if df.empty:
        raise UserError(f"no finished runs in {results_dir!r}; run `dsgdbench run` first or pass the folder")
    tune_keys = _tune_keys(tune, results_dir)
    if tune_keys:
        seeds = parse_seeds(tune_seeds, "--tune-seeds") if tune_seeds is not None else _suite_tune_seeds(results_dir)
        df = lb.tune_runs(df, tune_keys, seeds, where=f" in {results_dir}")[0]
    elif tune_seeds is not None:
        raise UserError("--tune-seeds goes with --tune KEY (e.g. --tune lr --tune-seeds 100-101)")
    keys = _keys(by) or None
    paths = make_plots(df, out_dir if out_dir is not None else Path(results_dir) / "plots", by=keys,
                       note=lambda m: err.print(m, markup=False, highlight=False, soft_wrap=True))
    for p in paths:
        out.print(f"wrote {p}", markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    from bench.results import versions

    versions()  # the revision of the code loaded now, whatever is committed while a long suite runs
    app()


if __name__ == "__main__":
    main()
