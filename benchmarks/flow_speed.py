"""Speed of the flow against a Gaussian MLP policy with the same parameter count (a benchmark, not a test).

Prints training steps per second (NLL + backward + Adam, batch 256) and sampling latency (batch 1 and 256,
no_grad), medians over rounds that alternate the two models, and the flow / Gaussian ratios.

    python benchmarks/flow_speed.py                 # both cores
    python benchmarks/flow_speed.py --threads 1
    python benchmarks/flow_speed.py --compile       # both models through torch.compile
"""

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import tyro
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flow import ConditionalFlow  # noqa: E402


@dataclass
class Args:
    dim: int = 5
    """action size"""
    cond_dim: int = 64
    """context size"""
    num_blocks: int = 6
    """flow blocks"""
    hidden_dim: int = 256
    """width of the coupling nets"""
    batch_size: int = 256
    """training batch"""
    threads: int = 0
    """torch threads (0: torch's default)"""
    rounds: int = 15
    """measurement rounds (medians are reported)"""
    seed: int = 0
    """random seed"""
    compile: bool = False
    """torch.compile the training step and the sampler of both models (compile time is not counted)"""


class GaussianPolicy(nn.Module):
    """MLP -> (mean, log_std), 3 hidden layers of `width` with GELU."""

    def __init__(self, dim: int, cond_dim: int, width: int):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(
            nn.Linear(cond_dim, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, 2 * dim),
        )

    def log_prob(self, x, cond):
        mean, log_std = self.net(cond).chunk(2, -1)
        return torch.distributions.Normal(mean, log_std.exp()).log_prob(x).sum(-1)

    def sample(self, cond):
        mean, log_std = self.net(cond).chunk(2, -1)
        return mean + log_std.exp() * torch.randn_like(mean)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matching_width(target: int, dim: int, cond_dim: int) -> int:
    """Width w of GaussianPolicy with the parameter count closest to `target` (2 w^2 + ... = target)."""
    a, b, c = 2, cond_dim + 3 + 2 * dim, 2 * dim - target
    return round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))


def timed(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main(args: Args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    flow = ConditionalFlow(args.dim, args.cond_dim, args.num_blocks, args.hidden_dim)
    gauss = GaussianPolicy(args.dim, args.cond_dim, matching_width(num_params(flow), args.dim, args.cond_dim))
    models = {"flow": flow, "gaussian": gauss}
    x, cond = torch.randn(args.batch_size, args.dim), torch.randn(args.batch_size, args.cond_dim)

    def train_step(model, opt):
        nll = (
            torch.compile(lambda: -model.log_prob(x, cond).mean())
            if args.compile
            else (lambda: -model.log_prob(x, cond).mean())
        )
        opt_step = torch.compile(opt.step) if args.compile else opt.step

        def step():
            loss = nll()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt_step()

        return step

    def sampler(model, batch):
        sample_fn = torch.compile(model.sample) if args.compile else model.sample

        def sample():
            with torch.no_grad():
                sample_fn(cond[:batch])

        return sample

    jobs = {}
    for name, model in models.items():
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        jobs[(name, "train")] = (train_step(model, opt), 20)
        jobs[(name, "sample1")] = (sampler(model, 1), 200)
        jobs[(name, "sample256")] = (sampler(model, args.batch_size), 50)
    for fn, reps in jobs.values():  # warm-up
        timed(fn, reps)
    times = {key: [] for key in jobs}
    for _ in range(args.rounds):  # interleave so that machine noise hits both models alike
        for key, (fn, reps) in jobs.items():
            times[key].append(timed(fn, reps))
    med = {key: statistics.median(v) for key, v in times.items()}

    mode = "torch.compile" if args.compile else "eager"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {mode}; "
        f"dim {args.dim}, cond {args.cond_dim}"
    )
    print(
        f"flow: {args.num_blocks} blocks x {args.hidden_dim}, {num_params(flow):,} parameters; "
        f"gaussian: 3 x {gauss.net[0].out_features} MLP, {num_params(gauss):,} parameters"
    )
    print(f"{'':10s} {'train steps/s':>14s} {'sample b=1 (ms)':>16s} {f'sample b={args.batch_size} (ms)':>18s}")
    for name in models:
        print(
            f"{name:10s} {1 / med[(name, 'train')]:14.1f} {1e3 * med[(name, 'sample1')]:16.3f} "
            f"{1e3 * med[(name, 'sample256')]:18.3f}"
        )
    ratio = {kind: med[("flow", kind)] / med[("gaussian", kind)] for kind in ("train", "sample1", "sample256")}
    print(
        f"flow / gaussian time: train step {ratio['train']:.2f}x (target <= 2), "
        f"sample b=1 {ratio['sample1']:.2f}x (target <= 3), sample b={args.batch_size} {ratio['sample256']:.2f}x"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
