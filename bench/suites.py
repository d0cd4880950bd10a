"""Suites: a grid of run configurations in one TOML file, run and resumed as one job.

    dsgdbench suite quick                       # a shipped suite (dsgdbench list suites)
    dsgdbench suite my_suite.toml --dry-run     # or a file: list the runs, train nothing

The format (every key and table is optional: an empty file is one default run per seed):

    name = "quick"                  # default: the file's stem
    description = "one line"        # shown by `dsgdbench list suites`
    seeds = [0, 1, 2]               # or "0-4"; default [0]; --seeds overrides
    results = "results/quick"       # default results/<name>; --results overrides

    [base]                          # RunConfig fields shared by every run
    dataset = "mnist1d"
    workers = 16

    [per_algo.lamb]                 # RunConfig fields for the runs of one algorithm only
    lr = 0.01

    [grid]                          # cartesian product: every key is a field, every value a list
    algo = ["csgd", "dsgd"]
    topology = ["ring", "torus"]

    [[variants]]                    # optional list of tables, crossed with the grid: values that
    batch = 64                      # go together (batch and its learning rate)
    lr = 0.1
    [[variants]]
    batch = 512
    lr = 0.8

Keys are RunConfig fields (the long names of `dsgdbench run`'s options, `-` or `_`) and
component parameters, by short name ("rho", set in every component of a run that declares
it, ignored by the others) or full name ("sam.rho"; a table [base.sam] or a dotted key
sam.rho = 0.1 is the same).
A field whose value is itself a list (milestones, betas) takes a list of lists in [grid].

Expansion. For every seed, every grid point and every variant, the configuration is

    RunConfig defaults < [base] < [per_algo.<algo>] < grid point < variant < --set KEY=VALUE

where <algo> is the algorithm the run ends up with. Runs are made seed by seed (every
configuration of seed 0 first), then in grid order (first key outermost), then variant by
variant. An empty [grid] table or list, a grid value that is not a list, and a key that
is not a RunConfig field are errors. A key may not be both in [grid] and in
[[variants]], nor in a per_algo table and in [grid]/[[variants]] (the later one would hide it
for every run). `seed` and `results` are top-level settings, never fields of a table.

Every configuration is built and validated before anything runs: an unknown key, name or
value, a topology that does not fit the number of workers, a batch larger than a worker's
shard, a missing data set or device stops the suite with one line before the first step. Configurations that resolve to
the same run (csgd crossed with several topologies: all-reduce has no topology) are one run,
found by run id. `--filter KEY=V1[,V2...]` keeps the runs whose field, as the suite writes
it or as resolved, is one of the values (repeat it for several keys). A run whose folder
already holds a finished summary counts as done and is skipped (`--force` reruns it), so a
suite that was interrupted continues where it stopped.

On the command line: --seeds replaces the suite's seeds, --results its folder, --set KEY=VALUE
(repeatable) sets a field of every run after everything else (e.g. --set device=cpu),
--data-dir is --set data_dir=DIR, --dry-run prints the plan (done/todo) and trains nothing.

Relative paths (results, data_dir, init) are relative to the current folder. The shipped
suites are the TOML files in bench/suites/ (package data, read with importlib.resources).
Planning reads no data: sizes come from the data sets' declared facts (bench.data.dataset_info).
Running a plan is bench/suite_run.py.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional

from algorithms.base import all_components, check_key, declared, normalize_key
from bench import results as results_io
from bench.config import RunConfig, parse_seeds
from bench.errors import UserError
from bench.registry import unknown_name

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

TOP_LEVEL = ("name", "description", "seeds", "results", "base", "per_algo", "grid", "variants", "tune", "tune_seeds")
# Fields that are suite-wide settings rather than per-run values.
NOT_IN_TABLES = {"seed": "seeds = [...]", "seeds": "seeds = [...]", "results": "results = \"DIR\""}
FIELD_TYPES = {f.name: f.type for f in RunConfig.core()}


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    seeds: tuple[int, ...]
    results: str
    base: dict
    per_algo: dict
    grid: dict
    variants: tuple
    source: str  # the file it came from
    per_algo_grid: dict = field(default_factory=dict)  # algo -> {key: values} replacing [grid]'s for that algo
    tune: tuple = ()  # grid keys chosen on the tuning seeds (validation accuracy)
    tune_seeds: tuple = ()  # seeds used only to choose; `seeds` are then the report seeds


@dataclass
class PlannedRun:
    cfg: RunConfig  # as the suite writes it (what runner.run takes)
    resolved: RunConfig
    run_id: str
    finished: bool  # a finished summary is already on disk
    phase: str = "report"  # "tune" (a tuning seed) or "report"


@dataclass
class Plan:
    suite: Suite
    results: str
    runs: list[PlannedRun]
    force: bool = False
    expanded: int = 0  # configurations before --filter and de-duplication
    filtered_out: int = 0
    merged: int = 0  # configurations that were the same run as an earlier one
    notes: list[str] = field(default_factory=list)
    pending: int = 0  # report runs of a tuned suite, planned once its tuning runs are finished
    replan: object = None  # plan() again with the same arguments (a tuned suite's report runs)
    choices: list = field(default_factory=list)  # (configuration, chosen values, candidates, edge) of a tuned suite

    @property
    def done(self) -> list[PlannedRun]:
        return [] if self.force else [r for r in self.runs if r.finished]

    @property
    def todo(self) -> list[PlannedRun]:
        return self.runs if self.force else [r for r in self.runs if not r.finished]


# ----------------------------------------------------------------------------------------------
# Reading a suite


def _shipped_dir():
    return resources.files("bench").joinpath("suites")


def shipped_names() -> list[str]:
    return sorted(p.name[:-5] for p in _shipped_dir().iterdir() if p.name.endswith(".toml"))


def load_suite(ref: str) -> Suite:
    """A shipped suite by name, or a TOML file by path."""
    path = Path(ref)
    is_path = ref.endswith(".toml") or "/" in ref or "\\" in ref
    if is_path or (ref not in shipped_names() and path.is_file()):
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UserError(f"suite file {ref!r}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"suite file {ref!r}: cannot be read ({e})") from None
        return parse_suite(text, path.stem, ref)
    if ref not in shipped_names():
        raise UserError(unknown_name("suite", ref, shipped_names()) + " (or give a FILE.toml)")
    return parse_suite(_shipped_dir().joinpath(f"{ref}.toml").read_text(), ref, f"{ref} (shipped)")


def parse_suite(text: str, default_name: str, source: str) -> Suite:
    """Check the structure of a suite file; the values are checked when the runs are built."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"suite {source}: invalid TOML ({e})") from None
    for k in data:
        if k not in TOP_LEVEL:
            hint = " (a field for every run goes in [base])" if _field(k) else ""
            raise UserError(f"suite {source}: " + unknown_name("top-level key", k, TOP_LEVEL) + hint)
    name = _string(data, "name", default_name, source)
    where = f"suite {name}"
    description = _string(data, "description", "", source)
    results = _string(data, "results", f"results/{name}", source)
    seeds = _suite_seeds(data.get("seeds", [0]), where)

    base = _table(data.get("base", {}), f"{where}: [base]")
    per_algo_raw = data.get("per_algo", {})
    if not isinstance(per_algo_raw, dict):
        raise UserError(f"{where}: per_algo must be tables, e.g. [per_algo.lamb] with lr = 0.01")
    import algorithms

    per_algo, per_algo_grid = {}, {}
    for algo, table in per_algo_raw.items():
        algorithms.PRESETS.get(algo)  # an unknown algorithm: one line with the valid names
        table = dict(table) if isinstance(table, dict) else table
        own_grid = table.pop("grid", None) if isinstance(table, dict) else None
        per_algo[algo] = _table(table, f"{where}: [per_algo.{algo}]")
        if "algo" in per_algo[algo]:
            raise UserError(f"{where}: [per_algo.{algo}] cannot set algo")
        if own_grid is not None:
            per_algo_grid[algo] = _grid(own_grid, f"{where}: [per_algo.{algo}.grid]")

    grid = _grid(data.get("grid"), where)
    for algo, g in per_algo_grid.items():
        extra = sorted(set(g) - set(grid))
        if extra:
            raise UserError(f"{where}: [per_algo.{algo}.grid] sets {extra[0]!r}, which is not in [grid]; a per-algorithm "
                            f"grid replaces values of [grid] keys")
    tune = data.get("tune", [])
    if not isinstance(tune, list) or not all(isinstance(k, str) for k in tune):
        raise UserError(f"{where}: tune must be a list of [grid] keys, e.g. tune = [\"lr\"]")
    tune = tuple(dict.fromkeys(_check_key(k, f"{where}: tune") for k in tune))
    missing = [k for k in tune if k not in grid]
    if missing:
        raise UserError(f"{where}: tune key {missing[0]!r} is not in [grid]; tuning chooses among grid values")
    tune_seeds = _suite_seeds(data["tune_seeds"], where) if "tune_seeds" in data else ()
    if bool(tune) != bool(tune_seeds):
        raise UserError(f"{where}: tune and tune_seeds go together: tune = [\"lr\"] chooses on tune_seeds, then "
                        f"the chosen values run on seeds")
    if set(tune_seeds) & set(seeds):
        raise UserError(f"{where}: tune_seeds and seeds share {sorted(set(tune_seeds) & set(seeds))[0]}: the seeds "
                        f"a value is chosen on must not be reported")
    variants = _variants(data.get("variants"), where)
    variant_keys = {k for v in variants for k in v}
    both = sorted(set(grid) & variant_keys)
    if both:
        raise UserError(f"{where}: {both[0]!r} is both in [grid] and in [[variants]]; put it in one of them")
    for algo, table in per_algo.items():
        for k in table:
            if k in grid or k in variant_keys:
                other = "[grid]" if k in grid else "[[variants]]"
                raise UserError(f"{where}: [per_algo.{algo}] sets {k!r}, which {other} also sets for every run; "
                                f"remove one of them")
    return Suite(name, description, seeds, results, base, per_algo, grid, variants, source, per_algo_grid, tune,
                 tune_seeds)


def _field(key: str) -> Optional[str]:
    """The normalized name of a core field or a component parameter, None if neither."""
    k = key.replace("-", "_")
    if k in FIELD_TYPES:
        return k
    nk = normalize_key(key)
    return nk if declared(nk) else None


def _string(data: dict, key: str, default: str, source: str) -> str:
    v = data.get(key, default)
    if not isinstance(v, str) or (key != "description" and not v.strip()):
        raise UserError(f"suite {source}: {key} must be a non-empty string (got {v!r})")
    return v


def _suite_seeds(v: Any, where: str) -> tuple[int, ...]:
    return tuple(dict.fromkeys(parse_seeds(v, f"{where}: seeds")))


def _table(table: Any, where: str) -> dict:
    """A table of options: keys normalized, each value type-checked on its own."""
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table of options (got {table!r})")
    out = {}
    for k, v in _flatten(table, where).items():
        key = _check_key(k, where)
        _check_value(key, v, where)
        out[key] = v
    return out


def _flatten(table: dict, where: str) -> dict:
    """A nested table of one component's parameters ([base.sam] rho = 0.1, or sam.rho = 0.1) as full names."""
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            for name, val in v.items():
                if isinstance(val, dict):
                    raise UserError(f"{where}: {k}.{name} must be a value, not a table")
                out[f"{k}.{name}"] = val
        else:
            out[k] = v
    return out


def _check_key(k: str, where: str) -> str:
    key = k.replace("-", "_")
    if key in NOT_IN_TABLES:
        raise UserError(f"{where}: {k!r} is a top-level setting of the suite ({NOT_IN_TABLES[key]})")
    if key in FIELD_TYPES:
        return key
    if "." in k or _field(k):
        return check_key(k, f"{where}: option")
    names = sorted(FIELD_TYPES) + sorted({p.name for c in all_components() for p in c.params})
    raise UserError(f"{where}: " + unknown_name("option", k, names))


def _check_value(key: str, v: Any, where: str) -> None:
    try:
        if key in FIELD_TYPES:
            RunConfig.from_dict({key: v})
        else:
            declared(key)[0][1].coerce(v, f"option {key!r}")
    except UserError as e:
        hint = " (in [grid], a list-valued field takes a list of lists)" if (
            "grid" in where and _is_tuple(key)) else ""
        raise UserError(f"{where}: {e}{hint}") from None


def _is_tuple(key: str) -> bool:
    if key in FIELD_TYPES:
        return FIELD_TYPES[key].startswith("tuple")
    return declared(key)[0][1].type is tuple


def _grid(grid: Any, where: str) -> dict:
    if grid is None:
        return {}
    if not isinstance(grid, dict):
        raise UserError(f"{where}: [grid] must be a table of lists, e.g. algo = [\"csgd\", \"dsgd\"]")
    if not grid:
        raise UserError(f"{where}: [grid] is empty; give KEY = [values...] or remove the table")
    out = {}
    for k, values in _flatten(grid, f"{where}: [grid]").items():
        key = _check_key(k, f"{where}: [grid]")
        if not isinstance(values, list):
            raise UserError(f"{where}: [grid] {k} must be a list of values, e.g. {k} = [{_toml(values)}]")
        if not values:
            raise UserError(f"{where}: [grid] {k} is an empty list; give at least one value")
        for v in values:
            _check_value(key, v, f"{where}: [grid] {k}")
        out[key] = list(dict.fromkeys(_hashable(v) for v in values))
    return out


def _variants(variants: Any, where: str) -> tuple:
    if variants is None:
        return ({},)
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise UserError(f"{where}: variants must be a list of tables ([[variants]] blocks)")
    if not variants:
        raise UserError(f"{where}: variants is an empty list; give at least one [[variants]] table")
    return tuple(_table(v, f"{where}: [[variants]] #{i + 1}") for i, v in enumerate(variants))


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def _toml(v) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


# ----------------------------------------------------------------------------------------------
# Command-line values: --filter KEY=V1,V2 and --set KEY=VALUE


def _parse_text(key: str, text: str, flag: str):
    """A command-line string as a value of the core field or parameter `key`."""
    if key not in FIELD_TYPES:
        return declared(key)[0][1].parse(text, f"{flag} {key}")
    typ = FIELD_TYPES[key]
    optional = typ.startswith("Optional[")
    base = typ[9:-1] if optional else typ
    t = text.strip()
    if optional and t.lower() in ("none", "null"):
        return None
    try:
        if base == "bool":
            if t.lower() in ("true", "1", "yes", "on"):
                return True
            if t.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base == "int":
            return int(t)
        if base == "float":
            return float(t)
        if base.startswith("tuple"):
            return tuple(float(x) for x in t.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{flag} {key}={text!r}: expected {base}") from None
    return t


def _assignment(item: str, flag: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
        raise UserError(f"{flag} {item!r}: use KEY=VALUE, e.g. {flag} algo=dsgd")
    k = _field(key.strip())
    if k is None:
        return _check_key(key.strip(), f"{flag} {item!r}"), value  # raises, with the valid names
    return k, value


def parse_filters(items: Iterable[str]) -> dict[str, list]:
    out: dict[str, list] = {}
    for item in items:
        key, text = _assignment(item, "--filter")
        if _is_tuple(key):
            raise UserError(f"--filter {item!r}: list-valued fields ({key}) cannot be filtered on")
        values = [_parse_text(key, t, "--filter") for t in text.split(",") if t.strip()]
        if not values:
            raise UserError(f"--filter {item!r}: give at least one value, e.g. --filter {key}=VALUE")
        out.setdefault(key, []).extend(values)
    return out


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, text = _assignment(item, "--set")
        if key in NOT_IN_TABLES:
            raise UserError(f"--set {item!r}: use --{'seeds' if key.startswith('seed') else key} instead")
        out[key] = _parse_text(key, text, "--set")
    return out


def _matches(cfg: RunConfig, resolved: RunConfig, filters: dict[str, list]) -> bool:
    """Whether the run's field (as written or resolved) or active parameter is one of the values."""
    def ok(k, vs):
        if k in FIELD_TYPES:
            return getattr(cfg, k) in vs or getattr(resolved, k) in vs
        return any(v in vs for kk, v in resolved.params if k in (kk, kk.rpartition(".")[2]))

    return all(ok(k, vs) for k, vs in filters.items())


# ----------------------------------------------------------------------------------------------
# Expansion and planning


def expand(suite: Suite, seeds: Optional[Iterable[int]] = None, overrides: Optional[dict] = None,
           results: Optional[str] = None) -> list[RunConfig]:
    """Every configuration of the suite, validated, in running order (seed, then grid, then variant).

    The grid's algo values are outermost; an algorithm's own grid ([per_algo.X.grid]) replaces the
    values of those keys for its runs.
    """
    overrides = overrides or {}
    out = []
    for seed in (list(seeds) if seeds is not None else suite.seeds):
        for point in grid_points(suite):
            for variant in suite.variants:
                written = {**suite.base, **point, **variant, **overrides}
                algo = written.get("algo", RunConfig.algo)
                d = {**suite.base, **suite.per_algo.get(algo, {}), **point, **variant, **overrides,
                     "seed": seed, "results": results or suite.results}
                where = ", ".join(f"{k}={v}" for k, v in {**point, **variant}.items())
                try:
                    out.append(RunConfig.from_dict(d).validate())
                except UserError as e:
                    raise UserError(f"suite {suite.name}" + (f" ({where})" if where else "") + f": {e}") from None
    return out


def grid_points(suite: Suite) -> list[dict]:
    """The grid's points: algo outermost, each algorithm with its own grid where it has one."""
    algos = suite.grid.get("algo", [None])
    out = []
    for a in algos:
        g = {k: v for k, v in suite.grid.items() if k != "algo"}
        g.update(suite.per_algo_grid.get(a, {}) if a is not None else {})
        keys = list(g)
        for values in itertools.product(*(g[k] for k in keys)):
            out.append(({"algo": a} if a is not None else {}) | dict(zip(keys, values)))
    return out


def n_points(suite: Suite) -> int:
    return len(grid_points(suite)) if suite.grid else 1


def plan(suite: Suite, results: Optional[str] = None, seeds: Optional[str] = None,
         filters: Iterable[str] = (), overrides: Iterable[str] = (), data_dir: Optional[str] = None,
         force: bool = False, check_run: bool = True, max_runs: int = 2000) -> Plan:
    """Build, validate, resolve, filter and de-duplicate the runs of a suite; nothing is trained.

    check_run: the suite is about to run, so the data sets must be readable and the device
    present (a dry run only notes what is missing). A tuned suite (tune, tune_seeds) plans its
    tuning runs (every grid point on the tuning seeds, without the Hessian) and, once they are all
    finished, its report runs: each configuration's chosen value on the report seeds (choose_tuned
    states the rule).
    """
    over = parse_overrides(overrides)
    if data_dir is not None:
        over["data_dir"] = data_dir
    keep = parse_filters(filters)
    root = results or suite.results
    seed_list = parse_seeds(seeds) if seeds is not None else list(suite.seeds)
    per_point = len(suite.variants) * (math.prod(len(v) for v in suite.grid.values()) if suite.grid else 1)
    count = per_point * (len(suite.tune_seeds) + len(seed_list))  # an upper bound, before anything is built
    if count > max_runs:
        raise UserError(f"suite {suite.name} expands to {count} configurations, more than {max_runs}; narrow it "
                        f"(--seeds, fewer grid values) or allow it with --max-runs {count}")
    p = Plan(suite, root, [], force)
    p.replan = lambda: plan(suite, results, seeds, filters, overrides, data_dir, force, check_run, max_runs)
    ctx = {"sizes": {}, "graphs": set(), "seen": set(), "keep": keep, "check_run": check_run}
    if suite.tune:  # the tuning runs skip the Hessian: it plays no part in the choice
        _add_runs(p, [c.replace(hessian=False) for c in expand(suite, suite.tune_seeds, over, root)], "tune", ctx)
        tuning = [r for r in p.runs if r.phase == "tune"]
        if any(r.finished for r in tuning) or not tuning:
            p.choices = choose_tuned(suite, tuning, root)
        if tuning and all(r.finished for r in tuning):
            chosen = [c["cfg"] for c in p.choices]  # a tuning run's configuration: its Hessian setting back
            _add_runs(p, [c.replace(seed=s, hessian=_written(suite, c.algo, "hessian", over))
                          for s in seed_list for c in chosen], "report", ctx)
        else:
            p.pending = len({_config_key(suite, r) for r in tuning}) * len(seed_list)
            p.notes.append(f"the report runs ({p.pending}: each configuration's chosen "
                           f"{', '.join(suite.tune)} on seeds {_seed_text(seed_list)}) are planned once the "
                           f"{len(tuning)} tuning runs (seeds {_seed_text(suite.tune_seeds)}) are finished")
    else:
        _add_runs(p, expand(suite, seed_list, over, root), "report", ctx)
    if not p.runs:
        what = " ".join(f"--filter {k}={','.join(map(str, v))}" for k, v in keep.items())
        raise UserError(f"suite {suite.name}: {what} matches none of its {p.expanded} configurations")
    return p


def _config_text(suite: Suite, cfg: RunConfig) -> str:
    """The grid keys that place a configuration (not the tuned ones), for messages."""
    out = []
    for k in suite.grid:
        if k in suite.tune or k == "algo" or (k == "topology" and not cfg.needs_topology()):
            continue
        try:
            out.append(f"{k}={_tuned_value(cfg, k)}")
        except KeyError:  # a grid key of another component (DSGD-AC's p for C-SGD): it does not place this one
            pass
    return ", ".join(out) or "all"


def _seed_text(seeds) -> str:
    seeds = list(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def _add_runs(p: Plan, cfgs: list[RunConfig], phase: str, ctx: dict) -> None:
    """Resolve, filter, de-duplicate and check the configurations; add them to the plan."""
    suite = p.suite
    p.expanded += len(cfgs)
    for cfg in cfgs:
        _check_backend(suite, cfg, ctx["check_run"], p.notes)
        key = (cfg.dataset, cfg.data_dir, cfg.download, cfg.val_fraction)
        if key not in ctx["sizes"]:
            ctx["sizes"][key] = _data_size(suite, cfg, ctx["check_run"], p.notes)
        n_train, default_model = ctx["sizes"][key]
        resolved = cfg.resolve(n_train, default_model)
        if not _matches(cfg, resolved, ctx["keep"]):
            p.filtered_out += 1
            continue
        run_id = resolved.run_id()
        if run_id in ctx["seen"]:
            p.merged += 1
            continue
        ctx["seen"].add(run_id)
        _check_run(suite, resolved, n_train, ctx["graphs"])
        if phase == "tune" and not resolved.val_fraction > 0:
            raise UserError(f"suite {suite.name}: tuning chooses on validation accuracy; set val_fraction "
                            f"(e.g. 0.1) in [base]")
        p.runs.append(PlannedRun(cfg, resolved, run_id, results_io.is_finished(Path(p.results) / run_id), phase))


def choose_tuned(suite: Suite, tuning: list[PlannedRun], root: str) -> list[dict]:
    """Per configuration (all but the tuned keys and the seed), the value of the tuned keys chosen on the
    finished tuning runs, by the rule of `dsgdbench compare --tune` (bench/leaderboard.py): fewest
    failed seeds, then the highest mean validation accuracy of the completed seeds, then the smaller
    value. Returns dicts: cfg (a winning run's configuration, to be run on the report seeds), values,
    candidates, edge (tuned keys whose choice is the smallest or largest of 3+ numeric values)."""
    from bench.leaderboard import _at_edge, _Candidate, _sort_key

    groups: dict = {}
    for r in tuning:
        key = _config_key(suite, r)
        value = tuple(_tuned_value(r.cfg, k) for k in suite.tune)
        groups.setdefault(key, {}).setdefault(value, []).append(r)
    out = []
    for by_value in groups.values():
        ranking = []
        for value, runs in by_value.items():
            sums = [results_io.read_summary(Path(root) / r.run_id) if r.finished else None for r in runs]
            done = [s for s in sums if s is not None]
            if len(done) < len(runs):
                break  # not all finished: no choice yet for this configuration
            ok = [s for s in done if s["status"] == "completed" and isinstance(s.get("val_acc"), (int, float))]
            failed = sum(s["status"] in results_io.FAILED for s in done) / len(done)
            val = sum(s["val_acc"] for s in ok) / len(ok) if ok else math.nan
            ranking.append((_Candidate(rows=None, failed=failed, val_acc=val, completed=len(ok),
                                       order=_sort_key(list(value))), value, runs))
        else:
            ranking.sort(key=lambda c: c[0].rank())
            _, value, runs = ranking[0]
            candidates = [v for _, v, _ in ranking]
            edge = [k for i, k in enumerate(suite.tune) if _at_edge(value[i], [c[i] for c in candidates])]
            out.append({"cfg": runs[0].cfg, "values": dict(zip(suite.tune, value)), "candidates": len(ranking),
                        "val_acc": ranking[0][0].val_acc, "edge": edge})
    return out


def _written(suite: Suite, algo: str, key: str, overrides: dict):
    """A field's value as the suite writes it for an algorithm's runs (grid keys excluded)."""
    d = {**suite.base, **suite.per_algo.get(algo, {}), **overrides}
    return d.get(key, getattr(RunConfig(), key))


def _config_key(suite: Suite, r: PlannedRun) -> str:
    """A tuning run's configuration: its identity without the seed and the tuned keys."""
    ident = r.resolved.identity(with_seed=False)
    return json.dumps({k: v for k, v in ident.items() if k not in suite.tune and k.rpartition(".")[2] not in suite.tune},
                      sort_keys=True, default=str)


def _tuned_value(cfg: RunConfig, key: str):
    return getattr(cfg, key) if key in FIELD_TYPES else cfg.param(key)


def _check_run(suite: Suite, c: RunConfig, n_train: int, graphs: set) -> None:
    """What the runner would only find when it reaches the run: the topology for n workers, the shard size."""
    if c.needs_topology() and (c.topology, c.workers) not in graphs:
        try:
            c.build_topology()
        except UserError as e:
            raise UserError(f"suite {suite.name}: {e}") from None
        graphs.add((c.topology, c.workers))
    if c.partition == "iid" and c.batch > n_train // c.workers:
        raise UserError(f"suite {suite.name} ({c.algo}, batch {c.batch}): --batch {c.batch} is larger than a "
                        f"worker's shard ({n_train // c.workers} samples with {c.workers} workers)")


def _check_backend(suite: Suite, cfg: RunConfig, check_run: bool, notes: list[str]) -> None:
    if cfg.backend != "simulated" or cfg.procs != 1:
        raise UserError(f"suite {suite.name}: suites run with the simulated backend (backend = \"simulated\", "
                        f"procs = 1); start distributed runs with `dsgdbench run --procs P` or torchrun")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            msg = "device cuda is not available here"
            if check_run:
                raise UserError(f"suite {suite.name}: {msg}; run it on a machine with CUDA or pass --set device=cpu")
            if msg not in notes:
                notes.append(msg)


def _data_size(suite: Suite, cfg: RunConfig, check_run: bool, notes: list[str]) -> tuple[int, str]:
    """(training-set size after the validation split, default model) from the data set's facts.

    Nothing is loaded. When the suite is about to run, a data set that must be read from disk
    and is not there is an error now; a dry run only notes it.
    """
    from bench.data import check_available, dataset_info

    try:
        info = dataset_info(cfg.dataset)
        check_available(cfg.dataset, cfg.data_dir, cfg.download)
    except UserError as e:
        if check_run or "not found" not in str(e):
            raise UserError(f"suite {suite.name}: {e}") from None
        info = dataset_info(cfg.dataset)
        note = (f"{cfg.dataset} is not on disk here (planned with its {info.n_train} training samples); "
                f"running needs --data-dir DIR")
        if note not in notes:
            notes.append(note)
    n = info.n_train
    if cfg.val_fraction > 0:
        k = int(round(cfg.val_fraction * n))  # as Dataset.split_validation
        if not 0 < k < n:
            raise UserError(f"suite {suite.name}: --val-fraction {cfg.val_fraction} leaves no training or no "
                            f"validation samples (N={n})")
        n -= k
    return n, info.default_model


# ----------------------------------------------------------------------------------------------
# Rendering a plan


def plan_table(p: Plan):
    from rich.table import Table

    t = Table(title=f"suite {p.suite.name}: {len(p.runs)} runs in {p.results}")
    for c in ("run id", "algo", "topology", "workers", "batch", "lr", "steps", "seed", "phase", "status"):
        t.add_column(c, justify="right" if c in ("workers", "batch", "lr", "steps", "seed") else "left")
    for r in p.runs:
        c = r.resolved
        status = ("[green]done[/green]" if not p.force else "[yellow]rerun[/yellow]") if r.finished else "todo"
        t.add_row(r.run_id, c.algo, c.topology, str(c.workers), str(c.batch), f"{c.lr:g}", str(c.steps),
                  str(c.seed), r.phase, status)
    return t


def plan_counts(p: Plan) -> str:
    n_done = len(p.done)
    if p.suite.tune:
        for c in p.choices:
            what = ", ".join(f"{k}={v}" for k, v in c["values"].items())
            edge = f"; at the edge of its grid: widen {', '.join(c['edge'])}" if c["edge"] else ""
            p.notes.append(f"tuned {c['cfg'].algo} ({_config_text(p.suite, c['cfg'])}): {what} of {c['candidates']}, "
                           f"val acc {c['val_acc']:.2f}{edge}")
    lines = [f"{len(p.runs)} runs: {n_done} done, {len(p.todo)} to run"
             + (" (--force reruns finished runs)" if p.force else "")]
    extra = []
    if p.merged:
        extra.append(f"{p.merged} configurations were the same run as another one (e.g. csgd has no topology)")
    if p.filtered_out:
        extra.append(f"{p.filtered_out} left out by --filter")
    if extra:
        lines.append(f"{p.expanded} configurations expanded; " + "; ".join(extra))
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def listing() -> list[tuple[str, str]]:
    """(name, "description  (N runs)") of every shipped suite, for `dsgdbench list suites`."""
    rows = []
    for name in shipped_names():
        try:
            s = load_suite(name)
            p = plan(s, check_run=False)
            n = f"{len(p.runs)} tuning + {p.pending} report runs" if p.pending else f"{len(p.runs)} runs"
            rows.append((name, f"{s.description}  ({n})"))
        except UserError as e:
            rows.append((name, f"invalid: {e}"))
    return rows
