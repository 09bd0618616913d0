"""Summarise eval.csv files of many runs: success (mean +- std over seeds) per environment and policy.

    python scripts/summarize_runs.py runs/gcbc

Groups run directories by (env_id, policy) from their args.json and prints a Markdown table of overall
success at every evaluated step, the last validation NLL and the wall time of the runs.
"""

import csv
import glob
import json
import os
import statistics
import sys
from collections import defaultdict


def main(root: str):
    groups = defaultdict(list)
    for args_path in sorted(glob.glob(os.path.join(root, "*", "args.json"))):
        run_dir = os.path.dirname(args_path)
        with open(args_path) as f:
            args = json.load(f)
        with open(os.path.join(run_dir, "eval.csv")) as f:
            rows = list(csv.DictReader(f))
        if rows:
            groups[(args["env_id"], args.get("policy", "?"))].append(rows)
    if not groups:
        raise SystemExit(f"no runs with args.json and eval.csv under {root}")
    print("| env | policy | seeds | step | success (mean +- std) | per seed | val NLL | wall time (min) |")
    print("|---|---|---|---|---|---|---|---|")
    for (env, policy), runs in sorted(groups.items()):
        steps = sorted({int(r["step"]) for rows in runs for r in rows})
        for step in steps:
            at = [next(r for r in rows if int(r["step"]) == step) for rows in runs if any(int(r["step"]) == step for r in rows)]
            success = [float(r["success"]) for r in at]
            spread = statistics.stdev(success) if len(success) > 1 else 0.0
            nll = statistics.mean(float(r["val_nll"]) for r in at)
            wall = statistics.mean(float(r["wall_time"]) for r in at) / 60
            per_seed = ", ".join(f"{s:.2f}" for s in success)
            print(f"| {env} | {policy} | {len(at)} | {step:,} | {statistics.mean(success):.3f} +- {spread:.3f} | {per_seed} | {nll:.2f} | {wall:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs")
