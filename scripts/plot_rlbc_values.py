"""What an nf_rlbc.py critic and actor learned on a point maze: V(s) over the maze and the actor's direction.

    python scripts/plot_rlbc_values.py --runs runs/rlbc/<flow run> runs/rlbc/<gaussian run> --out rlbc_values.png

One panel per run (its last checkpoint, or --step): the colour is V(s) = E_a~pi min_i Q_i(s, a) on a grid of
x-y positions (walls blank), the arrows the actor's mean action (the average of its samples; the Gaussian's
mean), and the task's start and goal. Where the value has not yet formed between start and goal, the Q term
gives the actor no direction there, and it falls back on its behaviour cloning term. Point mazes only: their
observation is the x-y position, so the state space is the picture.
"""

import csv
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import ogbench  # noqa: E402
import torch  # noqa: E402
import tyro  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nf_rlbc  # noqa: E402


@dataclass
class Args:
    runs: List[str]
    """nf_rlbc.py run directories (or checkpoint files) on a pointmaze singletask dataset"""
    out: str = "rlbc_values.png"
    """where to write the PNG"""
    step: Optional[int] = None
    """checkpoint to read, by its file's step (default: each run's last)"""
    samples: int = 32
    """actor samples per grid point"""
    resolution: float = 0.25
    """grid spacing of the value map, in maze units"""
    points: List[str] = dataclasses.field(default_factory=list)
    """x,y positions at which to print V(s) (e.g. 6.7,14.8); the start and its free neighbour cells always are"""


def load(path: str, step: Optional[int]):
    if step is not None and os.path.isdir(path):
        path = os.path.join(path, "checkpoints", f"step_{step}.pt")
    checkpoint, _ = nf_rlbc.load_checkpoint(path, "--runs")
    args = nf_rlbc.Args(**checkpoint["args"])
    action_dim = checkpoint["actor"]["action_low"].numel()
    obs_dim = checkpoint["critic"]["weights.0"].shape[1] - action_dim  # the critics' first layer: [2, in, out]
    if args.source != "ogbench" or not args.env_id.startswith("pointmaze") or obs_dim != 2:
        raise SystemExit(
            f"{path}: this picture is for pointmaze singletask runs (2-D x-y observations); got {args.env_id}"
        )
    actor = nf_rlbc.ACTORS[args.policy](obs_dim, action_dim, args)
    actor.load_state_dict(checkpoint["actor"])
    critic = nf_rlbc.Critic(obs_dim, action_dim, args.critic_dim)
    critic.load_state_dict(checkpoint["critic"])
    return args, checkpoint, actor.eval(), critic.eval()


@torch.no_grad()
def value_and_direction(actor, critic, xy: np.ndarray, samples: int):
    """V(s) = mean over actor samples of min_i Q_i(s, clip(a)), and the mean action, at positions xy [N, 2]."""
    obs = torch.as_tensor(xy, dtype=torch.float32).repeat_interleave(samples, 0)
    torch.manual_seed(0)
    actions, _ = actor.sample(obs)
    actions = actions.clamp(-1, 1)
    q = critic(obs, actions).min(0).values.view(len(xy), samples).mean(1)
    return q.numpy(), actions.view(len(xy), samples, -1).mean(1).numpy()


def evaluated_success(run: str, step: int, env_steps: int) -> str:
    """ ", success 0.68" from the run's eval.csv at that checkpoint, if it was evaluated there."""
    path = os.path.join(run if os.path.isdir(run) else os.path.dirname(os.path.dirname(run)), "eval.csv")
    if os.path.exists(path):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if int(row["step"]) == step and int(row["env_steps"]) == env_steps:
                    return f", success {float(row['success']):.2f}"
    return ""


def main(args: Args):
    points = {}  # parsed once, before any checkpoint is read
    for point in args.points:
        try:
            points[point] = np.array([float(v) for v in point.split(",")], dtype=np.float64).reshape(2)
        except ValueError:
            raise SystemExit(f"--points {point}: expected x,y (two numbers, e.g. 6.7,14.8)")
    fig, axes = plt.subplots(1, len(args.runs), figsize=(5.2 * len(args.runs), 5), squeeze=False)
    for ax, run in zip(axes[0], args.runs):
        run_args, checkpoint, actor, critic = load(run, args.step)
        env = ogbench.make_env_and_datasets(run_args.env_id, env_only=True)
        env.reset(seed=0)
        maze = env.unwrapped
        grid, unit = np.asarray(maze.maze_map), float(maze._maze_unit)
        low = -np.array([maze._offset_x, maze._offset_y]) - unit / 2
        high = low + unit * np.array(grid.shape[::-1])
        xs, ys = (
            np.arange(low[0], high[0], args.resolution) + args.resolution / 2,
            np.arange(low[1], high[1], args.resolution) + args.resolution / 2,
        )
        xx, yy = np.meshgrid(xs, ys)
        xy = np.stack([xx.ravel(), yy.ravel()], -1)
        free = (
            grid[np.floor((xy[:, 1] - low[1]) / unit).astype(int), np.floor((xy[:, 0] - low[0]) / unit).astype(int)]
            == 0
        )
        values = np.full(len(xy), np.nan)
        values[free] = value_and_direction(actor, critic, xy[free], args.samples)[0]
        image = ax.imshow(
            values.reshape(xx.shape), origin="lower", extent=[low[0], high[0], low[1], high[1]], cmap="viridis"
        )
        ax.imshow(
            np.where(grid == 1, 1.0, np.nan),
            origin="lower",
            extent=[low[0], high[0], low[1], high[1]],
            cmap="Greys",
            vmin=0,
            vmax=1.2,
        )
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="V(s) = E min Q(s, a)")
        centres = np.array(
            [maze.ij_to_xy((i, j)) for i in range(grid.shape[0]) for j in range(grid.shape[1]) if grid[i, j] == 0]
        )
        arrows = np.concatenate(
            [centres + unit * np.array(o) for o in ((-0.25, -0.25), (-0.25, 0.25), (0.25, -0.25), (0.25, 0.25))]
        )
        direction = value_and_direction(actor, critic, arrows, args.samples)[1]
        ax.quiver(arrows[:, 0], arrows[:, 1], direction[:, 0], direction[:, 1], color="white", scale=12, width=0.005)
        info = maze.cur_task_info
        start, goal = maze.ij_to_xy(info["init_ij"]), maze.ij_to_xy(info["goal_ij"])
        (i, j), named = info["init_ij"], {"start": np.asarray(start)}
        for name, (di, dj) in (("above", (1, 0)), ("below", (-1, 0)), ("right", (0, 1)), ("left", (0, -1))):
            if grid[i + di, j + dj] == 0:  # as drawn (origin lower): row i + 1 is above row i
                named[f"cell {name}"] = np.asarray(maze.ij_to_xy((i + di, j + dj)))
        named.update(points)
        at = value_and_direction(actor, critic, np.stack(list(named.values())), args.samples)[0]
        print(f"{run}: " + ", ".join(f"V({name}) {v:.0f}" for name, v in zip(named, at)))
        ax.scatter([start[0]], [start[1]], marker="o", s=90, c="white", edgecolors="k", zorder=3, label="start")
        ax.scatter([goal[0]], [goal[1]], marker="*", s=220, c="orange", edgecolors="k", zorder=3, label="goal")
        ax.set_xticks([])
        ax.set_yticks([])
        steps = f"{checkpoint['step']:,} steps" + (
            f" + {checkpoint['env_steps']:,} online env steps" if checkpoint["env_steps"] else ""
        )
        success = evaluated_success(run, checkpoint["step"], checkpoint["env_steps"])
        ax.set_title(f"{run_args.policy} actor, seed {run_args.seed}, {steps}{success}\n{run_args.env_id}", fontsize=8)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=2, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
