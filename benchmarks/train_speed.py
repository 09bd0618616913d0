"""Training steps per second (eager and compiled) and batch-1 action latency of every script and every policy it
offers, at the scripts' default network sizes, on CPU or CUDA (a benchmark).

Each row is the script's own networks built from its own `Args`, its own `update` (with the scripts' fused
optimisers) on a fixed synthetic batch of the real shapes (cube-single's 28-D observations and 5-D actions for the
offline scripts, the point maze's 2-D ones for nf_goal_explore.py), so no dataset or environment is needed.
"Compiled" is what the script's --compile does: torch.compile of its networks and, on CUDA, the whole step captured
as a CUDA graph (nf_rlbc.py: its offline step; nf_goal_explore.py: its update). Latency: the
evaluation's `act` on one observation under no_grad (nf_goal_explore.py: its actor's action). All variants are
timed in interleaved rounds, medians reported.

    python benchmarks/train_speed.py                           # CPU, every script, eager only
    python benchmarks/train_speed.py --device cuda --compile   # the GPU table (scripts/gpu_check.sh runs this)
    python benchmarks/train_speed.py --scripts nf_gcbc --threads 1
"""

import copy
import functools
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import List, Literal

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from policy_speed import timed  # noqa: E402  (CUDA: timed with events)
from rlbc_speed import Args as RlbcSizes  # noqa: E402  (cube-single's shapes, the script's default sizes)
from rlbc_speed import step_function  # noqa: E402

import nf_bc  # noqa: E402
import nf_gcbc  # noqa: E402
import nf_goal_explore  # noqa: E402
import nf_rlbc  # noqa: E402

SCRIPTS = {
    "nf_gcbc": ["flow", "gaussian", "flow-matching"],
    "nf_bc": ["flow", "gaussian", "flow-matching", "diffusion"],
    "nf_rlbc": ["flow", "gaussian", "fql"],
    "nf_goal_explore": ["flow", "gaussian"],
}


@dataclass
class Args:
    scripts: List[str] = field(default_factory=lambda: list(SCRIPTS))
    """which scripts to time"""
    policies: List[str] = field(default_factory=lambda: ["all"])
    """which policies to time (all: each script's every policy)"""
    device: Literal["cpu", "cuda"] = "cpu"
    """where to time"""
    compile: bool = False
    """also time each training step compiled, as the script's --compile does (CPU: minutes to compile)"""
    batch_size: int = 256
    """training batch (the scripts' default)"""
    threads: int = 0
    """CPU torch threads (0: torch's default)"""
    rounds: int = 5
    """measurement rounds (medians are reported)"""
    min_time: float = 0.5
    """seconds each measurement repeats its call for, at least"""
    tf32: bool = False
    """allow TF32 matrix products on CUDA (off in the scripts: the flow's log-dets and inverses need fp32)"""


def offline_bc(script, policy: str, n: int, device, compile: bool):
    """nf_gcbc / nf_bc: (train step, batch-1 action, parameter count) on cube-single's shapes."""
    o, a = 28, 5
    args = script.Args(policy=policy)
    model = policy_net = script.POLICIES[policy](o, a, args).to(device)
    if compile:
        model = torch.compile(policy_net)
    graphed = compile and device.type == "cuda"  # as the script: the whole step captured as a CUDA graph
    lr = torch.tensor(args.learning_rate, device=device) if graphed else args.learning_rate
    trained = [p for p in policy_net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr, fused=True, capturable=graphed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if script is nf_bc:
        h, k = args.obs_horizon, args.action_horizon
        batch, observe = (torch.randn(n, h, o, device=device), torch.rand(n, k, a, device=device) * 2 - 1), (0,)
    else:
        batch = (
            torch.randn(n, o, device=device),
            torch.rand(n, a, device=device) * 2 - 1,
            torch.randn(n, o, device=device),
        )
        observe = (0, 2)
    generator = torch.Generator(device).manual_seed(0)
    randn = lambda *shape: torch.randn(1, *shape, generator=generator, device=device)  # noqa: E731
    acting = copy.deepcopy(policy_net).eval()  # as the evaluation acts: in eval mode (the flow caches its matrices)

    def act():
        with torch.no_grad():
            acting.act(*(batch[i][:1] for i in observe), randn)

    step = functools.partial(script.update, model, policy_net, optimizer)
    if graphed:
        step = script.cuda_graphed(step, batch, [policy_net], [optimizer])

    def train():
        step(batch)
        scheduler.step()

    return train, act, policy_net


def rlbc(policy: str, n: int, device, compile: bool):
    """nf_rlbc: the offline update (critics, actor, target critics) as benchmarks/rlbc_speed.py times it."""
    step, _, _, _ = step_function(nf_rlbc, policy, RlbcSizes(batch_size=n), device, compile=compile)
    actor = nf_rlbc.ACTORS[policy](28, 5, nf_rlbc.Args(policy=policy)).to(device).eval()
    generator, obs = torch.Generator(device).manual_seed(0), torch.randn(1, 28, device=device)

    def act():
        with torch.no_grad():
            actor.act(obs, lambda *shape: torch.randn(1, *shape, generator=generator, device=device))

    return step, act, actor


def goal_explore(density_kind: str, n: int, device, compile: bool):
    """nf_goal_explore: one density, actor and temperature update on the point maze's shapes."""
    o, a = 2, 2
    args = nf_goal_explore.Args(density=density_kind)
    actor = nf_goal_explore.Actor(o, a, args).to(device)
    density = (nf_goal_explore.FlowDensity if density_kind == "flow" else nf_goal_explore.GaussianDensity)(o, a, args)
    density = density.to(device)
    if compile:
        for module in (actor.net, density.encoder) + ((density.flow,) if density_kind == "flow" else ()):
            module.compile()
    graphed = compile and device.type == "cuda"  # as the script: the whole update captured as a CUDA graph
    log_temperature = torch.zeros((), device=device, requires_grad=True)
    adam = functools.partial(torch.optim.Adam, lr=args.actor_learning_rate, fused=True, capturable=graphed)
    optimizers = {"actor": adam(actor.parameters()), "temperature": adam([log_temperature])}
    optimizers["density"] = torch.optim.AdamW(
        density.parameters(), args.learning_rate, weight_decay=args.weight_decay, fused=True, capturable=graphed
    )
    batch = {k: torch.randn(n, d, device=device) for k, d in (("observations", o), ("actions", a), ("goals", 2))}
    settings = dict(log_temperature=log_temperature, condition_drop=args.condition_drop, goal_noise=args.goal_noise)
    update = functools.partial(
        nf_goal_explore.update, density=density, actor=actor, optimizers=optimizers, target_entropy=-1.0, **settings
    )
    if graphed:
        update = nf_goal_explore.cuda_graphed(update, batch, [density, actor, log_temperature], optimizers.values())

    def step():
        update(batch)

    acting = copy.deepcopy(actor).eval()

    def act():
        with torch.no_grad():
            acting.act(batch["observations"][:1], batch["goals"][:1])

    return step, act, density


def main(args: Args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    unknown = set(args.scripts) - set(SCRIPTS)
    if unknown:
        raise SystemExit(f"unknown --scripts {sorted(unknown)}; choose from {list(SCRIPTS)}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    device, n = torch.device(args.device), args.batch_size
    build = dict(
        nf_gcbc=lambda p, c: offline_bc(nf_gcbc, p, n, device, c),
        nf_bc=lambda p, c: offline_bc(nf_bc, p, n, device, c),
        nf_rlbc=lambda p, c: rlbc(p, n, device, c),
        nf_goal_explore=lambda p, c: goal_explore(p, n, device, c),
    )
    jobs, sizes = {}, {}
    for script in args.scripts:
        for policy in [p for p in SCRIPTS[script] if "all" in args.policies or p in args.policies]:
            for compiled in (False, True) if args.compile else (False,):
                torch.manual_seed(0)
                train, act, net = build[script](policy, compiled)
                jobs[(script, policy, "compiled" if compiled else "eager")] = train
                if not compiled:
                    jobs[(script, policy, "act")] = act
                    sizes[(script, policy)] = sum(p.numel() for p in net.parameters() if p.requires_grad)
    for key, fn in jobs.items():  # warm-up (and compilation)
        print(f"warming up {' '.join(key)} ...", file=sys.stderr, flush=True)
        for _ in range(3):
            fn()
    times = {key: [] for key in jobs}
    for _ in range(args.rounds):  # interleaved, so machine noise hits every variant alike
        for key, fn in jobs.items():
            times[key].append(timed(fn, device, args.min_time))
    med = {key: statistics.median(v) for key, v in times.items()}

    where = (
        f"CUDA ({torch.cuda.get_device_name()})" if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"training steps/s (batch {n}) and batch-1 action latency; torch {torch.__version__}, {where}; ", end="")
    print(f"the scripts' default sizes, TF32 {'on' if args.tf32 else 'off'}; medians of {args.rounds} rounds\n")
    print("| script | policy | parameters (actor / density) | steps/s eager | steps/s compiled | act b=1 (ms) |")
    print("|---|---|---|---|---|---|")
    for (script, policy), count in sizes.items():
        compiled = med.get((script, policy, "compiled"))
        compiled = f"{1 / compiled:.1f}" if compiled else "-"
        eager, act = 1 / med[(script, policy, "eager")], 1e3 * med[(script, policy, "act")]
        print(f"| {script} | {policy} | {count:,} | {eager:.1f} | {compiled} | {act:.3f} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
