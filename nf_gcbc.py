"""NF-GCBC: goal-conditioned behavioural cloning with a normalizing-flow policy on OGBench.

"Normalizing Flows are Capable Models for RL" (Ghugare & Eysenbach, 2025): maximise log p(a | s, g) over
an offline dataset, with g a future observation of the same trajectory at a geometric offset, the flow
conditioned on an encoder of concat(s, g), actions noised during training and denoised when acting.
`--policy gaussian` swaps in OGBench's GCBC actor (MLP 3 x 512, state-independent std) and `--policy flow-matching`
a flow-matching GCBC (FM-GCBC: a velocity field sampled with Euler steps), both trained on the same batches.

    python make_dataset.py pointmaze-medium-navigate-v0 --dataset-dir data
    python nf_gcbc.py --env-id pointmaze-medium-navigate-v0 --dataset-dir data
    torchrun --standalone --nproc-per-node 4 nf_gcbc.py ...   # data parallel: 4 processes step as one

A run writes {output_dir}/{env_id}__{exp_name}__{seed}__{unixtime}/: args.json, TensorBoard events,
eval.csv (success per evaluation task and overall, validation NLL), checkpoints/ and videos/.
"""

import csv
import dataclasses
import datetime
import difflib
import functools
import glob
import io
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional

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
    """torch.compile the training step's networks; on one GPU also capture the whole step as a CUDA graph"""
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
    eval_only: bool = False
    """with --resume: evaluate that checkpoint (--eval-episodes, --capture-video) without training"""

    # data
    env_id: str = "cube-single-play-v0"
    """OGBench goal-conditioned dataset name"""
    dataset_dir: str = "~/.ogbench/data"
    """directory with <env_id>.npz and <env_id>-val.npz (make them with make_dataset.py)"""
    make_dataset: bool = False
    """OGBench data missing and not downloadable: make it with the make_dataset.py beside this script (minutes)"""
    gamma: float = 0.97
    """goals are the observation k ~ Geometric(1 - gamma) steps later in the same trajectory"""
    noise_std: float = 0.1
    """flow and Gaussian: std of the Gaussian noise added to training actions (denoised at evaluation)"""

    # policy
    policy: Literal["flow", "gaussian", "flow-matching"] = "flow"
    """the policy class: the paper's flow, OGBench's Gaussian GCBC actor or flow matching (FM-GCBC)"""
    num_blocks: int = 6
    """flow blocks"""
    hidden_dim: int = 256
    """width of the flow's coupling networks"""
    rep_dim: int = 64
    """size of the (state, goal) encoding that conditions the flow"""
    denoise: bool = True
    """flow: one Tweedie denoising step on sampled actions"""
    flow_steps: int = 10
    """flow matching: Euler steps per sampled action"""

    # optimisation
    total_steps: int = 1_000_000
    """gradient steps"""
    batch_size: int = 256
    """batch size (under torchrun: the global batch, shared among the processes)"""
    learning_rate: float = 3e-4
    """peak learning rate (AdamW)"""
    weight_decay: float = 1e-6
    """AdamW weight decay"""
    warmup_steps: int = 1_000
    """linear learning-rate warm-up, then cosine decay to zero at total_steps"""

    # logging and evaluation
    log_interval: int = 1_000
    """steps between training logs"""
    eval_interval: int = 100_000
    """steps between evaluations and validation NLL (also at step 0 and at the end)"""
    eval_episodes: int = 50
    """evaluation episodes per task"""
    eval_envs: int = 5
    """environments the evaluation episodes take turns on, the policy batched over them (each holds ~150 MB on cube)"""
    eval_workers: int = 0
    """processes that step the evaluation envs in parallel (0: this process steps them)"""
    eval_max_steps: Optional[int] = None
    """cap on evaluation episode length (default: the environment's; lower only for quick checks)"""
    save_interval: int = 100_000
    """steps between checkpoints (also at the end)"""


# ---------------------------------------------------------------------------------------------- networks


def mlp(sizes, activation, layer_norm: bool) -> nn.Sequential:
    """Linear layers of the given sizes with the activation (then LayerNorm, if asked) between them."""
    layers = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), activation()]
        layers += [nn.LayerNorm(sizes[i + 1])] if layer_norm else []
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


def time_embedding(t: torch.Tensor, dim: int = 32) -> torch.Tensor:
    """Sinusoidal embedding of times t in [0, 1] (100 t: the diffusion timestep): [B, 1] -> [B, dim]."""
    freqs = torch.exp(torch.arange(dim // 2, device=t.device) * (-math.log(1000.0) / (dim // 2 - 1)))
    return torch.cat([(100.0 * t * freqs).sin(), (100.0 * t * freqs).cos()], -1)


def matching_width(target: int, in_dim: int, out_dim: int) -> int:
    """The width w of an MLP in_dim -> w -> w -> w -> w -> out_dim with about `target` parameters."""
    b = in_dim + 4 + out_dim  # the parameters are 3 w^2 + b w + out_dim
    return max(1, round((-b + math.sqrt(b * b + 12 * max(0, target - out_dim))) / 6))


class NoisedLikelihood(nn.Module):
    """What the flow and the Gaussian policies share: the loss -log p(a + noise | s, g)."""

    def draw(self, actions, generator=None):
        """The randomness of a training loss, for a whole batch: the action noise."""
        return (torch.randn(actions.shape, generator=generator, device=actions.device),)

    def loss(self, obs, goals, actions, noise):
        return -self.log_prob(obs, goals, actions + self.noise_std * noise)

    def forward(self, *batch):  # what a DistributedDataParallel wrapper calls
        return self.loss(*batch)


class FlowPolicy(NoisedLikelihood):
    """p(a | s, g): an encoder of concat(s, g) (4 x 512, SiLU, LayerNorm) conditions the flow. Acts with a sample,
    one Tweedie denoising step and clipping to the box."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.encoder = mlp([2 * obs_dim] + [512] * 4 + [args.rep_dim], nn.SiLU, layer_norm=True)
        self.flow = ConditionalFlow(action_dim, args.rep_dim, args.num_blocks, args.hidden_dim)
        self.noise_std, self.use_denoise = args.noise_std, args.denoise
        self.sampling = "one flow pass" + (" and a denoising step" if args.denoise else "")

    def log_prob(self, obs, goals, actions):
        return self.flow.log_prob(actions, self.encoder(torch.cat([obs, goals], -1)))

    def act(self, obs, goals, randn):
        """Actions [B, a] for obs, goals [B, o]; randn(*shape) draws standard normals [B, *shape] (in evaluation one
        stream per episode, see episode_noise)."""
        cond = self.encoder(torch.cat([obs, goals], -1))
        z = randn(self.flow.dim)
        actions = self.flow.sample(cond, z)
        if self.use_denoise:
            actions = denoise(self.flow, actions, cond, self.noise_std)
        return actions.clamp(-1, 1)


class GaussianPolicy(NoisedLikelihood):
    """OGBench's GCBC actor: MLP 3 x 512 (GELU) on concat(s, g) -> mean, a learned state-independent std;
    acts with its mean."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.net = mlp([2 * obs_dim, 512, 512, 512, action_dim], nn.GELU, layer_norm=False)
        self.log_std = nn.Parameter(torch.zeros(action_dim))
        self.noise_std, self.sampling = args.noise_std, "its mean (one pass)"

    def log_prob(self, obs, goals, actions):
        mean = self.net(torch.cat([obs, goals], -1))
        z = (actions - mean) / self.log_std.exp()
        return (-0.5 * z.square() - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def act(self, obs, goals, randn):
        return self.net(torch.cat([obs, goals], -1)).clamp(-1, 1)  # the mean, as OGBench evaluates


class FlowMatchingPolicy(nn.Module):
    """FM-GCBC, as FQL's BC flow: a velocity field v(a_t, t | s, g), an MLP 4 x w (GELU) on concat(a_t, embed(t),
    encoder(s, g)) with the flow's encoder and w set so that the policy has the flow's parameter count. Trained
    on the linear path a_t = (1 - t) z + t a, z ~ N(0, I), t ~ U(0, 1), to predict a - z (no action noise);
    acts with --flow-steps Euler steps from z, clipped to the box."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.encoder = mlp([2 * obs_dim] + [512] * 4 + [args.rep_dim], nn.SiLU, layer_norm=True)
        with torch.random.fork_rng(devices=[]):  # a flow policy of these sizes built aside, for its parameter count
            target = sum(p.numel() for p in FlowPolicy(obs_dim, action_dim, args).parameters())
        target, in_dim = target - sum(p.numel() for p in self.encoder.parameters()), action_dim + 32 + args.rep_dim
        self.velocity = mlp([in_dim] + [matching_width(target, in_dim, action_dim)] * 4 + [action_dim], nn.GELU, False)
        self.action_dim, self.steps = action_dim, args.flow_steps
        self.sampling = f"{args.flow_steps} Euler steps"

    def draw(self, actions, generator=None):
        """The randomness of a training loss, for a whole batch: the path's start z and time t."""
        z = torch.randn(actions.shape, generator=generator, device=actions.device)
        return z, torch.rand(len(actions), 1, generator=generator, device=actions.device)

    def loss(self, obs, goals, actions, z, t):
        cond = self.encoder(torch.cat([obs, goals], -1))
        velocity = self.velocity(torch.cat([(1 - t) * z + t * actions, time_embedding(t), cond], -1))
        return (velocity - (actions - z)).square().mean(-1)

    forward = loss  # what a DistributedDataParallel wrapper calls

    def act(self, obs, goals, randn):
        cond = self.encoder(torch.cat([obs, goals], -1))
        x = randn(self.action_dim)
        for i in range(self.steps):
            t = torch.full((len(obs), 1), i / self.steps, device=obs.device)
            x = x + self.velocity(torch.cat([x, time_embedding(t), cond], -1)) / self.steps
        return x.clamp(-1, 1)


POLICIES = {"flow": FlowPolicy, "gaussian": GaussianPolicy, "flow-matching": FlowMatchingPolicy}


# --------------------------------------------------------------------------------------------- algorithm


def gcbc_loss(model, policy, obs, actions, goals, *, share: slice = slice(None)) -> torch.Tensor:
    """The policy's loss (flow, Gaussian: -log p(a + noise | s, g); flow matching: the velocity error) over this
    process's share of the batch. Its randomness is drawn for the whole batch, so the processes of a data-parallel
    run together see what a single process sees."""
    draws = policy.draw(actions)
    return model(obs[share], goals[share], actions[share], *(d[share] for d in draws)).mean()


def update(model, policy, optimizer, batch, *, share: slice = slice(None)):
    """One AdamW step on a batch (obs, actions, goals); returns the loss for logging (not read here)."""
    loss = gcbc_loss(model, policy, *batch, share=share)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under DDP this also averages the gradients of all processes
    optimizer.step()
    return {"loss": loss.detach()}


def cuda_graphed(step, batch, modules, optimizers):
    """step(batch) -> logs, captured once as a CUDA graph and then replayed: one launch per training step instead of
    hundreds (at these sizes a step is bound by kernel launches, not arithmetic). The batch (a sequence or a dict of
    tensors) is copied into the graph's own tensors. The optimisers must be capturable, and a learning rate that a
    schedule changes must be a device tensor. Warm-up steps run first on a side stream, as CUDA graphs need; then the
    modules' weights and buffers (or bare tensors given in `modules`), the optimisers' state and the CUDA RNG are
    put back, so training starts where it was."""
    state = lambda m: m.state_dict(keep_vars=True).values() if isinstance(m, nn.Module) else [m]  # noqa: E731
    tensors = [t for m in modules for t in state(m)]
    saved, rng = [t.detach().clone() for t in tensors], torch.cuda.get_rng_state()

    def optimizer_state():
        return [t for o in optimizers for s in o.state.values() for t in s.values() if torch.is_tensor(t)]

    before = {id(t): t.clone() for t in optimizer_state()}
    items = lambda b: b.items() if isinstance(b, dict) else enumerate(b)  # noqa: E731
    static = {k: v.clone() for k, v in items(batch)}
    graph_batch = static if isinstance(batch, dict) else list(static.values())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step(graph_batch)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.no_grad():
        for t, value in zip(tensors, saved):
            t.copy_(value)
        for t in optimizer_state():
            t.copy_(before[id(t)]) if id(t) in before else t.zero_()  # state the warm-up created starts at zero
    torch.cuda.set_rng_state(rng)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)  # the gradients are allocated inside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logs = step(graph_batch)

    def replay(batch):
        for k, v in items(batch):
            static[k].copy_(v)
        graph.replay()
        return logs  # the graph's tensors: read them before the next replay

    return replay


def lr_factor(step: int, args: Args) -> float:
    """Linear warm-up, then cosine decay to zero at total_steps."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.total_steps - args.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -------------------------------------------------------------------------------------------------- data


def load_ogbench(env_id: str, dataset_dir: str, singletask: bool, make_missing: bool = False):
    """The evaluation env and the train/val data of an OGBench dataset (a singletask name reads its dataset's
    file with that task's rewards), checked; a clear error when the name or the files are wrong. A missing file
    is downloaded, or with `make_missing` made by the make_dataset.py beside this script."""
    parts = env_id.split("-")
    if ("singletask" in parts) != singletask:
        fix = f"{env_id[:-3]}-singletask-task1-v0" if singletask else env_id.split("-singletask")[0] + "-v0"
        kind = "a singletask" if singletask else "a goal-conditioned"
        raise SystemExit(f"{env_id}: {os.path.basename(__file__)} needs {kind} dataset name, e.g. {fix}")
    dataset = "-".join(parts[: parts.index("singletask")] + parts[-1:]) if singletask else env_id
    env_name = "-".join(dataset.split("-")[:-2] + (parts[parts.index("singletask") :] if singletask else ["v0"]))
    if len(parts) < 3 or env_name not in gymnasium.registry:
        kinds = ("navigate", "stitch", "explore", "play", "noisy")
        names = [
            k.replace("-singletask", f"-{kind}-singletask") if singletask else f"{k[:-3]}-{kind}-v0"
            for k in gymnasium.registry
            for kind in kinds
            if ("singletask" in k) == singletask
        ]
        raise SystemExit(f"unknown OGBench dataset {env_id!r}" + did_you_mean(env_id, names))
    dataset_dir = os.path.expanduser(dataset_dir)
    path = os.path.join(dataset_dir, f"{dataset}.npz")
    make = f"python make_dataset.py {dataset} --dataset-dir {dataset_dir}"
    if not os.path.exists(path):
        try:
            ogbench.download_datasets([dataset], dataset_dir)
        except Exception as err:  # no network, unknown file, ...
            tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_dataset.py")
            if not (make_missing and os.path.exists(tool)):
                why = f"{path} is missing and OGBench's download failed ({type(err).__name__}: {err})"
                hint = "\n(or add --make-dataset to make it now)" if os.path.exists(tool) else ""
                raise SystemExit(f"{why}. Make it locally with\n  {make}{hint}")
            print(f"{path} is missing and OGBench's download failed: making it with {tool} (OGBench's size)")
            if subprocess.run([sys.executable, tool, dataset, "--dataset-dir", dataset_dir]).returncode != 0:
                raise SystemExit(f"{tool} could not make {dataset} (its message is above)")
    try:
        env, train, val = ogbench.make_env_and_datasets(env_id, dataset_dir=dataset_dir)
    except Exception as err:  # truncated, empty or foreign files fail deep inside ogbench
        raise SystemExit(f"could not read {path} ({type(err).__name__}: {err}); remake it with\n  {make} --overwrite")
    box, obs_dim = (env.action_space.low, env.action_space.high), gymnasium.spaces.flatdim(env.observation_space)
    for data, file in ((train, path), (val, path[:-4] + "-val.npz")):
        check_data(data, file, f"remake it with\n  {make} --overwrite", box, obs_dim)
    return env, train, val


def check_data(data: Dict[str, np.ndarray], name: str, fix: str, box=None, obs_dim: Optional[int] = None):
    """Refuse data that would train on garbage or report a wrong number: no rows, arrays of different lengths,
    non-numeric values or integer actions, non-finite values, observations of another size than the
    environment's (`obs_dim`), actions outside the action box (`box` = (low, high), with a tolerance of 0.1% of
    its width). The message names the data, the key, the first bad row and `fix`."""
    n = len(data["actions"])
    if n == 0:
        raise SystemExit(f"{name}: no transitions; {fix}")
    for key in ("observations", "actions", "next_observations", "rewards", "masks", "terminals"):
        values = np.asarray(data[key]) if key in data else np.zeros(n)
        where = f"{name}: {key} ({values.dtype}, {list(values.shape)})"
        if len(values) != n:
            raise SystemExit(f"{where} has {len(values)} rows where actions have {n}; {fix}")
        if values.dtype.kind not in ("f" if key == "actions" else "fiub"):
            raise SystemExit(f"{where}: expected {'floating-point' if key == 'actions' else 'numeric'} values; {fix}")
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            row = np.flatnonzero(~np.isfinite(values.reshape(n, -1)).all(1))[0]
            raise SystemExit(f"{where}: a non-finite value in row {row}; {fix}")
    if obs_dim is not None and np.asarray(data["observations"]).reshape(n, -1).shape[1] != obs_dim:
        raise SystemExit(
            f"{name}: observations of size {data['observations'].shape[1:]}, the environment's {obs_dim}; {fix}"
        )
    if box is not None:
        low, high = box
        actions = np.asarray(data["actions"]).reshape(n, -1)
        if actions.shape[1] != np.size(low):
            raise SystemExit(f"{name}: actions of size {actions.shape[1]}, the environment's {np.size(low)}; {fix}")
        outside = ((actions < low - 1e-3 * (high - low)) | (actions > high + 1e-3 * (high - low))).any(1)
        if outside.any():
            row = np.flatnonzero(outside)[0]
            raise SystemExit(
                f"{name}: actions row {row} is {actions[row]}, outside the action box [{low}, {high}]; {fix}"
            )


def did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


class GoalDataset:
    """Transitions on `device`; samples (observation, action, goal) with geometric future goals."""

    def __init__(self, data: Dict[str, np.ndarray], device: torch.device):
        self.observations = torch.as_tensor(data["observations"], dtype=torch.float32, device=device)
        self.actions = torch.as_tensor(data["actions"], dtype=torch.float32, device=device)
        self.size = len(data["terminals"])
        ends = np.flatnonzero(data["terminals"])  # the last transition of each trajectory
        if len(ends) == 0 or ends[-1] != self.size - 1:
            raise SystemExit("dataset: the last transition is not marked terminal (a truncated file, or not OGBench's)")
        final = ends[np.searchsorted(ends, np.arange(self.size))]  # the end of each transition's trajectory
        self.final = torch.as_tensor(final, device=device)

    def sample_indices(self, batch_size: int, gamma: float, generator: torch.Generator):
        """Transition indices and their goals' indices: k ~ Geometric(1 - gamma) steps on, within the trajectory;
        drawn on the data's device by `generator` (no copy from the host per batch)."""
        idx = torch.randint(self.size, (batch_size,), generator=generator, device=self.final.device)
        k = torch.empty(batch_size, device=idx.device).geometric_(1 - gamma, generator=generator).long()
        return idx, torch.minimum(idx + k, self.final[idx])

    def sample(self, batch_size: int, gamma: float, generator: torch.Generator):
        idx, goal_idx = self.sample_indices(batch_size, gamma, generator)
        return self.observations[idx], self.actions[idx], self.observations[goal_idx]


# -------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    policy, envs, num_tasks: int, val_batch, args: Args, device, step: int, video_dir: Optional[str]
) -> Dict[str, float]:
    """Success rate per task: --eval-episodes episodes of task k on the EnvPool `envs`, the policy batched over the
    running ones; and the validation loss of one fixed batch (the NLL for the flow and the Gaussian)."""
    policy.eval()
    obs, actions, goals, draws = val_batch
    results = {"val_loss": policy.loss(obs, goals, actions, *draws).mean().item()}
    results["val_nll"] = results["val_loss"] if hasattr(policy, "log_prob") else math.nan
    tqdm.write(f"evaluating at step {step}: {num_tasks} tasks x {args.eval_episodes} episodes ...")
    for task in range(1, num_tasks + 1):
        seeds = [100_000 * task + i for i in range(args.eval_episodes)]  # the same for every run and step
        noise = [torch.Generator().manual_seed(args.seed * 1_000_003 + step + 7_919 * s) for s in seeds]
        goals, frames = {}, [] if video_dir is not None else None

        def start(reset, episode):
            ob, info = reset(seeds[episode], task_id=task, render_goal=False)
            goals[episode] = info["goal"]
            return ob

        def act(episodes, obs):
            o = torch.as_tensor(np.array(obs), dtype=torch.float32, device=device)
            g = torch.as_tensor(np.array([goals[e] for e in episodes]), dtype=torch.float32, device=device)
            return policy.act(o, g, episode_noise([noise[e] for e in episodes], device)).cpu().numpy()

        _, _, last = run_episodes(envs, args.eval_episodes, start, act, args.eval_max_steps, frames)
        results[f"task{task}_success"] = float(np.mean([info["success"] if info else 0.0 for info in last]))
        if video_dir is not None:
            save_video(frames, os.path.join(video_dir, f"step{step}_task{task}.mp4"))
    results["success"] = float(np.mean([results[f"task{t}_success"] for t in range(1, num_tasks + 1)]))
    policy.train()
    return results


def episode_noise(generators, device):
    """randn(*shape) -> [len(generators), *shape], row i from generators[i] (on the CPU): the noise of a batch of
    evaluation episodes, each with its own stream, so that what an episode draws does not depend on the others."""
    return lambda *shape: torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def run_episodes(envs, num_episodes: int, start, act, max_steps: Optional[int], frames: Optional[list] = None):
    """Episodes 0..num_episodes-1 on an EnvPool (memory does not grow with the episode count): an env that finishes
    takes the next waiting episode, `start(reset, episode)` resets it (reset(seed, **options) -> (obs, info)) and
    returns the first observation, and `act(episodes, observations)` acts for all running episodes as one batch.
    Returns each episode's return, success (max over its steps; nan where never reported) and final info (None
    where cut at max_steps); `frames` collects the renders of episode 0."""
    waiting, running, obs = iter(range(num_episodes)), [None] * len(envs), [None] * len(envs)
    returns, success, steps = np.zeros(num_episodes), np.full(num_episodes, np.nan), np.zeros(num_episodes, int)
    last = [None] * num_episodes

    def take_next(k):
        running[k] = next(waiting, None)
        if running[k] is not None:
            obs[k] = start(functools.partial(envs.reset, k), running[k])

    for k in range(len(envs)):
        take_next(k)
    while any(e is not None for e in running):
        busy = [k for k, e in enumerate(running) if e is not None]
        actions = act([running[k] for k in busy], [obs[k] for k in busy])
        if frames is not None and 0 in running:
            frames.append(envs.render(running.index(0)))
        for k, (ob, reward, terminated, truncated, info) in envs.step(dict(zip(busy, actions))).items():
            e, obs[k] = running[k], ob
            returns[e], steps[e] = returns[e] + reward, steps[e] + 1
            if "success" in info:
                success[e] = np.fmax(success[e], float(info["success"]))
            if terminated or truncated:
                last[e] = info
            if terminated or truncated or steps[e] == max_steps:
                take_next(k)
    return returns, success, last


class EnvPool:
    """`size` evaluation envs from `make_env`, stepped in this process, or with `workers` > 0 spread over that many
    processes that step their envs in parallel (make_env must then pickle: a functools.partial, not a lambda).
    A reset runs seeded_reset where the env lives."""

    def __init__(self, make_env, size: int, workers: int = 0):
        self.size, self.envs, self.pipes = size, [], []
        if not workers or not size:
            self.envs = [make_env() for _ in range(size)]
            return
        context = multiprocessing.get_context("spawn")  # a fork of a process that holds torch and MuJoCo is unsafe
        for w in range(workers):
            pipe, child = context.Pipe()
            context.Process(target=env_worker, args=(child, make_env, range(w, size, workers)), daemon=True).start()
            child.close()  # the worker's end lives in the worker only, so its death ends our recv() with EOFError
            self.pipes.append(pipe)
        for pipe in self.pipes:  # each worker says "ready" once its envs are made
            self.receive(pipe)

    def __len__(self):
        return self.size

    def ask(self, k: int, *message):
        pipe = self.pipes[k % len(self.pipes)]
        pipe.send(message)
        return self.receive(pipe)

    @staticmethod
    def receive(pipe):
        """A worker's reply; a worker's error (or its death) ends the run in one line."""
        try:
            reply = pipe.recv()
        except EOFError:  # no error came back: the process was killed (out of memory?)
            raise SystemExit("--eval-workers: an evaluation worker died; --eval-workers 0 steps the envs here")
        if isinstance(reply, RuntimeError):
            raise SystemExit(f"--eval-workers: an evaluation worker failed: {reply}")
        return reply

    def reset(self, k: int, seed: int, **options):
        return self.ask(k, "reset", k, seed, options) if self.pipes else seeded_reset(self.envs[k], seed, **options)

    def render(self, k: int):
        return self.ask(k, "render", k) if self.pipes else self.envs[k].render()

    def step(self, actions: Dict[int, np.ndarray]) -> Dict[int, tuple]:
        """{env: action} -> {env: (obs, reward, terminated, truncated, info)}, the workers' envs in parallel."""
        if not self.pipes:
            return {k: self.envs[k].step(a) for k, a in actions.items()}
        for w, pipe in enumerate(self.pipes):
            pipe.send(("step", {k: a for k, a in actions.items() if k % len(self.pipes) == w}))
        return {k: out for pipe in self.pipes for k, out in self.receive(pipe).items()}


def env_worker(pipe, make_env, ks):
    """A process of an EnvPool: makes envs ks, then resets, steps and renders them when asked, until its pool goes.
    An error goes back to the pool as a RuntimeError with its message."""
    try:
        envs = {k: make_env() for k in ks}
        pipe.send("ready")
        while True:
            command, *data = pipe.recv()
            if command == "reset":
                pipe.send(seeded_reset(envs[data[0]], data[1], **data[2]))
            elif command == "step":
                pipe.send({k: envs[k].step(a) for k, a in data[0].items()})
            else:
                pipe.send(envs[data[0]].render())
    except EOFError:  # the pool's process ended
        return
    except Exception as err:
        pipe.send(RuntimeError(f"{type(err).__name__}: {' '.join(str(err).split())}"))


def seeded_reset(env, seed: int, **options):
    """env.reset(seed=seed) that starts the same episode whatever the env or the process did before. OGBench draws
    start and goal noise from NumPy's global generator, and its manipulation tasks settle the goal scene with random
    actions from an action space made anew at each access, which seeds itself from the OS: while it resets, unseeded
    spaces take their seeds from NumPy's generator, seeded here with the episode's seed."""
    np.random.seed(seed)
    unseeded = gymnasium.utils.seeding.np_random
    gymnasium.utils.seeding.np_random = lambda s=None: unseeded(np.random.randint(2**31) if s is None else s)
    try:
        return env.reset(seed=seed, options=options or None)
    finally:
        gymnasium.utils.seeding.np_random = unseeded


def save_video(frames, path: str):
    import imageio.v2 as imageio

    try:
        imageio.mimsave(path, frames, fps=30)
    except Exception:  # no ffmpeg backend: fall back to a GIF
        imageio.mimsave(path[:-4] + ".gif", frames, duration=1 / 30)


# ------------------------------------------------------------------------ the run: directory, logs, checkpoints


def load_checkpoint(path: str, flag: str = "--resume"):
    """(checkpoint, its path), read on the CPU: a checkpoint file, or the newest checkpoint of a run directory
    that loads (unreadable ones, such as a save cut short by a kill, are skipped and named). A checkpoint of
    another script is refused in one line."""
    if os.path.isdir(path):
        found = glob.glob(os.path.join(path, "checkpoints", "step_*.pt"))
        found.sort(key=lambda p: int(p.rsplit("_", 1)[1][:-3]), reverse=True)
        if not found:
            raise SystemExit(f"{flag} {path}: no checkpoints/step_*.pt in that run directory")
    elif os.path.isfile(path):
        found = [path]
    else:
        raise SystemExit(f"{flag} {path}: no such run directory or checkpoint file")
    script, skipped = os.path.basename(__file__), []
    for candidate in found:
        try:
            checkpoint = torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or empty file, or not a checkpoint at all
            skipped.append(f"{os.path.basename(candidate)} is not a readable checkpoint ({type(err).__name__}: {err})")
            continue
        writer = checkpoint.get("script", script) if isinstance(checkpoint, dict) else "no script"
        saved = checkpoint.get("args", {"?": None}) if isinstance(checkpoint, dict) else {"?": None}
        if writer != script or not set(saved) <= {field.name for field in dataclasses.fields(Args)}:
            writer = "another script" if writer == script else writer
            raise SystemExit(f"{flag} {candidate}: a checkpoint of {writer}, not of {script}")
        for reason in skipped:
            print(f"{flag}: skipped {reason}")
        return checkpoint, candidate
    raise SystemExit(f"{flag} {path}: " + "; ".join(skipped))


def save_checkpoint(run_dir: str, step: int, state: dict, args, sampler: torch.Generator):
    """checkpoints/step_{step}.pt, written atomically: a plain dict of `state`, the script that wrote it, the
    run's arguments and its RNG states (the training noise's, on the CPU and the GPU, and the batch sampler's)."""
    rngs = {"torch_rng": torch.get_rng_state(), "sampler_rng": sampler.get_state()}
    if torch.cuda.is_initialized():  # the training noise drawn on the GPU
        rngs["cuda_rng"] = torch.cuda.get_rng_state()
    state = dict(state, script=os.path.basename(__file__), args=dataclasses.asdict(args), **rngs)
    write_atomically(os.path.join(run_dir, "checkpoints", f"step_{step}.pt"), state)


def write_atomically(path: str, content):
    """Text, or a checkpoint dict, written to a temporary file beside `path` and renamed over it: a kill never
    leaves half a file (the rename is atomic), at worst a stale .tmp that the next write replaces."""
    tmp = f"{path}.tmp"
    if isinstance(content, str):
        with open(tmp, "w", newline="") as f:
            f.write(content)
    else:
        torch.save(content, tmp)
    os.replace(tmp, path)


def restore_rng(checkpoint: dict, sampler: torch.Generator):
    torch.set_rng_state(checkpoint["torch_rng"])
    if "cuda_rng" in checkpoint and torch.cuda.is_available():
        torch.cuda.set_rng_state(checkpoint["cuda_rng"])
    try:
        sampler.set_state(checkpoint["sampler_rng"])
    except (KeyError, RuntimeError):  # an earlier version's checkpoint (NumPy drew its batches), or another device's
        sampler.manual_seed(checkpoint["step"])
        print(
            "--resume: the checkpoint's batch sampler is from another version or device: the batches differ from here"
        )


def run_directory(args, checkpoint_path: Optional[str]) -> str:
    """The resumed checkpoint's run directory, or a new {output_dir}/{env_id}__{exp_name}__{seed}__{unixtime}
    (runs started in the same second get _2, _3, ...)."""
    if checkpoint_path is not None:
        run_dir, parent = (
            os.path.dirname(os.path.dirname(checkpoint_path)),
            os.path.dirname(os.path.abspath(checkpoint_path)),
        )
        if os.path.basename(parent) != "checkpoints" or not os.path.isfile(os.path.join(run_dir, "args.json")):
            why = "not in a run directory's checkpoints/; resume the run directory it came from (or a whole copy)"
            raise SystemExit(f"--resume {checkpoint_path}: {why}")
        return run_dir
    path = os.path.join(args.output_dir, f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}")
    for suffix in [f"__{int(time.time())}"] + [f"__{int(time.time())}_{i}" for i in range(2, 1_000)]:
        try:
            os.makedirs(path + suffix)
            return path + suffix
        except FileExistsError:
            continue
        except OSError as err:  # a file where the output directory should be, no permission, ...
            raise SystemExit(f"--output-dir {args.output_dir}: cannot create a run directory there ({err})")
    raise SystemExit(f"{path}: could not create a new run directory")


def own_run_directory(run_dir: str) -> str:
    """One process writes a run directory at a time: it holds run_dir/lock with its pid. A lock left by a process
    that is gone is taken over, and said so. Returns the lock's path."""
    lock, pid = os.path.join(run_dir, "lock"), 0
    if os.path.exists(lock):
        with open(lock) as f:
            text = f.read().strip()
        pid = int(text) if text.isdigit() else 0
    if pid and pid != os.getpid():
        try:
            os.kill(pid, 0)  # signal 0 only asks whether the process exists
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:  # it exists, as another user's process
            alive = True
        if alive:
            raise SystemExit(f"{run_dir} is in use by process {pid} (the pid in {lock}): one run at a time")
        print(f"{run_dir}: process {pid}, which held it, is gone; taking the run over")
    write_atomically(lock, str(os.getpid()))
    return lock


class RunLog:
    """What a run writes besides checkpoints: args.json, TensorBoard events, eval.csv (`fields`, the step and the
    wall time first) and, with --track, wandb; each file written atomically. It holds the run directory's lock
    while open. A resume at `step` keeps the evaluations up to it, and the wall time goes on from there."""

    def __init__(self, run_dir: str, args, fields: List[str], step: int):
        self.lock, self.dir, self.fields, self.track = own_run_directory(run_dir), run_dir, fields, args.track
        self.video_dir = os.path.join(run_dir, "videos") if args.capture_video else None
        for sub in ("checkpoints",) + (("videos",) if args.capture_video else ()):
            os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
        write_atomically(os.path.join(run_dir, "args.json"), json.dumps(dataclasses.asdict(args), indent=2))
        if args.track:
            import wandb

            run = dict(config=dataclasses.asdict(args), name=os.path.basename(run_dir), dir=run_dir)
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, **run)
        self.writer = SummaryWriter(run_dir, purge_step=step or None)  # later events are redone, as evaluations
        self.csv_path, self.rows = os.path.join(run_dir, "eval.csv"), [fields]
        if step and os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                self.rows += [row for row in list(csv.reader(f))[1:] if int(row[0]) <= step]
        self.write_csv()
        self.start = time.time() - (float(self.rows[-1][1]) if len(self.rows) > 1 else 0.0)
        self.last = (time.time(), step)

    def write_csv(self):
        text = io.StringIO()
        csv.writer(text).writerows(self.rows)
        write_atomically(self.csv_path, text.getvalue())

    def scalars(self, step: int, values: Dict[str, float], prefix: str = "train"):
        """TensorBoard scalars; train/ ones come with the steps per second since the last call."""
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", float(value), step)
        if prefix == "train":
            (then, then_step), self.last = self.last, (time.time(), step)
            self.writer.add_scalar("perf/steps_per_second", (step - then_step) / (time.time() - then + 1e-9), step)

    def evaluation(self, step: int, stats: Dict[str, float]):
        """A row of eval.csv, eval/ scalars, and a line printed above the progress bar."""
        self.rows.append([step, round(time.time() - self.start, 1)] + [stats[k] for k in self.fields[2:]])
        self.write_csv()
        self.scalars(step, {k: v for k, v in stats.items() if not math.isnan(v)}, "eval")
        shown = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()]
        tqdm.write(f"{self.fields[0]} {step}: " + ", ".join(s for s in shown if not s.endswith(" nan")))
        self.last = (time.time(), step)  # steps per second count training only

    def close(self, stopped_by: Optional[str] = None):
        """Flush the logs, release the lock and say where everything is and what to run next."""
        self.writer.close()
        if self.track:
            import wandb

            wandb.finish()
        os.remove(self.lock)
        script, step = os.path.basename(__file__), self.rows[-1][0] if len(self.rows) > 1 else 0
        if stopped_by is not None:
            tqdm.write(f"{stopped_by}: stopped with a checkpoint; continue with\n  python {script} --resume {self.dir}")
            return
        last = [
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in zip(self.fields[2:], self.rows[-1][2:])
        ]
        last = ", ".join(s for s in last if not s.endswith(" nan"))
        tqdm.write(f"done: {self.dir}\n  last evaluation ({self.fields[0]} {step}): {last}")
        tqdm.write(f"  eval.csv and checkpoints/ are there; the curves: tensorboard --logdir {self.dir}")


class StopSignals:
    """Inside `with StopSignals() as stop:` SIGTERM, SIGUSR1 (what SLURM sends before it requeues a job) and Ctrl-C
    are caught: `stop.caught` names the first, and the training loop ends its current step, saves a checkpoint
    and exits with the command that resumes. A second Ctrl-C interrupts at once."""

    def __enter__(self):
        self.caught, self.handlers = None, {}
        for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            self.handlers[number] = signal.signal(number, self.catch)
        return self

    def catch(self, number, frame):
        if self.caught is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.caught = self.caught or signal.Signals(number).name

    def __exit__(self, *exception):
        for number, handler in self.handlers.items():
            signal.signal(number, handler)


def non_finite_step(first_bad: torch.Tensor, step: int, logs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The first step whose logged losses were not all finite (-1 while none), kept on the device: no host sync."""
    bad = ~torch.stack([v.float() for v in logs.values()]).isfinite().all()
    return torch.where((first_bad < 0) & bad, step, first_bad)


def init_distributed(args: Args):
    """(rank, world size, device). Under torchrun (which sets WORLD_SIZE, RANK, LOCAL_RANK) this joins the
    process group: NCCL with one GPU per process, gloo on CPU. A plain run is a world of one."""
    world, use_cuda = int(os.environ.get("WORLD_SIZE", "1")), args.cuda and torch.cuda.is_available()
    if world == 1:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    rank, local_rank, local_world = (int(os.environ.get(k, "0")) for k in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    if args.batch_size % world:  # said once, by rank 0; every process stops
        why = f"--batch-size {args.batch_size} is the global batch and must divide evenly among the {world} processes"
        raise SystemExit(1 if rank else f"{why}; e.g. --batch-size {max(world, args.batch_size // world * world)}")
    if use_cuda and torch.cuda.device_count() < local_world:
        why = f"{local_world} processes per node but {torch.cuda.device_count()} GPU(s)"
        raise SystemExit(1 if rank else f"{why}: start one per GPU, or add --no-cuda to train on CPU with gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(hours=2)  # the others wait while rank 0 evaluates
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return rank, world, device


def agree(first_bad: torch.Tensor, logs: Dict[str, torch.Tensor], stop: bool, world: int):
    """At a log/eval/save step every process learns the first non-finite step of any process (-1: none), the mean
    losses, and whether any process was asked to stop."""
    if world == 1:
        return first_bad, logs, stop
    flags = torch.stack([first_bad, torch.tensor(int(stop), device=first_bad.device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    logs = {k: v.clone() for k, v in logs.items()}
    for value in logs.values():
        dist.all_reduce(value)
        value /= world
    return flags[0], logs, bool(flags[1])


def resumed_args(args):
    """--resume: (the checkpoint, its path, the run's saved arguments); with --eval-only, this command's evaluation
    flags (--eval-episodes, --eval-max-steps, --capture-video) replace the saved ones. Without --resume: no
    checkpoint and these arguments."""
    if args.resume is None:
        return None, None, args
    checkpoint, path = load_checkpoint(args.resume)
    keep = ("resume", "eval_only", "eval_envs", "eval_workers")
    keep += ("eval_episodes", "eval_max_steps", "capture_video") if args.eval_only else ()
    return checkpoint, path, dataclasses.replace(Args(**checkpoint["args"]), **{k: getattr(args, k) for k in keep})


def evaluate_only(checkpoint_path: str, step: int, evaluate_at, args) -> str:
    """--eval-only: `evaluate_at(step, video_dir)` of a checkpoint, printed and written beside its run as
    eval_only_step_N.json (videos, if asked, into the run's videos/). Returns the run directory."""
    run_dir = os.path.dirname(os.path.dirname(checkpoint_path))
    video_dir = os.path.join(run_dir, "videos") if args.capture_video else None
    if video_dir is not None:
        os.makedirs(video_dir, exist_ok=True)
    stats, path = evaluate_at(step, video_dir), os.path.join(run_dir, f"eval_only_step_{step}.json")
    result = dict(checkpoint=checkpoint_path, step=step, episodes=args.eval_episodes, **stats)
    write_atomically(path, json.dumps(result, indent=2))
    shown = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()]
    print(f"{checkpoint_path}: " + ", ".join(s for s in shown if not s.endswith(" nan")) + f"\nwritten to {path}")
    return run_dir


def common_problems(args, positive) -> List[str]:
    """What every script checks before it starts: flags that must be positive (unless None), rendering videos
    without a display, and that the output and dataset directories are directories."""
    bad = [name for name in positive if getattr(args, name) is not None and getattr(args, name) <= 0]
    problems = [f"--{name.replace('_', '-')} must be positive" for name in bad]
    if args.capture_video and not os.environ.get("DISPLAY") and os.environ.get("MUJOCO_GL") not in ("egl", "osmesa"):
        how = f"MUJOCO_GL=egl python {os.path.basename(__file__)} ... (or MUJOCO_GL=osmesa)"
        problems.append(f"--capture-video without a display needs headless MuJoCo rendering chosen first: {how}")
    if args.eval_only and args.resume is None:
        problems.append("--eval-only evaluates a run's checkpoint: give it --resume RUN_DIR (or a checkpoint file)")
    for flag in ("output_dir", "dataset_dir"):
        path = os.path.expanduser(getattr(args, flag, "") or "")
        if os.path.exists(path) and not os.path.isdir(path):
            problems.append(f"--{flag.replace('_', '-')} {path} is a file, not a directory")
        elif flag == "output_dir" and os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
            problems.append(f"--output-dir {path} is not writable")
    return problems


def leave_together(world: int):
    """Under torchrun every process waits here until rank 0 has evaluated and saved, and then all leave the process
    group at once: a process that exits while its peers still talk to it makes gloo abort them."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def check_args(args: Args):
    names = ("total_steps", "batch_size", "log_interval", "eval_interval", "eval_episodes", "save_interval")
    names += ("learning_rate", "num_blocks", "hidden_dim", "rep_dim", "eval_max_steps", "flow_steps", "eval_envs")
    problems = common_problems(args, names)
    if not 0 < args.gamma < 1:
        problems.append("--gamma must lie in (0, 1)")
    if args.noise_std < 0:
        problems.append("--noise-std must be >= 0")
    if args.eval_workers < 0:
        problems.append("--eval-workers must be >= 0")
    if problems:
        raise SystemExit("; ".join(problems))


# -------------------------------------------------------------------------------------------------- main


def main(args: Args):
    checkpoint, path, args = resumed_args(args)
    check_args(args)
    rank, world, device = init_distributed(args)
    is_main = rank == 0  # the only process that evaluates, logs and saves
    torch.manual_seed(args.seed)
    sampler = torch.Generator(device).manual_seed(args.seed)  # the batches, drawn where the data is

    env, train_data, val_data = load_ogbench(args.env_id, args.dataset_dir, False, args.make_dataset)
    train, val = GoalDataset(train_data, device), GoalDataset(val_data, device)
    if args.batch_size > train.size:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {train.size:,} training transitions")
    num_tasks = len(env.unwrapped.task_infos)
    render = dict(render_mode="rgb_array", width=200, height=200) if args.capture_video else {}
    make_env = functools.partial(ogbench.make_env_and_datasets, args.env_id, env_only=True, **render)
    envs = EnvPool(make_env, min(args.eval_envs, args.eval_episodes) * is_main, args.eval_workers)
    del env  # not needed beyond its task count: an env holds ~150 MB on cube

    policy = POLICIES[args.policy](train.observations.shape[1], train.actions.shape[1], args).to(device)
    # fused: one kernel for all parameter tensors (on CPU ~5x faster than the default per-tensor loop)
    optimizer = torch.optim.AdamW(policy.parameters(), args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args))
    start_step, parts = 0, dict(policy=policy, optimizer=optimizer, scheduler=scheduler)  # what a checkpoint holds
    if checkpoint is not None:
        for key, part in parts.items():
            part.load_state_dict(checkpoint[key])
        restore_rng(checkpoint, sampler)
        start_step = checkpoint["step"]
    graphed = args.compile and device.type == "cuda" and world == 1  # the whole step as one CUDA graph
    if graphed:  # then the learning rate is a device tensor, which the schedule changes in place
        for group in optimizer.param_groups:
            group.update(lr=torch.tensor(float(group["lr"]), device=device), capturable=True)
    model = policy  # what the training step calls: the policy, or its DDP wrapper that averages gradients
    if world > 1:  # the buffers are constants: no need to broadcast them
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(policy, device_ids=device_ids, broadcast_buffers=False)
    if args.compile:  # the training step's model compiled (on one GPU also captured, below); evaluation stays eager
        model = torch.compile(model)

    obs, actions, goals = val.sample(1_024, args.gamma, torch.Generator(device).manual_seed(0))  # fixed validation
    val_batch = (obs, actions, goals, policy.draw(actions, torch.Generator(device).manual_seed(0)))
    evaluate_at = functools.partial(evaluate, policy, envs, num_tasks, val_batch, args, device)  # (step, video_dir)
    if args.eval_only:  # no training: evaluate the checkpoint and write the result beside its run
        return evaluate_only(path, start_step, evaluate_at, args), policy

    run_dir = run_directory(args, path) if is_main else None
    if is_main:
        tasks = [f"task{t}_success" for t in range(1, num_tasks + 1)]
        log = RunLog(run_dir, args, ["step", "wall_time", "val_loss", "val_nll", *tasks, "success"], start_step)
        size = f"{sum(p.numel() for p in policy.parameters()):,} parameters, acts with {policy.sampling}"
        size += f"; {train.size:,} transitions on {device}"
        where = f"resumed {run_dir} at step {start_step}" if start_step else f"writing to {run_dir}"
        print(f"{args.policy} policy, {size}" + (f" x {world} processes" if world > 1 else "") + f"; {where}")

    if start_step == 0 and is_main:
        log.evaluation(0, evaluate_at(0, log.video_dir))
    first_bad = torch.tensor(-1, device=device)
    share = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)  # this process's rows
    train_step = functools.partial(update, model, policy, optimizer, share=share)
    if graphed:  # warmed up and captured on a batch of its own: the sampler's stream is left alone
        train_step = cuda_graphed(
            train_step, train.sample(args.batch_size, args.gamma, torch.Generator(device)), [policy], [optimizer]
        )
    steps = range(start_step + 1, args.total_steps + 1)
    with StopSignals() as stop:
        for step in tqdm(steps, initial=start_step, total=args.total_steps, smoothing=0.05, disable=not is_main):
            batch = train.sample(args.batch_size, args.gamma, sampler)  # the global batch, the same in every process
            logs = train_step(batch)
            scheduler.step()
            first_bad = non_finite_step(first_bad, step, logs)

            last = step == args.total_steps
            intervals = (args.log_interval, args.eval_interval, args.save_interval)
            log_now, eval_now, save_now = (step % n == 0 or last for n in intervals)
            stopping = stop.caught is not None and world == 1  # under torchrun: agreed at a log/eval/save step
            if log_now or eval_now or save_now or stopping:  # before anything logs, evaluates or saves a broken policy
                first_bad, logs, stopping = agree(first_bad, logs, stop.caught is not None, world)
                if first_bad.item() >= 0:  # said once, by rank 0
                    why = f"non-finite training loss at step {first_bad.item()}; stopping"
                    raise SystemExit(1 if rank else f"{why} (try a lower --learning-rate or a larger --noise-std)")
            if not is_main:
                if stopping:
                    leave_together(world)
                    raise SystemExit(1)
                continue  # the other processes only train (their share of each batch)
            if log_now:
                log.scalars(step, dict(logs, lr=scheduler.get_last_lr()[0]))
            if eval_now:
                log.evaluation(step, evaluate_at(step, log.video_dir))
            if save_now or stopping:
                state = {key: part.state_dict() for key, part in parts.items()}
                save_checkpoint(run_dir, step, dict(state, step=step), args, sampler)
            if stopping:
                log.close(stopped_by=f"{stop.caught} at step {step}")
                leave_together(world)
                raise SystemExit(1)
    if is_main:
        log.close()
    leave_together(world)
    return run_dir, policy


if __name__ == "__main__":
    main(tyro.cli(Args))
