"""Speed of policy classes at the same size: our flow against a Gaussian, diffusion and flow matching (a benchmark).

Every policy maps an observation history to a chunk of actions with the same observation encoder (nf_bc.py's:
4 x 512, SiLU, LayerNorm -> 256) and an action head sized so that the whole policy has the flow's parameter
count (within 5%, checked):
- flow: nf_bc.py's flow (12 blocks x 512 by default), one inverse pass; "flow+denoise" adds the Tweedie step;
- gaussian: an MLP head (3 hidden layers) to a mean and log-std: the floor, one pass, no invertibility;
- ddpm-100 / ddim-10: Diffusion Policy's usual settings: an MLP noise predictor eps(x_t, t, obs) with a
  sinusoidal time embedding (4 hidden layers), 100 ancestral DDPM steps, or the same network with 10 DDIM steps;
- fm-10: flow matching, the same network as a velocity field, 10 Euler steps.
Measured: training steps per second (loss + backward + fused Adam, batch 256) and action latency at batch 1 and 256
(no_grad; the flow+denoise row needs one gradient w.r.t. the action), medians over interleaved rounds after
warm-up. CPU with the thread count printed, or CUDA (`--device cuda`, timed with CUDA events).

    python benchmarks/policy_speed.py                  # CPU, torch's default threads
    python benchmarks/policy_speed.py --threads 1
    python benchmarks/policy_speed.py --device cuda
"""

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flow import ConditionalFlow, denoise  # noqa: E402


@dataclass
class Args:
    obs_dim: int = 20
    """observation history size (e.g. h = 2 observations of 10 numbers)"""
    action_dim: int = 2
    """action size"""
    action_horizon: int = 8
    """actions per chunk (the flow models action_dim x action_horizon numbers)"""
    num_blocks: int = 12
    """flow blocks (nf_bc.py's default)"""
    hidden_dim: int = 512
    """width of the flow's coupling networks (nf_bc.py's default)"""
    rep_dim: int = 256
    """observation encoding size"""
    diffusion_steps: int = 100
    """DDPM steps (training and ancestral sampling)"""
    ddim_steps: int = 10
    """DDIM sampling steps, same network"""
    fm_steps: int = 10
    """flow-matching Euler steps"""
    batch_size: int = 256
    """training batch and the large sampling batch"""
    device: Literal["cpu", "cuda"] = "cpu"
    """where to time"""
    threads: int = 0
    """CPU torch threads (0: torch's default)"""
    rounds: int = 7
    """measurement rounds (medians are reported)"""
    min_time: float = 0.3
    """seconds each measurement repeats its call for, at least"""
    compile: bool = False
    """torch.compile every network (compile time is not counted)"""
    seed: int = 0
    """random seed"""


def mlp(sizes, activation=nn.SiLU, layer_norm=True) -> nn.Sequential:
    layers = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), activation()] + (
            [nn.LayerNorm(sizes[i + 1])] if layer_norm else []
        )
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


def mlp_params(sizes, layer_norm=True) -> int:
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:])) + (2 * sum(sizes[1:-1]) if layer_norm else 0)


def width_for(target: int, sizes_of) -> int:
    """The hidden width w whose MLP sizes_of(w) has the parameter count closest to target."""
    return min(range(16, 8192), key=lambda w: abs(mlp_params(sizes_of(w)) - target))


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def time_embedding(t: torch.Tensor, dim: int = 32) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] ([B] -> [B, dim])."""
    freqs = torch.exp(torch.arange(dim // 2, device=t.device) * (-math.log(1000.0) / (dim // 2 - 1)))
    angles = 1000.0 * t[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], -1)


class FlowPolicy(nn.Module):
    def __init__(self, args: Args, dim: int):
        super().__init__()
        self.encoder = mlp([args.obs_dim] + [512] * 4 + [args.rep_dim])
        self.flow = ConditionalFlow(dim, args.rep_dim, args.num_blocks, args.hidden_dim)

    def loss(self, obs, actions):
        return -self.flow.log_prob(actions, self.encoder(obs)).mean()

    def act(self, obs):
        return self.flow.sample(self.encoder(obs))


class DenoisedFlowPolicy(FlowPolicy):
    def act(self, obs):
        cond = self.encoder(obs)
        return denoise(self.flow, self.flow.sample(cond), cond, 0.1)


class GaussianPolicy(nn.Module):
    def __init__(self, args: Args, dim: int, width: int):
        super().__init__()
        self.encoder = mlp([args.obs_dim] + [512] * 4 + [args.rep_dim])
        self.head = mlp([args.rep_dim] + [width] * 3 + [2 * dim])

    def loss(self, obs, actions):
        mean, log_std = self.head(self.encoder(obs)).chunk(2, -1)
        return -torch.distributions.Normal(mean, log_std.clamp(-5, 2).exp()).log_prob(actions).sum(-1).mean()

    def act(self, obs):
        return self.head(self.encoder(obs)).chunk(2, -1)[0]


class IterativePolicy(nn.Module):
    """The shared network of the diffusion and flow-matching policies: net(x_t, embed(t), encoder(obs))."""

    def __init__(self, args: Args, dim: int, width: int):
        super().__init__()
        self.dim = dim
        self.encoder = mlp([args.obs_dim] + [512] * 4 + [args.rep_dim])
        self.net = mlp([dim + 32 + args.rep_dim] + [width] * 4 + [dim])

    def predict(self, x, t, cond):
        return self.net(torch.cat([x, time_embedding(t), cond], -1))


class DiffusionPolicy(IterativePolicy):
    """DDPM (epsilon prediction, linear betas 1e-4 .. 0.02) with ancestral sampling, or DDIM (eta 0) on a
    stride of the same schedule."""

    def __init__(self, args: Args, dim: int, width: int, sample_steps: int):
        super().__init__(args, dim, width)
        self.train_steps, self.sample_steps = args.diffusion_steps, sample_steps
        betas = torch.linspace(1e-4, 0.02, args.diffusion_steps)
        self.register_buffer("betas", betas)
        self.register_buffer("alpha_bars", torch.cumprod(1 - betas, 0))

    def loss(self, obs, actions):
        k = torch.randint(self.train_steps, (len(obs),), device=obs.device)
        noise = torch.randn_like(actions)
        a_bar = self.alpha_bars[k][:, None]
        x = a_bar.sqrt() * actions + (1 - a_bar).sqrt() * noise
        return F.mse_loss(self.predict(x, k.float() / self.train_steps, self.encoder(obs)), noise)

    def act(self, obs):
        cond = self.encoder(obs)
        x = torch.randn(len(obs), self.dim, device=obs.device)
        if self.sample_steps == self.train_steps:  # DDPM, ancestral
            for k in reversed(range(self.train_steps)):
                t = torch.full((len(obs),), k / self.train_steps, device=obs.device)
                eps = self.predict(x, t, cond)
                beta, a_bar = self.betas[k], self.alpha_bars[k]
                x = (x - beta / (1 - a_bar).sqrt() * eps) / (1 - beta).sqrt()
                if k > 0:
                    x = x + beta.sqrt() * torch.randn_like(x)
            return x
        ks = torch.linspace(self.train_steps - 1, 0, self.sample_steps).round().long().tolist()
        for i, k in enumerate(ks):  # DDIM, deterministic
            t = torch.full((len(obs),), k / self.train_steps, device=obs.device)
            eps = self.predict(x, t, cond)
            a_bar = self.alpha_bars[k]
            x0 = (x - (1 - a_bar).sqrt() * eps) / a_bar.sqrt()
            a_prev = self.alpha_bars[ks[i + 1]] if i + 1 < len(ks) else torch.ones((), device=obs.device)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x


class FlowMatchingPolicy(IterativePolicy):
    """Rectified flow: x_t = (1 - t) z + t a, the network regresses a - z; Euler steps from t = 0 to 1."""

    def __init__(self, args: Args, dim: int, width: int):
        super().__init__(args, dim, width)
        self.steps = args.fm_steps

    def loss(self, obs, actions):
        t = torch.rand(len(obs), device=obs.device)
        z = torch.randn_like(actions)
        x = (1 - t[:, None]) * z + t[:, None] * actions
        return F.mse_loss(self.predict(x, t, self.encoder(obs)), actions - z)

    def act(self, obs):
        cond = self.encoder(obs)
        x = torch.randn(len(obs), self.dim, device=obs.device)
        for i in range(self.steps):
            t = torch.full((len(obs),), i / self.steps, device=obs.device)
            x = x + self.predict(x, t, cond) / self.steps
        return x


def main(args: Args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dim = args.action_dim * args.action_horizon

    flow = FlowPolicy(args, dim)
    head_target = num_params(flow) - num_params(flow.encoder)  # the flow's own parameters
    gauss_width = width_for(head_target, lambda w: [args.rep_dim] + [w] * 3 + [2 * dim])
    iter_width = width_for(head_target, lambda w: [dim + 32 + args.rep_dim] + [w] * 4 + [dim])
    denoised = DenoisedFlowPolicy(args, dim)
    denoised.load_state_dict(flow.state_dict())
    ddpm = DiffusionPolicy(args, dim, iter_width, args.diffusion_steps)
    ddim = DiffusionPolicy(args, dim, iter_width, args.ddim_steps)
    ddim.load_state_dict(ddpm.state_dict())
    policies = {
        "flow": flow,
        "flow+denoise": denoised,
        "gaussian": GaussianPolicy(args, dim, gauss_width),
        f"ddpm-{args.diffusion_steps}": ddpm,
        f"ddim-{args.ddim_steps}": ddim,
        f"fm-{args.fm_steps}": FlowMatchingPolicy(args, dim, iter_width),
    }
    for name, policy in policies.items():
        policy.to(device)
        off = num_params(policy) / num_params(flow) - 1
        if abs(off) > 0.05:
            raise SystemExit(
                f"{name}: {num_params(policy):,} parameters, {off:+.1%} off the flow's {num_params(flow):,}"
            )
        if args.compile:  # the whole loss and the whole sampler, loops included
            policy.loss, policy.act = torch.compile(policy.loss), torch.compile(policy.act)

    obs = torch.randn(args.batch_size, args.obs_dim, device=device)
    actions = torch.randn(args.batch_size, dim, device=device).clamp(-3, 3)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        """Seconds per call, fn repeated for at least min_time (CUDA: measured with events)."""
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync()
            start.record()
            fn()
            end.record()
            sync()
            reps = max(1, int(args.min_time / max(start.elapsed_time(end) / 1e3, 1e-6)))
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            sync()
            return start.elapsed_time(end) / 1e3 / reps
        reps, begin = 0, time.perf_counter()
        while reps == 0 or time.perf_counter() - begin < args.min_time:
            fn()
            reps += 1
        return (time.perf_counter() - begin) / reps

    jobs = {}
    for name, policy in policies.items():
        optimizer = torch.optim.Adam(policy.parameters(), lr=1e-4, fused=True)  # as the scripts

        def train(policy=policy, optimizer=optimizer):
            loss = policy.loss(obs, actions)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def act(batch, policy=policy):
            with torch.no_grad():
                policy.act(obs[:batch])

        if name != "flow+denoise":  # the same training step as the flow
            jobs[(name, "train")] = train
        jobs[(name, "b1")] = lambda act=act: act(1)
        jobs[(name, "bN")] = lambda act=act: act(args.batch_size)
    for policy in policies.values():
        policy.eval()  # the flow caches its LU matrices while gradients are off
    for fn in jobs.values():  # warm-up (and compilation)
        fn()
        fn()
    times = {key: [] for key in jobs}
    for _ in range(args.rounds):  # interleaved, so machine noise hits every policy alike
        for key, fn in jobs.items():
            times[key].append(timed(fn))
    med = {key: statistics.median(v) for key, v in times.items()}

    where = (
        f"CUDA ({torch.cuda.get_device_name()})" if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"torch {torch.__version__}, {where}, {'torch.compile' if args.compile else 'eager'}; obs {args.obs_dim}, "
        f"actions {args.action_dim} x {args.action_horizon} = {dim}; medians of {args.rounds} rounds"
    )
    print(
        f"sizes: flow {args.num_blocks} blocks x {args.hidden_dim}; gaussian head 3 x {gauss_width}; "
        f"diffusion / flow-matching net 4 x {iter_width}; every policy has the encoder 4 x 512 -> {args.rep_dim}"
    )
    print()
    print(
        f"| policy | parameters | train steps/s (b={args.batch_size}) | latency b=1 (ms) "
        f"| latency b={args.batch_size} (ms) | b=1 time / flow's |"
    )
    print("|---|---|---|---|---|---|")
    for name, policy in policies.items():
        train = f"{1 / med[(name, 'train')]:.1f}" if (name, "train") in med else "(as flow)"
        ratio = med[(name, "b1")] / med[("flow", "b1")]
        print(
            f"| {name} | {num_params(policy):,} | {train} | {1e3 * med[(name, 'b1')]:.3f} "
            f"| {1e3 * med[(name, 'bN')]:.2f} | {ratio:.2f} |"
        )
    print()
    b1 = {name: med[(name, "b1")] for name in policies}
    ddpm_name, fm_name = f"ddpm-{args.diffusion_steps}", f"fm-{args.fm_steps}"
    checks = [
        (f"flow sampling b=1 vs {ddpm_name}", b1[ddpm_name] / b1["flow"], ">=", 20, "x faster"),
        (f"flow sampling b=1 vs {fm_name}", b1[fm_name] / b1["flow"], ">=", 3, "x faster"),
        ("flow sampling b=1 vs gaussian", b1["flow"] / b1["gaussian"], "<=", 3, "x slower"),
        ("flow training step vs gaussian", med[("flow", "train")] / med[("gaussian", "train")], "<=", 2, "x the cost"),
    ]
    for what, value, op, target, unit in checks:
        met = value >= target if op == ">=" else value <= target
        print(f"{what}: {value:.2f}{unit} (target {op} {target}: {'met' if met else 'MISSED'})")


if __name__ == "__main__":
    main(tyro.cli(Args))
