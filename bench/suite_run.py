"""Executing a suite's plan (bench/suites.py makes the plan; nothing here reads TOML).

    plan = suites.plan(suites.load_suite("quick"))
    suite_run.execute(plan, out, err)

Runs go one after the other in the plan's order; a run finished in the meantime (by another
process) is skipped; the per-run lines and a summary go to `out`, progress bars to `err`.
"""

from __future__ import annotations

import json
import time

from pathlib import Path

from bench import results as results_io
from bench.suites import Plan


def next_command(p: Plan) -> str:
    algos = list(dict.fromkeys(r.cfg.algo for r in p.runs))
    baseline = "csgd" if "csgd" in algos else algos[0]
    return f"dsgdbench compare {p.results} --baseline {baseline}"


def execute(p: Plan, out, err) -> dict:
    """Run the runs still to do, one after the other; print one line per run and a summary.

    A tuned suite runs its tuning runs, then plans and runs the report runs of the chosen values.
    out, err: rich consoles (the per-run lines go to out, the progress bars to err; the bars
    are off when err is not a terminal). Returns the counts: ran, skipped, failed, seconds.
    """
    results_io.prepare_results_dir(p.results)
    s = p.suite
    info = {"name": s.name, "source": s.source, "seeds": list(s.seeds), "tune": list(s.tune),
            "tune_seeds": list(s.tune_seeds)}  # what compare --tune reads (the seeds it may choose on)
    f = Path(p.results) / "suite.json"
    try:
        same = f.is_file() and json.loads(f.read_text()) == info
    except (OSError, ValueError):
        same = False
    if not same:
        results_io.write_json(f, info)
    counts = {"ran": 0, "skipped": 0, "failed": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    done: set = set()
    while True:
        _run_plan(p, out, err, counts, done)
        if not (s.tune and p.pending and p.replan):
            break
        p = p.replan()  # the tuning runs are finished: the report runs of the chosen values
        for c in p.choices:
            what = ", ".join(f"{k}={v}" for k, v in c["values"].items())
            warn = f" [yellow](at the edge of its grid: widen {', '.join(c['edge'])})[/yellow]" if c["edge"] else ""
            out.print(f"tuned {c['cfg'].algo}: {what} (of {c['candidates']}, val acc {c['val_acc']:.2f}){warn}",
                      soft_wrap=True, highlight=False)
        if not [r for r in p.todo if r.run_id not in done]:
            break
    counts["seconds"] = time.perf_counter() - t0
    div = f" ({counts['failed']} failed: diverged or collapsed)" if counts["failed"] else ""
    out.print(f"suite {s.name}: ran {counts['ran']}{div}, skipped {counts['skipped']} (already done), "
              f"{counts['seconds']:.0f} s", highlight=False, soft_wrap=True)
    out.print(f"next: {next_command(p)}", highlight=False, markup=False, soft_wrap=True)
    return counts


def _run_plan(p: Plan, out, err, counts: dict, done: set) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench.runner import bar_progress, run as run_one, summary_line

    todo = [r for r in p.todo if r.run_id not in done]
    skipped = len([r for r in p.runs if r.run_id not in done]) - len(todo)
    counts["skipped"] += skipped
    out.print(f"suite {p.suite.name}: {len(p.runs)} runs in {p.results} ({len(p.runs) - len(todo)} already done, "
              f"{len(todo)} to run)" + ("; the report runs come after tuning" if p.pending else ""),
              highlight=False, soft_wrap=True)
    position = len(p.runs) - len(todo)
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err, transient=True,
                      disable=not err.is_terminal) as bar:
            runs_task = bar.add_task("runs", total=len(p.runs), completed=position, info="")
            steps_task = bar.add_task("", total=None, info="")
            queue, deferred = list(todo), []
            while queue:
                r = queue.pop(0)
                c = r.resolved
                bar.update(steps_task, description=f"{c.algo} {c.topology} seed {c.seed}", completed=0,
                           total=c.steps, info="")
                # A run another process is training: move on, and come back to it (then waiting) at the end.
                waiting = r in deferred
                s = run_one(r.cfg, progress=bar_progress(bar, steps_task), force=p.force, wait=waiting,
                            on_wait=lambda m: out.print(f"[dim]{m}[/dim]", soft_wrap=True))
                if s is None:
                    deferred.append(r)
                    queue.append(r)
                    continue
                done.add(r.run_id)
                position += 1
                if s.get("skipped"):  # finished in the meantime (another process)
                    counts["skipped"] += 1
                    out.print(f"[{position}/{len(p.runs)}] [dim]skipped (already {s['status']}): {r.run_id}[/dim]",
                              soft_wrap=True)
                else:
                    counts["ran"] += 1
                    counts["failed"] += s["status"] != "completed"
                    out.print(f"[{position}/{len(p.runs)}] {summary_line(s)}", highlight=False, soft_wrap=True)
                bar.advance(runs_task)
    except KeyboardInterrupt:
        err.print(f"interrupted: {position} of {len(p.runs)} runs finished and kept; "
                  f"run the same command again to continue")
        raise
