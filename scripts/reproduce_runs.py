"""Retrain finished runs with the code of this checkout and compare every recorded number.

    python scripts/reproduce_runs.py OUT_DIR RUN_DIR [RUN_DIR ...]

Each RUN_DIR's config.json is read back (it must give the same run id), the run is trained again
into OUT_DIR at the thread count its summary records (float32 reductions in the metrics depend on
it), and its summary.json and metrics.csv are compared with the stored ones: every value must be
equal, bit for bit, except the clocks, the versions, the machine load and the topology's
spectral gap (a property of the graph, recomputed by closed forms since 0.2.0: it may differ in the
last digit). Fields the stored summary lacks (written by an older version) are listed as added.
Exit code 1 if any run differs. This is how results/README.md checks that runs made by earlier
revisions are what this code computes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import runner  # noqa: E402
from bench.config import RunConfig  # noqa: E402

CLOCKS = {"train_seconds", "eval_seconds", "wall_seconds", "hessian_seconds", "adaptive_hessian_seconds"}
SKIP = CLOCKS | {"versions", "machine_load", "threads", "run_dir", "resumed_from_step", "spectral_gap"}


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def metrics(run_dir: Path) -> pd.DataFrame:
    """metrics.csv without its clock; empty for a run that diverged before its first evaluation."""
    try:
        return pd.read_csv(run_dir / "metrics.csv").drop(columns=["train_seconds"])
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def check(run_dir: Path, out: Path) -> bool:
    if not (run_dir / "summary.json").is_file():
        print(f"{run_dir}: not a finished run folder (no summary.json)")
        return False
    old = json.loads((run_dir / "summary.json").read_text())
    cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())).replace(results=str(out))
    if cfg.run_id() != old["run_id"]:
        print(f"{run_dir.name}: config.json gives run id {cfg.run_id()}, not {old['run_id']}")
        return False
    torch.set_num_threads(int(old.get("threads") or 1))
    new = runner.run(cfg, force=True)
    diffs = [k for k, v in old.items() if k not in SKIP and v is not None and not same(v, new.get(k))]
    added = [k for k, v in new.items() if k not in SKIP and old.get(k) is None and v is not None]
    curves = metrics(run_dir).equals(metrics(out / old["run_id"]))
    print(f"{run_dir.name} ({old.get('versions', {}).get('git')}, {old['status']}): "
          f"summary {'equal' if not diffs else 'DIFFERS in ' + ', '.join(diffs)}; "
          f"metrics.csv {'equal' if curves else 'DIFFERS'}" + (f"; added {', '.join(added)}" if added else ""),
          flush=True)
    return not diffs and curves


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    results = [check(Path(d), out) for d in argv[1:]]
    print(f"{sum(results)} of {len(results)} runs reproduced exactly")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
