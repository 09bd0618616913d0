"""Offline training steps per second of nf_rlbc.py's update (critic, actor, temperature off, target critic) for
each actor, optionally beside an earlier version of the script in the same run (a benchmark).

The networks are the script's own classes built from its `Args`, the step is its own `update` with its fused
Adam optimisers, on synthetic batches of the given shapes (cube-single's by default), so no dataset or
environment is needed. Versions and actors are timed in interleaved rounds, medians reported, so machine noise
hits every variant alike.

    python benchmarks/rlbc_speed.py --threads 1                                  # default sizes
    python benchmarks/rlbc_speed.py --threads 1 --before 1153148                 # that commit's script beside this one
    python benchmarks/rlbc_speed.py --threads 1 --encoder-dim 256 --critic-dim 256 --hidden-dim 128

Each row also gives the step's floating-point work (counted by torch's FlopCounterMode: the matrix products,
forward and backward) and the rate it achieves, against the rate of one plain matrix product of the critics'
largest shape ([batch, width] @ [width, width]) on the same threads: the share of that rate is how much a faster
implementation of the same arithmetic could still gain.
"""

import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List, Literal, Optional

import torch
import tyro
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from policy_speed import timed  # noqa: E402  (the same timing as the policy benchmark; CUDA: events)


@dataclass
class Args:
    before: Optional[str] = None
    """a git revision whose nf_rlbc.py (and flow.py) is timed beside the working tree's"""
    policies: List[str] = field(default_factory=lambda: ["flow", "gaussian", "fql"])
    """actors to time (a version that lacks one skips it)"""
    obs_dim: int = 28
    """size of one observation (cube-single: 28)"""
    action_dim: int = 5
    """size of one action (cube-single: 5)"""
    num_blocks: Optional[int] = None
    """flow blocks (default: the script's)"""
    hidden_dim: Optional[int] = None
    """width of the flow's coupling networks (default: the script's)"""
    encoder_dim: Optional[int] = None
    """width of the actor's encoder / FQL's MLPs (default: the script's)"""
    critic_dim: Optional[int] = None
    """width of each critic (default: the script's)"""
    batch_size: int = 256
    """training batch"""
    threads: int = 0
    """CPU torch threads (0: torch's default)"""
    device: Literal["cpu", "cuda"] = "cpu"
    """where to time"""
    rounds: int = 5
    """measurement rounds (medians are reported)"""
    min_time: float = 1.0
    """seconds each measurement repeats the step for, at least"""
    compile: bool = False
    """also time the working tree's step compiled as the script's --compile does (CUDA: and captured as a graph)"""


def load(revision: Optional[str]):
    """nf_rlbc as a module: the working tree's, or a revision's (with that revision's flow.py)."""
    if revision is None:
        sys.path.insert(0, ROOT)
        import nf_rlbc

        return nf_rlbc
    folder = tempfile.mkdtemp(prefix="rlbc_speed_")
    for name in ("nf_rlbc.py", "flow.py"):
        source = subprocess.run(["git", "-C", ROOT, "show", f"{revision}:{name}"], capture_output=True, check=True)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(source.stdout)
    current_flow = sys.modules.pop("flow", None)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"nf_rlbc_{revision}", os.path.join(folder, "nf_rlbc.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
        sys.modules.pop("flow", None)
        if current_flow is not None:
            sys.modules["flow"] = current_flow
    return module


def step_function(module, policy: str, args: Args, device, compile: bool = False):
    """The version's offline update on a fixed synthetic batch, and its parameter counts; None without the actor."""
    sizes = {k: getattr(args, k) for k in ("num_blocks", "hidden_dim", "encoder_dim", "critic_dim")}
    try:
        script_args = module.Args(policy=policy, **{k: v for k, v in sizes.items() if v is not None})
    except Exception:
        return None
    actors = getattr(module, "ACTORS", {"flow": module.FlowActor, "gaussian": module.GaussianActor})
    if policy not in actors:
        return None
    o, a, n = args.obs_dim, args.action_dim, args.batch_size
    actor = actors[policy](o, a, script_args).to(device)
    critic = module.Critic(o, a, script_args.critic_dim).to(device)
    target_critic = module.Critic(o, a, script_args.critic_dim).to(device).requires_grad_(False)
    if compile:
        for network in (critic, target_critic, *actor.children()):
            network.compile()
    log_temperature = torch.zeros((), device=device, requires_grad=True)
    graphed = compile and device.type == "cuda" and hasattr(module, "cuda_graphed")  # as the script's --compile
    adam = lambda params: torch.optim.Adam(  # noqa: E731
        params, lr=script_args.learning_rate, fused=True, capturable=graphed
    )
    optimizers = {"actor": adam(actor.parameters()), "critic": adam(critic.parameters())}
    optimizers["temperature"] = adam([log_temperature])
    batch = {
        "observations": torch.randn(n, o, device=device),
        "actions": torch.rand(n, a, device=device) * 2 - 1,
        "rewards": -torch.ones(n, device=device),
        "masks": torch.ones(n, device=device),
        "next_observations": torch.randn(n, o, device=device),
        "offline": torch.ones(n, device=device),
    }
    settings = dict(discount=0.99, tau=0.005, q_agg="min", target_entropy=-float(a), entropy_weight=0.0)

    def update(batch):
        return module.update(
            batch,
            actor=actor,
            critic=critic,
            target_critic=target_critic,
            optimizers=optimizers,
            log_temperature=log_temperature,
            online=False,
            bc_weight=script_args.alpha,
            **settings,
        )

    if graphed:
        captured = [optimizers["critic"], optimizers["actor"]]
        update = module.cuda_graphed(update, batch, [actor, critic, target_critic], captured)

    def step():
        update(batch)

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return step, count(actor), count(critic), script_args


def main(args: Args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    device = torch.device(args.device)
    versions = {"working tree": load(None)}
    if args.before is not None:
        versions = {args.before: load(args.before), **versions}
    jobs = {}
    for version, module in versions.items():
        for policy in args.policies:
            torch.manual_seed(0)
            built = step_function(module, policy, args, device)
            if built is not None:
                jobs[(version, policy)] = built
            if args.compile and version == "working tree":
                torch.manual_seed(0)
                jobs[("compiled", policy)] = step_function(module, policy, args, device, compile=True)
    for step, *_ in jobs.values():  # warm-up
        step()
        step()
    flops = {}
    for key, (step, *_) in jobs.items():
        with FlopCounterMode(display=False) as counter:
            step()
        flops[key] = counter.get_total_flops()
    width = next(iter(jobs.values()))[3].critic_dim
    x, w = torch.randn(args.batch_size, width, device=device), torch.randn(width, width, device=device)
    seconds = statistics.median(timed(lambda: torch.mm(x, w), device, args.min_time) for _ in range(args.rounds))
    matmul_rate = 2 * args.batch_size * width * width / seconds
    times = {key: [] for key in jobs}
    for _ in range(args.rounds):
        for key, (step, *_) in jobs.items():
            times[key].append(timed(step, device, args.min_time))
    med = {key: statistics.median(v) for key, v in times.items()}

    sizes = next(iter(jobs.values()))[3]
    where = (
        f"CUDA ({torch.cuda.get_device_name()})" if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"nf_rlbc.py offline update; torch {torch.__version__}, {where}; "
        f"obs {args.obs_dim}, actions {args.action_dim}, "
        f"batch {args.batch_size}; flow {sizes.num_blocks} x {sizes.hidden_dim}, encoder {sizes.encoder_dim}, "
        f"critics 2 x {sizes.critic_dim}; medians of {args.rounds} rounds\n"
    )
    shape = f"[{args.batch_size}, {width}] @ [{width}, {width}]"
    print(f"One {shape} matrix product runs at {matmul_rate / 1e9:.1f} GFLOP/s.\n")
    print(
        "| version | actor | actor parameters | critic parameters | steps/s | speed-up over "
        + f"{args.before or '--before'} | GFLOP per step | GFLOP/s | share of the matrix product's rate |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (version, policy), (_, actor_count, critic_count, _) in jobs.items():
        before = med.get((args.before, policy))
        seconds = med[(version, policy)]
        ratio = f"{before / seconds:.2f}x" if before else "-"
        rate = flops[(version, policy)] / seconds
        work = f"{flops[(version, policy)] / 1e9:.2f} | {rate / 1e9:.1f} | {rate / matmul_rate:.0%}"
        print(f"| {version} | {policy} | {actor_count:,} | {critic_count:,} | {1 / seconds:.1f} | {ratio} | {work} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
