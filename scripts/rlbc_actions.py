"""Where an nf_rlbc.py actor puts its actions, and what its critic thinks of them, on the run's own dataset.

    python scripts/rlbc_actions.py runs/rlbc_cube_alpha/<run>/checkpoints/step_30000.pt runs/rlbc_cube/<run>

For each checkpoint (a file, or a run directory's last one) and the same random dataset states: the share of the
actor's sampled action components outside [-1, 1] (the update clips them to the box's edge, where the critic's
gradient no longer reaches them; `train/outside_box` logs the same during training), the share at the edge after
the clip per action dimension (the data's own share is printed first), the mean min_i Q_i of the data's actions
and of the actor's clipped samples, and their mean distance. A BC weight too small shows as samples leaving the
box while the critic's values climb for every action.
"""

import os
import sys
from dataclasses import dataclass
from typing import List

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nf_rlbc  # noqa: E402


@dataclass
class Args:
    runs: tyro.conf.Positional[List[str]]
    """nf_rlbc.py checkpoint files or run directories (their last checkpoint), all on one OGBench dataset"""
    dataset_dir: str = "data"
    """where make_dataset.py wrote the dataset"""
    states: int = 2000
    """dataset states to sample (the same for every checkpoint)"""


@torch.no_grad()  # not set_grad_enabled(False), which would outlive main() when a test calls it
def main(args: Args):
    loaded = [nf_rlbc.load_checkpoint(path, "runs") for path in args.runs]
    env_ids = {nf_rlbc.Args(**checkpoint["args"]).env_id for checkpoint, _ in loaded}
    if len(env_ids) != 1:
        raise SystemExit(f"runs: the checkpoints are on different tasks ({', '.join(sorted(env_ids))}); give one")
    (env_id,) = env_ids
    env, data, _ = nf_rlbc.load_ogbench(env_id, args.dataset_dir, True)
    low, high = nf_rlbc.action_box(env_id, env.action_space)
    rows = np.random.default_rng(0).choice(
        len(data["observations"]), min(args.states, len(data["observations"])), replace=False
    )
    obs = torch.as_tensor(data["observations"][rows], dtype=torch.float32)
    actions = torch.as_tensor(nf_rlbc.scale_actions(data["actions"][rows], low, high), dtype=torch.float32)
    edge = lambda a: " ".join(f"{x:.2f}" for x in (a.abs() > 0.99).float().mean(0))  # noqa: E731
    print(f"{env_id}, {len(rows)} dataset states; the data's actions at the edge per dimension: {edge(actions)}")
    torch.manual_seed(0)
    for checkpoint, path in loaded:
        run = nf_rlbc.Args(**checkpoint["args"])
        actor = nf_rlbc.ACTORS[run.policy](obs.shape[1], actions.shape[1], run)
        critic = nf_rlbc.Critic(obs.shape[1], actions.shape[1], run.critic_dim)
        actor.load_state_dict(checkpoint["actor"])
        critic.load_state_dict(checkpoint["critic"])
        if run.policy == "fql":  # its sample() clips; the one-step policy's own output is what the update clips
            samples = actor.one_step(torch.cat([obs, torch.randn_like(actions)], -1))
        else:
            samples = actor.sample(obs)[0]
        clipped = samples.clamp(-1, 1)
        q_data, q_pi = (critic(obs, a).min(0).values.mean().item() for a in (actions, clipped))
        distance = (clipped - actions).norm(dim=-1).mean().item()
        name = f"{run.exp_name} seed {run.seed} step {checkpoint['step']}"
        print(
            f"{name}: outside the box {(samples.abs() > 1).float().mean():.2f}, at the edge {edge(clipped)}, "
            f"Q(data) {q_data:.1f}, Q(actor) {q_pi:.1f}, |actor - data| {distance:.2f}  ({path})"
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
