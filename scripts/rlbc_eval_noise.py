"""Evaluate nf_rlbc.py checkpoints with their actor's noise scaled: is a gap between actors the evaluation noise?

    python scripts/rlbc_eval_noise.py runs/rlbc_cube_alpha/<flow run> runs/<gaussian run> --scales 1 0.5 0

The script evaluates the flow with samples a = f(z; s), and the Gaussian at its mean. Here every actor is evaluated
with its noise times each `--scales` value, on the run's own evaluation episodes (the same seeds and noise streams
as the run's eval.csv):
- the flow with z * scale (0: the image of the prior's mode);
- FQL's one-step policy with z * scale;
- the Gaussian at mean + scale * std * eps (0: its mean, as the script evaluates it).
Scale 1 for the flow and FQL, and 0 for the Gaussian, reproduce the run's own evaluation at that step.
"""

import os
import sys
from dataclasses import dataclass, field
from typing import List

import gymnasium
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nf_rlbc  # noqa: E402


@dataclass
class Args:
    runs: tyro.conf.Positional[List[str]]
    """nf_rlbc.py checkpoint files or run directories (their last checkpoint)"""
    scales: List[float] = field(default_factory=lambda: [1.0, 0.0])
    """factors of the actor's evaluation noise"""
    dataset_dir: str = "data"
    """where make_dataset.py wrote the datasets"""
    eval_episodes: int = 0
    """episodes (0: the run's --eval-episodes)"""


class ScaledNoise(torch.nn.Module):
    """An actor whose act() draws its noise times `scale` (the Gaussian: around its mean)."""

    def __init__(self, actor, scale: float):
        super().__init__()
        self.actor, self.scale = actor, scale

    def act(self, obs, randn):
        if isinstance(self.actor, nf_rlbc.GaussianActor):
            dist = self.actor.distribution(obs)
            noise = randn(dist.mean.shape[-1])
            return self.actor.to_env_units(dist.mean + self.scale * dist.stddev * noise)
        return self.actor.act(obs, lambda *shape: self.scale * randn(*shape))


def main(args: Args):
    for path in args.runs:
        checkpoint, found = nf_rlbc.load_checkpoint(path, "runs")
        run = nf_rlbc.Args(**checkpoint["args"])
        run.dataset_dir, run.capture_video = args.dataset_dir, False
        run.eval_episodes = args.eval_episodes or run.eval_episodes
        _, make_env, obs_space, action_space, score_fn = nf_rlbc.load_task(run)
        low, high = nf_rlbc.action_box(run.env_id, action_space)
        obs_dim, action_dim = gymnasium.spaces.flatdim(obs_space), len(low)
        actor = nf_rlbc.ACTORS[run.policy](obs_dim, action_dim, run)
        actor.load_state_dict(checkpoint["actor"])
        envs = nf_rlbc.EnvPool(make_env, min(run.eval_envs, run.eval_episodes))
        step = checkpoint["step"]
        for scale in args.scales:
            stats = nf_rlbc.evaluate(
                ScaledNoise(actor, scale), envs, obs_space, run, torch.device("cpu"), step, None, score_fn
            )
            print(
                f"{run.exp_name} seed {run.seed} step {step}, noise x {scale:g}: success {stats['success']:.2f}, "
                f"return {stats['return']:.1f} ({run.eval_episodes} episodes; {found})"
            )


if __name__ == "__main__":
    main(tyro.cli(Args))
