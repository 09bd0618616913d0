"""Learning curves from the eval.csv files of many runs: success against training step, one colour per experiment.

    python scripts/plot_curves.py runs/rlbc_cube runs/rlbc_cube_alpha --out curves.png
    python scripts/plot_curves.py runs/rlbc_cube_alpha --only flow_alpha3 gaussian_alpha3 --metric return

Groups run directories (any script's) by (env_id, exp_name, policy) from their args.json, as summarize_runs.py
does, and draws each group's mean over its seeds as a thick line and each seed as a thin one, so the spread is
visible and a lone seed is not mistaken for a mean. The legend gives the seed count. One panel per environment.
"""

import csv
import glob
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402


@dataclass
class Args:
    roots: tyro.conf.Positional[List[str]]
    """folders of run directories (each with args.json and eval.csv)"""
    out: str = "curves.png"
    """where to write the PNG"""
    metric: str = "success"
    """the eval.csv column to plot (success, return, score, ...)"""
    only: Optional[List[str]] = None
    """experiment names to keep (default: all)"""
    x: str = "step"
    """the eval.csv column on the x axis (step; env_steps for online phases)"""
    label_args: Optional[List[str]] = None
    """args.json fields that also group the runs and name them in the legend (e.g. alpha)"""


def read_groups(roots: List[str], metric: str, x: str, only: Optional[List[str]] = None, label_args=()):
    """{(env_id, exp_name, policy, label): [(xs, ys) per seed]} from the runs under `roots` (label: the
    `label_args` fields, "alpha 3"), rows without the metric (nan) left out."""
    groups = defaultdict(list)
    for root in roots:
        for args_path in sorted(glob.glob(os.path.join(root, "*", "args.json"))):
            with open(args_path) as f:
                args = json.load(f)
            csv_path = os.path.join(os.path.dirname(args_path), "eval.csv")
            if (only and args.get("exp_name") not in only) or not os.path.exists(csv_path):
                continue
            with open(csv_path) as f:
                rows = [r for r in csv.DictReader(f) if r.get(metric) not in (None, "", "nan")]
            if rows:
                values = {k: args.get(k) for k in label_args}
                label = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
                policy = args.get("policy", args.get("goal_strategy", "?"))
                key = (args["env_id"], args.get("exp_name", "?"), policy, label)
                groups[key].append((np.array([float(r[x]) for r in rows]), np.array([float(r[metric]) for r in rows])))
    if not groups:
        raise SystemExit(f"no runs with args.json and a {metric!r} column in eval.csv under {', '.join(roots)}")
    return groups


def main(args: Args):
    groups = read_groups(args.roots, args.metric, args.x, args.only, args.label_args or ())
    envs = sorted({key[0] for key in groups})
    fig, axes = plt.subplots(1, len(envs), figsize=(6 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        keys = sorted(k for k in groups if k[0] == env)
        for colour, key in zip(plt.cm.tab10.colors * 3, keys):
            runs = groups[key]
            for xs, ys in runs:
                ax.plot(xs, ys, color=colour, alpha=0.3, linewidth=0.8)
            common = sorted(set.intersection(*(set(xs) for xs, _ in runs)))  # steps every seed has reached
            mean = [np.mean([ys[list(xs).index(s)] for xs, ys in runs]) for s in common]
            label = ", ".join(p for p in (key[2], key[3], f"{len(runs)} seed{'s' if len(runs) > 1 else ''}") if p)
            label = f"{key[1]} ({label})"
            ax.plot(common, mean, color=colour, linewidth=2.2, label=label)
        ax.set_title(env, fontsize=9)
        ax.set_xlabel(args.x.replace("_", " "))
        ax.set_ylabel(args.metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}: {sum(len(v) for v in groups.values())} runs in {len(groups)} groups")


if __name__ == "__main__":
    main(tyro.cli(Args))
