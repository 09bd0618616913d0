"""NF-GCBC: goal-conditioned behavioural cloning with a normalizing-flow policy on OGBench.

"Normalizing Flows are Capable Models for RL" (Ghugare & Eysenbach, 2025): maximise log p(a | s, g) over
an offline dataset, with g a future observation of the same trajectory at a geometric offset, the flow
conditioned on an encoder of concat(s, g), actions noised during training and denoised when acting.
`--policy gaussian` swaps in OGBench's GCBC actor (MLP 3 x 512, state-independent std) on the same batches.

    python make_dataset.py pointmaze-medium-navigate-v0 --dataset-dir data
    python nf_gcbc.py --env-id pointmaze-medium-navigate-v0 --dataset-dir data

A run writes {output_dir}/{env_id}__{exp_name}__{seed}__{unixtime}/: args.json, TensorBoard events,
eval.csv (success per evaluation task and overall, validation NLL), checkpoints/ and videos/.
"""

import csv
import dataclasses
import datetime
import difflib
import glob
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, Literal, Optional

import gymnasium
import numpy as np
import ogbench
import torch
import tyro
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from flow import ConditionalFlow, denoise


@dataclass
class Args:
    # experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (part of the run directory)"""
    seed: int = 1
    """seed of the run (data order, initialisation, training noise)"""
    cuda: bool = True
    """use CUDA when it is available"""
    compile: bool = False
    """torch.compile the networks of the training step (the first steps are slow while it compiles)"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project_name: str = "nf-rl"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team)"""
    capture_video: bool = False
    """save a video of the first evaluation episode of each task"""
    output_dir: str = "runs"
    """where run directories are created"""
    resume: Optional[str] = None
    """run directory or checkpoint file to continue from (its saved arguments are used)"""

    # data
    env_id: str = "cube-single-play-v0"
    """OGBench goal-conditioned dataset name"""
    dataset_dir: str = "~/.ogbench/data"
    """directory with <env_id>.npz and <env_id>-val.npz (make them with make_dataset.py)"""
    gamma: float = 0.97
    """goals are the observation k ~ Geometric(1 - gamma) steps later in the same trajectory"""
    noise_std: float = 0.1
    """std of the Gaussian noise added to training actions (denoised at evaluation)"""

    # policy
    policy: Literal["flow", "gaussian"] = "flow"
    """the policy class: the paper's flow or OGBench's Gaussian GCBC actor"""
    num_blocks: int = 6
    """flow blocks"""
    hidden_dim: int = 256
    """width of the flow's coupling networks"""
    rep_dim: int = 64
    """size of the (state, goal) encoding that conditions the flow"""
    denoise: bool = True
    """flow: one Tweedie denoising step on sampled actions"""

    # optimisation
    total_steps: int = 1_000_000
    """gradient steps"""
    batch_size: int = 256
    """batch size"""
    learning_rate: float = 3e-4
    """peak learning rate (AdamW)"""
    weight_decay: float = 1e-6
    """AdamW weight decay"""
    warmup_steps: int = 1_000
    """linear learning-rate warm-up, then cosine decay to zero at total_steps"""

    # logging and evaluation
    log_interval: int = 1_000
    """steps between training logs (and validation NLL)"""
    eval_interval: int = 100_000
    """steps between evaluations (also at step 0 and at the end)"""
    eval_episodes: int = 50
    """evaluation episodes per task, run as one batch"""
    eval_max_steps: Optional[int] = None
    """cap on evaluation episode length (default: the environment's; lower only for quick checks)"""
    save_interval: int = 100_000
    """steps between checkpoints (also at the end)"""


# ------------------------------------------------------------------------------------------------ data


def load_ogbench(env_id: str, dataset_dir: str):
    """The evaluation env and the train/val datasets; a clear error when the name or files are wrong."""
    if "singletask" in env_id.split("-"):
        raise SystemExit(f"{env_id} is a singletask (reward) dataset; goal-conditioned BC needs the goal-conditioned "
                         f"name, e.g. {env_id.split('-singletask')[0]}-v0")  # fmt: skip
    parts = env_id.split("-")
    env_name = "-".join(parts[:-2] + parts[-1:])
    if len(parts) < 3 or env_name not in gymnasium.registry:
        known = [k for k in gymnasium.registry if any(w in k for w in ("maze", "cube", "scene", "puzzle", "soccer"))]
        names = [f"{k[:-3]}-{t}-v0" for k in known for t in ("navigate", "stitch", "explore", "play", "noisy")]
        close = difflib.get_close_matches(env_id, names, n=3, cutoff=0.6)
        raise SystemExit(f"unknown OGBench dataset {env_id!r}" + (f"; did you mean {' or '.join(close)}?" if close else ""))
    dataset_dir = os.path.expanduser(dataset_dir)
    path = os.path.join(dataset_dir, f"{env_id}.npz")
    if not os.path.exists(path):
        try:
            ogbench.download_datasets([env_id], dataset_dir)
        except Exception as err:  # no network, unknown file, ...
            raise SystemExit(
                f"{path} is missing and OGBench's download failed ({type(err).__name__}: {err}).\n"
                f"Make it locally with OGBench's own oracles:\n"
                f"  python make_dataset.py {env_id} --dataset-dir {dataset_dir}"
            )
    try:
        env, train, val = ogbench.make_env_and_datasets(env_id, dataset_dir=dataset_dir)
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"could not read {path} ({type(err).__name__}: {err}); remake it with\n"
                         f"  python make_dataset.py {env_id} --dataset-dir {dataset_dir} --overwrite")  # fmt: skip
    if not hasattr(env.unwrapped, "task_infos"):
        raise SystemExit(f"{env_id} has no goal-conditioned evaluation tasks")
    return env, train, val


class GoalDataset:
    """Transitions on `device`; samples (observation, action, goal) with geometric future goals."""

    def __init__(self, data: Dict[str, np.ndarray], device: torch.device):
        self.observations = torch.as_tensor(data["observations"], dtype=torch.float32, device=device)
        self.actions = torch.as_tensor(data["actions"], dtype=torch.float32, device=device)
        self.size = len(data["terminals"])
        ends = np.flatnonzero(data["terminals"])  # the last transition of each trajectory
        if len(ends) == 0 or ends[-1] != self.size - 1:
            raise SystemExit("dataset: the last transition is not marked terminal; the file is truncated or not OGBench's")
        self.final = ends[np.searchsorted(ends, np.arange(self.size))]  # the end of each transition's trajectory

    def sample_indices(self, batch_size: int, gamma: float, rng: np.random.Generator):
        """Transition indices and their goals' indices: k ~ Geometric(1 - gamma) steps on, within the trajectory."""
        idx = rng.integers(self.size, size=batch_size)
        return idx, np.minimum(idx + rng.geometric(1 - gamma, size=batch_size), self.final[idx])

    def sample(self, batch_size: int, gamma: float, rng: np.random.Generator):
        idx, goal_idx = self.sample_indices(batch_size, gamma, rng)
        return self.observations[idx], self.actions[idx], self.observations[goal_idx]


# ---------------------------------------------------------------------------------------------- policies


def mlp(sizes, activation, layer_norm: bool) -> nn.Sequential:
    layers = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), activation()] + ([nn.LayerNorm(sizes[i + 1])] if layer_norm else [])
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


class FlowPolicy(nn.Module):
    """p(a | s, g): an encoder of concat(s, g) (4 x 512, SiLU, LayerNorm) conditions the flow."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.encoder = mlp([2 * obs_dim] + [512] * 4 + [args.rep_dim], nn.SiLU, layer_norm=True)
        self.flow = ConditionalFlow(action_dim, args.rep_dim, args.num_blocks, args.hidden_dim)

    def log_prob(self, obs, goals, actions):
        return self.flow.log_prob(actions, self.encoder(torch.cat([obs, goals], -1)))

    def forward(self, obs, goals, actions):  # what a DistributedDataParallel wrapper calls
        return self.log_prob(obs, goals, actions)

    def act(self, obs, goals, generator: torch.Generator, noise_std: float, use_denoise: bool):
        cond = self.encoder(torch.cat([obs, goals], -1))
        z = torch.randn(len(obs), self.flow.dim, generator=generator, device=obs.device)
        actions = self.flow.sample(cond, z)
        if use_denoise:
            actions = denoise(self.flow, actions, cond, noise_std)
        return actions.clamp(-1, 1)


class GaussianPolicy(nn.Module):
    """OGBench's GCBC actor: MLP 3 x 512 (GELU) on concat(s, g) -> mean, a learned state-independent std."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.net = mlp([2 * obs_dim, 512, 512, 512, action_dim], nn.GELU, layer_norm=False)
        self.log_std = nn.Parameter(torch.zeros(action_dim))

    def log_prob(self, obs, goals, actions):
        mean = self.net(torch.cat([obs, goals], -1))
        return (-0.5 * ((actions - mean) / self.log_std.exp()).square() - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def forward(self, obs, goals, actions):  # what a DistributedDataParallel wrapper calls
        return self.log_prob(obs, goals, actions)

    def act(self, obs, goals, generator: torch.Generator, noise_std: float, use_denoise: bool):
        return self.net(torch.cat([obs, goals], -1)).clamp(-1, 1)  # the mean, as OGBench evaluates


# ------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(policy, envs, num_tasks: int, args: Args, device, step: int, video_dir: Optional[str]) -> Dict[str, float]:
    """Success rate per task: all `envs` (one per episode) run task k in lockstep, the policy batched."""
    policy.eval()
    generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)  # not the training RNG
    results = {}
    for task in range(1, num_tasks + 1):
        obs, goals, frames = [], [], []
        for i, env in enumerate(envs):  # fixed evaluation seeds, the same for every run and step
            np.random.seed(100_000 * task + i)  # OGBench draws start and goal noise from NumPy's global generator
            ob, info = env.reset(seed=100_000 * task + i, options=dict(task_id=task, render_goal=False))
            obs.append(ob)
            goals.append(info["goal"])
        obs, goals = np.array(obs), np.array(goals)
        active = np.ones(len(envs), bool)
        success = np.zeros(len(envs))
        for _ in range(args.eval_max_steps or 10**9):
            if not active.any():
                break
            o = torch.as_tensor(obs[active], dtype=torch.float32, device=device)
            g = torch.as_tensor(goals[active], dtype=torch.float32, device=device)
            actions = policy.act(o, g, generator, args.noise_std, args.denoise).cpu().numpy()
            if video_dir is not None and active[0]:
                frames.append(envs[0].render())
            for a, i in zip(actions, np.flatnonzero(active)):
                obs[i], _, terminated, truncated, info = envs[i].step(a)
                if terminated or truncated:
                    active[i] = False
                    success[i] = info["success"]
        results[f"task{task}_success"] = float(success.mean())
        if video_dir is not None:
            save_video(frames, os.path.join(video_dir, f"step{step}_task{task}.mp4"))
    results["success"] = float(np.mean([results[f"task{t}_success"] for t in range(1, num_tasks + 1)]))
    policy.train()
    return results


def save_video(frames, path: str):
    import imageio.v2 as imageio

    try:
        imageio.mimsave(path, frames, fps=30)
    except Exception:  # no ffmpeg backend: fall back to a GIF
        imageio.mimsave(path[:-4] + ".gif", frames, duration=1 / 30)


# ---------------------------------------------------------------------------------------------- training


def lr_factor(step: int, args: Args) -> float:
    """Linear warm-up, then cosine decay to zero at total_steps."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.total_steps - args.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def find_checkpoint(path: str, flag: str = "--resume") -> str:
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "checkpoints", "step_*.pt")), key=lambda p: int(p.rsplit("_", 1)[1][:-3]))
        if not found:
            raise SystemExit(f"{flag} {path}: no checkpoints/step_*.pt in that run directory")
        return found[-1]
    if not os.path.isfile(path):
        raise SystemExit(f"{flag} {path}: no such run directory or checkpoint file")
    return path


def claim_run_dir(path: str) -> str:
    """Create a new run directory; runs started in the same second with the same name get _2, _3, ..."""
    for i in range(1, 10_000):
        candidate = path if i == 1 else f"{path}_{i}"
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            continue
    raise SystemExit(f"{path}: could not create a new run directory")


def init_distributed(args: Args):
    """(rank, world size, device). Under torchrun (which sets WORLD_SIZE, RANK, LOCAL_RANK) this joins the
    process group: NCCL with one GPU per process, gloo on CPU. A plain run is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = args.cuda and torch.cuda.is_available()
    if world == 1:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if args.batch_size % world:  # said once, by rank 0; every process stops
        raise SystemExit(1 if rank else f"--batch-size {args.batch_size} is the global batch and must divide evenly among the "
                         f"{world} processes; use a multiple of {world}, e.g. --batch-size {max(world, args.batch_size // world * world)}")  # fmt: skip
    if use_cuda and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
        raise SystemExit(1 if rank else f"{os.environ.get('LOCAL_WORLD_SIZE')} processes per node but {torch.cuda.device_count()} "
                         f"GPU(s): start at most one per GPU (torchrun --nproc-per-node), or add --no-cuda to train on CPU with gloo")  # fmt: skip
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=2))  # rank 0 evaluates meanwhile
    return rank, world, device


def check_args(args: Args):
    problems = [f"--{name.replace('_', '-')} must be positive" for name in
                ("total_steps", "batch_size", "log_interval", "eval_interval", "eval_episodes", "save_interval")
                if getattr(args, name) <= 0]  # fmt: skip
    if args.capture_video and not os.environ.get("DISPLAY") and os.environ.get("MUJOCO_GL") not in ("egl", "osmesa"):
        problems.append("--capture-video without a display needs headless MuJoCo rendering chosen before Python "
                        "starts: MUJOCO_GL=egl python nf_gcbc.py ... (or MUJOCO_GL=osmesa)")  # fmt: skip
    if not 0 < args.gamma < 1:
        problems.append("--gamma must lie in (0, 1)")
    if args.noise_std < 0:
        problems.append("--noise-std must be >= 0")
    if problems:
        raise SystemExit("; ".join(problems))


def train_step(model, optimizer, scheduler, train, args: Args, rank: int, world: int, rng) -> torch.Tensor:
    """One AdamW step on -log p(a + noise | s, g). Every process draws the same global batch and noise from the
    run's seed and trains on its own share; DDP averages the gradients, so N processes take the same steps as
    one process with the whole batch. Returns this process's loss."""
    obs, actions, goals = train.sample(args.batch_size, args.gamma, rng)
    actions = actions + args.noise_std * torch.randn_like(actions)
    share = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)
    loss = -model(obs[share], goals[share], actions[share]).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss


def agree(first_bad_step: torch.Tensor, loss: torch.Tensor, world: int):
    """At a log/eval/save step every process learns the earliest non-finite step of any process and the mean loss."""
    if world > 1:
        first_bad_step = first_bad_step.clone()
        dist.all_reduce(first_bad_step, op=dist.ReduceOp.MAX)  # -1 where none was bad
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss = loss / world
    return first_bad_step, loss


def main(args: Args):
    checkpoint = None
    if args.resume is not None:
        path = find_checkpoint(args.resume)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise SystemExit(f"--resume {path}: not a readable checkpoint ({type(err).__name__}: {err})")
        args = dataclasses.replace(Args(**checkpoint["args"]), resume=args.resume)
        run_dir = os.path.dirname(os.path.dirname(path))
    else:
        run_dir = os.path.join(args.output_dir, f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")
    check_args(args)
    rank, world, device = init_distributed(args)
    is_main = rank == 0  # the only process that evaluates, logs and saves
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    env, train_data, val_data = load_ogbench(args.env_id, args.dataset_dir)
    train, val = GoalDataset(train_data, device), GoalDataset(val_data, device)
    obs_dim, action_dim = train.observations.shape[1], train.actions.shape[1]
    num_tasks = len(env.unwrapped.task_infos)
    render = dict(render_mode="rgb_array", width=200, height=200) if args.capture_video else {}
    envs = [ogbench.make_env_and_datasets(args.env_id, env_only=True, **render) for _ in range(args.eval_episodes if is_main else 0)]

    policy = (FlowPolicy if args.policy == "flow" else GaussianPolicy)(obs_dim, action_dim, args).to(device)
    # fused: one kernel for all parameter tensors (on CPU ~5x faster than the default per-tensor loop)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args))
    start_step = 0
    if checkpoint is not None:
        policy.load_state_dict(checkpoint["policy"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        rng.bit_generator.state = json.loads(checkpoint["numpy_rng"])
        start_step = checkpoint["step"]
        if is_main:
            print(f"resumed {run_dir} at step {start_step}")

    model = policy  # what the training step calls: the policy, or its DDP wrapper that averages gradients
    if world > 1:
        model = DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)  # the buffers are constants
    if args.compile:  # the training step's model as one graph; evaluation stays eager
        model = torch.compile(model)
    if checkpoint is None:
        shared = [claim_run_dir(run_dir) if is_main else None]
        if world > 1:
            dist.broadcast_object_list(shared)
        run_dir = shared[0]
    if is_main:  # the only process that writes: run directory, logs, evaluations and checkpoints
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        video_dir = os.path.join(run_dir, "videos") if args.capture_video else None
        if video_dir:
            os.makedirs(video_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)
        writer = SummaryWriter(run_dir, purge_step=start_step or None)
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=dataclasses.asdict(args),
                       name=os.path.basename(run_dir), dir=run_dir, sync_tensorboard=True)  # fmt: skip
        csv_path = os.path.join(run_dir, "eval.csv")
        fields = ["step", "wall_time", "val_nll"] + [f"task{t}_success" for t in range(1, num_tasks + 1)] + ["success"]
        kept = []  # on resume, the evaluations up to the checkpoint (later ones are redone, as purge_step does)
        if start_step and os.path.exists(csv_path):
            with open(csv_path, newline="") as f:
                kept = [row for row in csv.reader(f)][1:]
            kept = [row for row in kept if int(row[0]) <= start_step]
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerows([fields] + kept)
        print(f"{args.policy} policy, {sum(p.numel() for p in policy.parameters()):,} parameters, {len(train_data['actions']):,} "
              f"transitions, device {device}" + (f" x {world} processes" if world > 1 else "") + f"; writing to {run_dir}")  # fmt: skip

    val_obs, val_actions, val_goals = val.sample(1_024, args.gamma, np.random.default_rng(0))  # one fixed batch
    val_noise = torch.randn(val_actions.shape, generator=torch.Generator(device).manual_seed(0), device=device)
    val_actions = val_actions + args.noise_std * val_noise

    def validation_nll():
        with torch.no_grad():
            return -policy.log_prob(val_obs, val_goals, val_actions).mean().item()

    def run_evaluation(step):
        stats = evaluate(policy, envs, num_tasks, args, device, step, video_dir)
        stats["val_nll"] = validation_nll()
        with open(csv_path, "a", newline="") as f:
            csv.writer(f).writerow([step, round(time.time() - start_time, 1)] + [stats[k] for k in fields[2:]])
        for k, v in stats.items():
            writer.add_scalar(f"eval/{k}", v, step)
        per_task = ", ".join(f"{stats[f'task{t}_success']:.2f}" for t in range(1, num_tasks + 1))
        print(f"step {step}: success {stats['success']:.3f} ({per_task}), val NLL {stats['val_nll']:.3f}")

    def save(step):
        torch.save({"policy": policy.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "step": step, "args": dataclasses.asdict(args), "torch_rng": torch.get_rng_state(),
                    "numpy_rng": json.dumps(rng.bit_generator.state)},
                   os.path.join(run_dir, "checkpoints", f"step_{step}.pt"))  # fmt: skip

    start_time = time.time()
    if start_step == 0 and is_main:
        run_evaluation(0)
    first_bad_step = torch.tensor(-1, device=device)  # first non-finite loss, tracked without a host sync
    last_log_time, last_log_step = time.time(), start_step
    for step in tqdm(range(start_step + 1, args.total_steps + 1), initial=start_step, total=args.total_steps, smoothing=0.05,
                     disable=not is_main):
        loss = train_step(model, optimizer, scheduler, train, args, rank, world, rng)
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step, first_bad_step)

        last = step == args.total_steps
        if any(step % n == 0 for n in (args.log_interval, args.eval_interval, args.save_interval)) or last:
            first_bad_step, loss = agree(first_bad_step, loss, world)
            if first_bad_step.item() >= 0:  # before anything logs, evaluates or saves a broken policy; said by rank 0
                raise SystemExit(1 if rank else f"non-finite training loss at step {first_bad_step.item()}; stopping "
                                 f"(try a lower --learning-rate or a larger --noise-std)")  # fmt: skip
        if not is_main:
            continue  # the other processes only train (their share of each batch)
        if step % args.log_interval == 0 or last:
            speed = (step - last_log_step) / (time.time() - last_log_time)
            last_log_time, last_log_step = time.time(), step
            writer.add_scalar("train/nll", loss.item(), step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            writer.add_scalar("perf/steps_per_second", speed, step)
        if step % args.eval_interval == 0 or last:
            run_evaluation(step)
        if step % args.save_interval == 0 or last:
            save(step)
    if is_main:
        writer.close()
        if args.track:
            wandb.finish()
    if world > 1:
        dist.destroy_process_group()
    return run_dir, policy


if __name__ == "__main__":
    main(tyro.cli(Args))
