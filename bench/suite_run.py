"""Executing a suite's plan (bench/suites.py makes the plan; nothing here reads TOML).

    plan = suites.plan(suites.load_suite("quick"))
    suite_run.execute(plan, out, err)

Runs go one after the other in the plan's order; a run finished in the meantime (by another
process) is skipped; the per-run lines and a summary go to `out`, progress bars to `err`.
"""

from __future__ import annotations

import time

from bench import results as results_io
from bench.suites import Plan


def next_command(p: Plan) -> str:
    algos = list(dict.fromkeys(r.cfg.algo for r in p.runs))
    baseline = "csgd" if "csgd" in algos else algos[0]
    return f"dsgdbench compare {p.results} --baseline {baseline}"


def execute(p: Plan, out, err) -> dict:
    """Run the runs still to do, one after the other; print one line per run and a summary.

    out, err: rich consoles (the per-run lines go to out, the progress bars to err; the bars
    are off when err is not a terminal). Returns the counts: ran, skipped, failed, seconds.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench.runner import bar_progress, run as run_one, summary_line

    results_io.prepare_results_dir(p.results)
    todo = p.todo
    counts = {"ran": 0, "skipped": len(p.runs) - len(todo), "failed": 0, "seconds": 0.0}
    out.print(f"suite {p.suite.name}: {len(p.runs)} runs in {p.results} ({counts['skipped']} already done, "
              f"{len(todo)} to run)", highlight=False, soft_wrap=True)
    t0 = time.perf_counter()
    position = counts["skipped"]
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
    counts["seconds"] = time.perf_counter() - t0
    div = f" ({counts['failed']} failed: diverged or collapsed)" if counts["failed"] else ""
    out.print(f"suite {p.suite.name}: ran {counts['ran']}{div}, skipped {counts['skipped']} (already done), "
              f"{counts['seconds']:.0f} s", highlight=False, soft_wrap=True)
    out.print(f"next: {next_command(p)}", highlight=False, markup=False, soft_wrap=True)
    return counts
