"""Why one nf_gcbc.py policy beats another: how close each run's actions are to the data's, and (for flow runs)
the success without the denoising step.

    python scripts/gcbc_action_checks.py --runs runs/gcbc/*cube-single* --step 20000

For every run: the mean squared error between the action the policy executes (its own `act`, as the
evaluation calls it) and the dataset's action, on 4,096 held-out (state, goal) pairs of the validation split
drawn as in training. For flow runs with `--no-denoise-eval`: the run's evaluation at that checkpoint (the same
tasks, episodes and evaluation seeds) with a plain flow sample instead of the denoised one.
"""

import functools
import os
import sys
from dataclasses import dataclass
from typing import Tuple

import ogbench
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nf_gcbc  # noqa: E402


@dataclass
class Args:
    runs: Tuple[str, ...]
    """nf_gcbc.py run directories"""
    step: int = 20_000
    """the checkpoint to read (checkpoints/step_N.pt)"""
    dataset_dir: str = "data"
    """where the runs' datasets are"""
    no_denoise_eval: bool = True
    """flow runs: also evaluate without the denoising step (minutes per run)"""


def main(args: Args):
    torch.set_num_threads(1)
    for run in args.runs:
        path = os.path.join(run, "checkpoints", f"step_{args.step}.pt")
        if not os.path.exists(path):
            raise SystemExit(f"{path} does not exist (--step?)")
        checkpoint, _ = nf_gcbc.load_checkpoint(path, "--runs")
        run_args = nf_gcbc.Args(**checkpoint["args"])
        env, _, val_data = nf_gcbc.load_ogbench(run_args.env_id, args.dataset_dir, False)
        obs, actions, goals = nf_gcbc.GoalDataset(val_data, torch.device("cpu")).sample(
            4_096, run_args.gamma, torch.Generator().manual_seed(0)
        )
        policy = nf_gcbc.POLICIES[run_args.policy](obs.shape[1], actions.shape[1], run_args)
        policy.load_state_dict(checkpoint["policy"])
        policy.eval()
        with torch.no_grad():  # as the evaluation calls it (the denoising step takes its own gradient)
            randn = lambda *s: torch.randn(len(obs), *s, generator=torch.Generator().manual_seed(0))  # noqa: E731
            error = (policy.act(obs, goals, randn) - actions).square().mean().item()
        line = f"{os.path.basename(run)} ({run_args.policy}): action MSE {error:.4f}"
        if run_args.policy == "flow" and args.no_denoise_eval:
            policy.use_denoise = False
            make_env = functools.partial(ogbench.make_env_and_datasets, run_args.env_id, env_only=True)
            envs = nf_gcbc.EnvPool(make_env, min(run_args.eval_envs, run_args.eval_episodes))
            batch = (obs[:1024], actions[:1024], goals[:1024])
            val_batch = batch + (policy.draw(batch[1], torch.Generator().manual_seed(0)),)
            num_tasks, device = len(env.unwrapped.task_infos), torch.device("cpu")
            stats = nf_gcbc.evaluate(policy, envs, num_tasks, val_batch, run_args, device, args.step, None)
            line += f"; success without denoising {stats['success']:.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
