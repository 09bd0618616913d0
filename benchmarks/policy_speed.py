"""Speed of the policy classes of nf_bc.py or nf_gcbc.py: the flow against its competitors (a benchmark).

The policies are the scripts' own classes (`POLICIES`), built from the script's `Args`, and the training step
is the script's own `update` (loss, backward, fused AdamW, learning-rate schedule) on synthetic batches of the
real shapes, so no dataset or environment is needed. The diffusion and flow-matching networks are sized by the
scripts to the flow's parameter count.
Measured: training steps per second (batch `--batch-size`) and action latency at batch 1 and at the batch size
(`act` under no_grad, as the evaluation calls it; the flow's denoising step takes one gradient w.r.t. the
action), medians over interleaved rounds after warm-up. CPU with the thread count printed, or CUDA (timed with
CUDA events).

    python benchmarks/policy_speed.py --script nf_bc --num-blocks 6 --hidden-dim 256 --obs-dim 2 --action-dim 2
    python benchmarks/policy_speed.py --script nf_gcbc --obs-dim 28 --action-dim 5     # cube-single's sizes
    python benchmarks/policy_speed.py --script nf_bc --threads 1 --device cuda
"""

import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nf_bc  # noqa: E402
import nf_gcbc  # noqa: E402


@dataclass
class Args:
    script: Literal["nf_bc", "nf_gcbc"] = "nf_bc"
    """whose policies and training step to time"""
    obs_dim: int = 2
    """size of one observation (nf_gcbc: the goal has the same size)"""
    action_dim: int = 2
    """size of one action"""
    num_blocks: Optional[int] = None
    """flow blocks (default: the script's)"""
    hidden_dim: Optional[int] = None
    """width of the flow's coupling networks (default: the script's)"""
    rep_dim: Optional[int] = None
    """encoding size (default: the script's)"""
    batch_size: int = 256
    """training batch and the large action batch"""
    device: Literal["cpu", "cuda"] = "cpu"
    """where to time"""
    threads: int = 0
    """CPU torch threads (0: torch's default)"""
    rounds: int = 7
    """measurement rounds (medians are reported)"""
    min_time: float = 0.3
    """seconds each measurement repeats its call for, at least"""
    seed: int = 0
    """random seed"""


def variants(args: Args):
    """(name, the script's Args) for every policy the script offers, with the samplers' common settings."""
    script = nf_bc if args.script == "nf_bc" else nf_gcbc
    sizes = {k: getattr(args, k) for k in ("num_blocks", "hidden_dim", "rep_dim") if getattr(args, k) is not None}
    base = script.Args(**sizes)
    found = [("flow+denoise", base), ("flow", dataclasses.replace(base, denoise=False))]
    found += [("gaussian", dataclasses.replace(base, policy="gaussian"))]
    if args.script == "nf_bc":
        found += [("ddim-10", dataclasses.replace(base, policy="diffusion", diffusion_steps=10))]
        found += [("ddpm-100", dataclasses.replace(base, policy="diffusion", diffusion_steps=100))]
    found += [("fm-10", dataclasses.replace(base, policy="flow-matching", flow_steps=10))]
    return script, found


def timed(fn, device, min_time: float) -> float:
    """Seconds per call, fn repeated for at least min_time (CUDA: measured with events)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        reps = max(1, int(min_time / max(start.elapsed_time(end) / 1e3, 1e-6)))
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    reps, begin = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - begin < min_time:
        fn()
        reps += 1
    return (time.perf_counter() - begin) / reps


def main(args: Args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    script, found = variants(args)
    n, o, a = args.batch_size, args.obs_dim, args.action_dim
    if args.script == "nf_bc":
        h, k = found[0][1].obs_horizon, found[0][1].action_horizon
        batch = (torch.randn(n, h, o, device=device), torch.rand(n, k, a, device=device) * 2 - 1)
        observe = lambda b: (batch[0][:b],)  # noqa: E731
    else:
        obs, goals = torch.randn(n, o, device=device), torch.randn(n, o, device=device)
        batch = (obs, torch.rand(n, a, device=device) * 2 - 1, goals)
        observe = lambda b: (obs[:b], goals[:b])  # noqa: E731

    policies, jobs = {}, {}
    for name, script_args in found:
        policy = script.POLICIES[script_args.policy](o, a, script_args).to(device)
        trained = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, script_args.learning_rate, fused=True)  # as the scripts
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        generator = torch.Generator(device).manual_seed(0)
        policies[name] = (policy, sum(p.numel() for p in trained))

        def train(policy=policy, optimizer=optimizer, scheduler=scheduler):
            script.update(policy, policy, optimizer, batch)
            scheduler.step()

        def act(b, policy=policy, generator=generator):
            with torch.no_grad():
                policy.act(*observe(b), lambda *s: torch.randn(b, *s, generator=generator, device=device))

        if name not in ("flow", "ddpm-100"):  # the same training step as flow+denoise and ddim-10
            jobs[(name, "train")] = train
        jobs[(name, "b1")] = lambda act=act: act(1)
        jobs[(name, "bN")] = lambda act=act: act(n)
    for fn in jobs.values():  # warm-up
        fn()
        fn()
    times = {key: [] for key in jobs}
    for _ in range(args.rounds):  # interleaved, so machine noise hits every policy alike
        for key, fn in jobs.items():
            policies[key[0]][0].train(key[1] == "train")  # evaluation runs in eval mode (cached flow matrices)
            times[key].append(timed(fn, device, args.min_time))
    med = {key: statistics.median(v) for key, v in times.items()}

    where = (
        f"CUDA ({torch.cuda.get_device_name()})" if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    base = found[0][1]
    print(
        f"{args.script}.py policies; torch {torch.__version__}, {where}; obs {o}, actions {a}"
        + (f", history {base.obs_horizon}, chunk {base.action_horizon}" if args.script == "nf_bc" else "")
        + f"; flow {base.num_blocks} blocks x {base.hidden_dim}, encoding {base.rep_dim}"
        + f"; medians of {args.rounds} rounds"
    )
    print()
    print(
        f"| policy | parameters | train steps/s (b={n}) | latency b=1 (ms) | latency b={n} (ms) | b=1 time / flow's |"
    )
    print("|---|---|---|---|---|---|")
    for name, (policy, count) in policies.items():
        trained = {"flow": "flow+denoise", "ddpm-100": "ddim-10"}.get(name, name)
        ratio = med[(name, "b1")] / med[("flow+denoise", "b1")]
        print(
            f"| {name} | {count:,} | {1 / med[(trained, 'train')]:.1f} | {1e3 * med[(name, 'b1')]:.3f} "
            f"| {1e3 * med[(name, 'bN')]:.2f} | {ratio:.2f} |"
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
