"""One net for scale and shift (flow.py) against two separate nets (the paper's code): fit quality and cost.

Fits a conditional multimodal target: x in R^4 is two independent 2-D rings of 8 Gaussians, each rotated
by its own angle from the context (cond = [cos, sin] of both angles). Reports held-out NLL against the
target's true entropy, over seeds, and the time of one training step.

    python benchmarks/scale_shift_nets.py
"""

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tyro
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flow import AffineCoupling, ConditionalFlow, standard_normal_log_prob  # noqa: E402


@dataclass
class Args:
    steps: int = 2_000
    """training steps per run"""
    seeds: int = 3
    """runs per variant"""
    batch_size: int = 256
    """training batch"""
    num_blocks: int = 6
    """flow blocks"""
    hidden_dim: int = 256
    """coupling width (both variants)"""
    learning_rate: float = 1e-3
    """Adam learning rate (cosine decay)"""


MODES, RADIUS, STD = 8, 2.0, 0.15


def zero_linear(n_in, n_out):
    layer = nn.Linear(n_in, n_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def mlp(coupling, x1, cond):
    """The coupling's MLP: [x1, cond] -> its output layer."""
    h = torch.cat([x1, cond], -1)
    for linear, norm in zip(coupling.hidden, coupling.norms):
        h = F.layer_norm(F.leaky_relu(linear(h)), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return coupling.out(h)


class TwoNetCoupling(AffineCoupling):
    """The same coupling with a separate s-net and t-net, each of the full width (the paper's code)."""

    def __init__(self, dim: int, cond_dim: int, hidden_dim: int):
        super().__init__(dim, cond_dim, hidden_dim)  # its own layers become the t-net
        self.out = zero_linear(hidden_dim, dim - self.split)
        self.s_net = AffineCoupling(dim, cond_dim, hidden_dim)
        self.s_net.out = zero_linear(hidden_dim, dim - self.split)

    def _params(self, x1, cond):
        return mlp(self.s_net, x1, cond), mlp(self, x1, cond), None


def sample_target(n):
    angles = 2 * math.pi * torch.rand(n, 2)
    k = torch.randint(MODES, (n, 2)) * (2 * math.pi / MODES) + angles
    x = torch.stack([RADIUS * k.cos(), RADIUS * k.sin()], -1).reshape(n, 4) + STD * torch.randn(n, 4)
    cond = torch.cat([angles.cos(), angles.sin()], -1)
    return x, cond


def target_log_prob(x, cond):
    angles = torch.atan2(cond[:, 2:], cond[:, :2])  # [n, 2]
    k = torch.arange(MODES) * (2 * math.pi / MODES)
    phase = angles[:, :, None] + k  # [n, 2, M]
    means = torch.stack([RADIUS * phase.cos(), RADIUS * phase.sin()], -1)  # [n, 2, M, 2]
    comp = standard_normal_log_prob((x.reshape(-1, 2, 1, 2) - means) / STD) - 2 * math.log(STD)
    return (torch.logsumexp(comp, -1) - math.log(MODES)).sum(-1)


def run(args: Args, two_nets: bool, seed: int):
    torch.manual_seed(seed)
    flow = ConditionalFlow(4, 4, args.num_blocks, args.hidden_dim)
    if two_nets:
        flow.couplings = nn.ModuleList(TwoNetCoupling(4, 4, args.hidden_dim) for _ in range(args.num_blocks))
    opt = torch.optim.Adam(flow.parameters(), lr=args.learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    start = time.perf_counter()
    for _ in range(args.steps):
        x, cond = sample_target(args.batch_size)
        loss = -flow.log_prob(x, cond).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    step_time = (time.perf_counter() - start) / args.steps
    torch.manual_seed(1_000)
    x, cond = sample_target(20_000)
    with torch.no_grad():
        nll = -flow.log_prob(x, cond).mean().item()
    return nll, step_time, sum(p.numel() for p in flow.parameters())


def main(args: Args):
    torch.manual_seed(1_000)
    x, cond = sample_target(20_000)
    entropy = -target_log_prob(x, cond).mean().item()
    print(f"target: 2 rings of {MODES} modes in R^4, true conditional entropy {entropy:.3f} nats")
    for name, two_nets in (("one net (s, t)", False), ("two nets (s), (t)", True)):
        results = [run(args, two_nets, seed) for seed in range(args.seeds)]
        nlls = [r[0] for r in results]
        ms = 1e3 * statistics.median(r[1] for r in results)
        spread = statistics.stdev(nlls) if len(nlls) > 1 else 0.0
        print(
            f"{name:18s}: NLL {statistics.mean(nlls):.3f} +- {spread:.3f} ({args.seeds} seeds, {args.steps} steps), "
            f"{results[0][2]:,} parameters, {ms:.1f} ms/step"
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
