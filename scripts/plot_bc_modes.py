"""Which modes of multimodal demonstrations each policy keeps: one picture from nf_bc.py runs of any policies.

    python scripts/plot_bc_modes.py --runs runs/bc/<flow run> runs/bc/<gaussian run> ... --out bc_modes.png

Panels: the demonstrations on the maze; the first action each policy proposes at the start state (samples; for
the Gaussian also its mean, which is what it executes) against the demonstrators' first actions; and rollouts
of each policy from the evaluation starts. Works for make_dataset.py's multigoal tasks.
"""

import math
import os
import sys
from dataclasses import dataclass
from typing import Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import tyro  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nf_bc  # noqa: E402


@dataclass
class Args:
    runs: Tuple[str, ...]
    """nf_bc.py run directories (or checkpoints) on the same task, one panel of rollouts each"""
    out: str = "bc_modes.png"
    """where to write the PNG"""
    samples: int = 1_000
    """action samples per policy at the start state"""
    rollouts: int = 20
    """rollouts per policy (the first evaluation seeds)"""


def load(path: str):
    checkpoint, _ = nf_bc.load_checkpoint(path, "--runs")
    args = nf_bc.Args(**checkpoint["args"])
    train, _, envs, _, _ = nf_bc.load_task(args, num_envs=1)
    if "goal_ijs" not in train:
        raise SystemExit(f"{path}: this picture is for make_dataset.py's multigoal tasks (it draws the maze and goals)")
    policy = nf_bc.POLICIES[args.policy](train["observations"].shape[1], train["actions"].shape[1], args)
    policy.load_state_dict(checkpoint["policy"])
    return args, train, envs[0], policy.eval()


def rollout(policy, env, args, seed: int, generator):
    np.random.seed(100_000 + seed)  # the evaluation's starts
    ob, _ = env.reset(seed=100_000 + seed)
    history, path = np.repeat(ob[None], args.obs_horizon, axis=0), [ob]
    for t in range(args.eval_max_steps or env.spec.max_episode_steps or 1_000):
        if t % args.exec_horizon == 0:
            obs = torch.as_tensor(history[None], dtype=torch.float32)
            with torch.no_grad():
                chunk = policy.act(obs, lambda *s: torch.randn(1, *s, generator=generator))[0].numpy()
        ob, _, terminated, truncated, info = env.step(chunk[t % args.exec_horizon])
        history[:-1], history[-1] = history[1:].copy(), ob
        path.append(ob)
        if terminated or truncated:
            return np.array(path), info["success"]
    return np.array(path), 0.0


def draw_maze(ax, env, train):
    maze = env.unwrapped
    for i, j in zip(*np.nonzero(maze.maze_map)):
        x, y = maze.ij_to_xy((i, j))
        ax.add_patch(plt.Rectangle((x - 2, y - 2), 4, 4, color="0.25"))
    for g in train["goal_ijs"]:
        ax.add_patch(plt.Circle(maze.ij_to_xy(tuple(g)), maze._goal_tol, color="tab:green", alpha=0.35))
    x, y = maze.ij_to_xy(tuple(train["init_ij"]))
    ax.add_patch(plt.Rectangle((x - 1, y - 1), 2, 2, fill=False, ls="--", color="tab:orange"))
    ax.set_aspect("equal")
    ax.set_xlim(*(np.array([0, maze.maze_map.shape[1]]) * 4 - 2 - maze._offset_x))
    ax.set_ylim(*(np.array([0, maze.maze_map.shape[0]]) * 4 - 2 - maze._offset_y))
    ax.set_xticks([]), ax.set_yticks([])


@torch.no_grad()
def main(args: Args):
    runs = [load(path) for path in args.runs]
    run_args, train, env, _ = runs[0]
    ends = np.flatnonzero(train["terminals"])
    starts = np.r_[0, ends[:-1] + 1]
    columns = min(4, len(runs) + 2)
    fig, axes = plt.subplots(math.ceil((len(runs) + 2) / columns), columns, figsize=(5 * columns, 5), squeeze=False)
    fig.set_figheight(5 * len(axes))
    axes = axes.flatten()
    for ax in axes[len(runs) + 2 :]:
        ax.axis("off")

    axes[0].set_title(f"demonstrations ({len(ends)}; 40 drawn)")
    draw_maze(axes[0], env, train)
    for s, e in list(zip(starts, ends))[:40]:
        axes[0].plot(*train["observations"][s : e + 1].T, lw=0.8, alpha=0.6)

    ax = axes[1]
    ax.set_title("first action at the start state")
    first = train["actions"][starts]
    ax.scatter(*first.T, s=6, c="0.5", alpha=0.5, label="demonstrations")
    state = torch.as_tensor(np.repeat(train["observations"][starts].mean(0)[None, None], run_args.obs_horizon, 1))
    generator = torch.Generator().manual_seed(0)
    colors = ["tab:blue", "tab:red", "tab:purple", "tab:olive", "tab:cyan", "tab:brown"]
    for (a, _, _, policy), color in zip(runs, colors):
        obs = state.expand(args.samples, -1, -1).float()
        if a.policy != "gaussian":
            with torch.no_grad():
                sampled = policy.act(obs, lambda *s: torch.randn(len(obs), *s, generator=generator))[:, 0].numpy()
            ax.scatter(*sampled.T, s=4, c=color, alpha=0.4, label=f"{a.policy} samples")
        else:
            with torch.no_grad():
                mean = policy.net(policy.features(obs[:1])).view(policy.chunk_shape)[0]
            std = policy.log_std.exp().view(policy.chunk_shape)[0]
            sampled = policy.to_env_units(mean + std * torch.randn(args.samples, len(mean), generator=generator))
            ax.scatter(*sampled.numpy().T, s=4, c=color, alpha=0.25, label="Gaussian samples")
            ax.scatter(*policy.to_env_units(mean).numpy(), s=200, marker="*", c="k", label="Gaussian mean (executed)")
    ax.set_xlim(-1.1, 1.1), ax.set_ylim(-1.1, 1.1), ax.set_aspect("equal")
    ax.set_xlabel("action x"), ax.set_ylabel("action y")
    ax.legend(loc="lower left", fontsize=7)

    for ax, (a, _, _, policy) in zip(axes[2:], runs):
        name = a.policy
        generator = torch.Generator().manual_seed(1)
        draw_maze(ax, env, train)
        goal_xys = np.array([env.unwrapped.ij_to_xy(tuple(g)) for g in train["goal_ijs"]])
        reached, lengths = np.zeros(len(goal_xys), int), []
        for seed in range(args.rollouts):
            path, success = rollout(policy, env, a, seed, generator)
            if success:
                reached[np.linalg.norm(goal_xys - path[-1], axis=1).argmin()] += 1
                lengths.append(len(path) - 1)
            ax.plot(*path.T, lw=1, alpha=0.7)
            ax.scatter(*path[-1], s=15, c="tab:green" if success else "tab:red", zorder=3)
        ax.set_title(f"{name} rollouts: {reached.sum()}/{args.rollouts} reach a goal")
        print(
            f"{name}: {reached.sum()}/{args.rollouts} reach a goal; per goal {reached.tolist()} "
            f"(cells {train['goal_ijs'].tolist()}); "
            f"steps to a goal: mean {np.mean(lengths) if lengths else float('nan'):.1f}"
        )
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
