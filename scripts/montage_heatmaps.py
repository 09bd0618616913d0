"""Put nf_goal_explore.py heat maps side by side: one row per run, one column per environment step.

    python scripts/montage_heatmaps.py --runs runs/explore/*min-density__1__* runs/explore/*uniform__1__* \
        --env-steps 32000 96000 160000 --out docs/explore_heatmaps.png
    python scripts/montage_heatmaps.py --runs runs/explore/*__[123]__* --env-steps 160000 --columns 3

With --columns the pictures (each run's, in the order given) fill rows of that many instead.

Each run writes heatmaps/env_step_N.png at every evaluation; this reads those files and nothing else.
"""

import os
from dataclasses import dataclass
from typing import List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tyro  # noqa: E402


@dataclass
class Args:
    runs: List[str]
    """nf_goal_explore.py run directories, one row each"""
    env_steps: List[int]
    """environment steps to show, one column each (evaluations the runs made)"""
    out: str = "explore_heatmaps.png"
    """where to write the PNG"""
    dpi: int = 80
    """resolution of the montage"""
    columns: Optional[int] = None
    """pictures per row, filled in order (default: one row per run, one column per environment step)"""


def main(args: Args):
    paths = [[os.path.join(run, "heatmaps", f"env_step_{n}.png") for n in args.env_steps] for run in args.runs]
    if args.columns is not None:
        if args.columns <= 0:
            raise SystemExit("--columns must be positive")
        flat = [p for row in paths for p in row]
        paths = [flat[i : i + args.columns] for i in range(0, len(flat), args.columns)]
    missing = [p for row in paths for p in row if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"no such heat map: {', '.join(missing)} (a run writes one per evaluation; see its eval.csv)")
    images = [[plt.imread(p) for p in row] for row in paths]
    height, width = images[0][0].shape[:2]
    columns = max(len(row) for row in paths)
    fig, axes = plt.subplots(
        len(paths), columns, squeeze=False, figsize=(width * columns / 100, height * len(paths) / 100)
    )
    for row, ax_row in zip(images, axes):
        for ax in ax_row:
            ax.axis("off")
        for image, ax in zip(row, ax_row):
            ax.imshow(image)
    fig.subplots_adjust(0, 0, 1, 1, 0, 0)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
