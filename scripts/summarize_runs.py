"""Summarise eval.csv files of many runs: success (mean +- std over seeds) per environment, experiment and policy.

    python scripts/summarize_runs.py runs/gcbc
    python scripts/summarize_runs.py runs/gcbc --eval-only     # the runs' --eval-only results instead

Groups run directories by (env_id, exp_name, policy) from their args.json (nf_goal_explore.py runs by their
goal strategy) and prints a Markdown table of overall success at every evaluation: by gradient step, online
environment step or both, whichever the runs log. Where the runs log them it adds the validation NLL, each
policy's own validation loss (BC scripts) and the coverage (exploration), as the mean and each seed's value,
the mean success on each evaluation task (goal-conditioned scripts), and always the mean wall time. With
`--eval-only` it reads the runs' eval_only_step_N.json files (`--resume RUN --eval-only`) instead of eval.csv.
"""

import csv
import glob
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict


def main(root: str, eval_only: bool = False):
    groups = defaultdict(list)
    for args_path in sorted(glob.glob(os.path.join(root, "*", "args.json"))):
        run_dir = os.path.dirname(args_path)
        with open(args_path) as f:
            args = json.load(f)
        if eval_only:  # re-evaluations of the run's checkpoints, one row each
            rows = []
            for path in sorted(glob.glob(os.path.join(run_dir, "eval_only_step_*.json"))):
                with open(path) as f:
                    result = json.load(f)
                rows.append({k: str(v) for k, v in result.items() if k not in ("checkpoint", "episodes")})
        else:
            with open(os.path.join(run_dir, "eval.csv")) as f:
                rows = list(csv.DictReader(f))
        if rows:
            policy = args.get("policy", args.get("goal_strategy", "?"))
            groups[(args["env_id"], args.get("exp_name", "?"), policy)].append(rows)
    if not groups:
        found = "eval_only_step_N.json" if eval_only else "eval.csv"
        raise SystemExit(f"no runs with args.json and {found} under {root}")
    columns = {c for runs in groups.values() for rows in runs for c in rows[0]}
    at_keys = [k for k in ("step", "env_steps") if k in columns]  # where an evaluation sits
    named = (("val_nll", "val NLL"), ("val_loss", "val loss"), ("coverage", "coverage"))
    extras = [(k, name) for k, name in named if k in columns]
    tasks = sorted(
        (c for c in columns if re.fullmatch(r"task\d+(_success)?", c)), key=lambda c: int(re.findall(r"\d+", c)[0])
    )
    print(
        "| env | experiment | policy | seeds | "
        + " | ".join(k.replace("_", " ") for k in at_keys)
        + " | success (mean +- std) | per seed | "
        + "".join(f"{name} | " for _, name in extras)
        + ("success per task (mean) | " if tasks else "")
        + "wall time (min) |"
    )
    print("|---" * (7 + len(at_keys) + len(extras) + bool(tasks)) + "|")
    for (env, exp, policy), runs in sorted(groups.items()):

        def where(r):
            return tuple(int(r.get(k) or 0) for k in at_keys)

        for key in sorted({where(r) for rows in runs for r in rows}):
            at = [next(r for r in rows if where(r) == key) for rows in runs if any(where(r) == key for r in rows)]
            success = [float(r["success"]) for r in at]
            spread = statistics.stdev(success) if len(success) > 1 else 0.0
            cells = []
            for k, _ in extras:
                values = [float(r[k]) for r in at if r.get(k) not in (None, "", "nan")]
                per_seed = f" ({', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""
                cells.append(f"{statistics.mean(values):.2f}{per_seed}" if values else "-")
            if tasks:
                per_task = [
                    statistics.mean(float(r[t]) for r in at)
                    if all(r.get(t) not in (None, "", "nan") for r in at)
                    else math.nan
                    for t in tasks
                ]
                cells.append(", ".join(f"{v:.2f}" for v in per_task))
            wall = statistics.mean(float(r.get("wall_time", "nan")) for r in at) / 60
            print(
                f"| {env} | {exp} | {policy} | {len(at)} | "
                + " | ".join(f"{v:,}" for v in key)
                + f" | {statistics.mean(success):.3f} +- {spread:.3f} | {', '.join(f'{s:.2f}' for s in success)} | "
                + "".join(f"{c} | " for c in cells)
                + (f"{wall:.1f} |" if not math.isnan(wall) else "- |")
            )


if __name__ == "__main__":
    paths = [a for a in sys.argv[1:] if a != "--eval-only"]
    main(paths[0] if paths else "runs", "--eval-only" in sys.argv[1:])
