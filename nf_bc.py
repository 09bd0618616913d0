"""NF-BC: behavioural cloning with a normalizing-flow policy over action chunks and observation history.

"Normalizing Flows are Capable Models for RL" (Ghugare & Eysenbach, 2025): maximise
log p(a_t, ..., a_{t+k-1} | o_{t-h+1}, ..., o_t) on demonstrations. When acting, the policy samples a chunk of
k actions from the last h observations and executes the first m of them before it samples again. Actions are
noised during training and denoised when acting. The same batches train the competitors: `--policy gaussian`
(a Gaussian MLP over the chunk, acting with its mean), `--policy diffusion` (Diffusion Policy's recipe: DDPM
training, DDIM sampling, an EMA of the weights) and `--policy flow-matching` (Euler steps of a velocity field).

Demonstrations (--source): a plain .npz (observations, actions, terminals), such as the multimodal maze task
that make_dataset.py writes; an OGBench singletask dataset; or a Minari dataset stored locally.

    python make_dataset.py pointmaze-medium-multigoal-v0 --dataset-dir data
    python nf_bc.py --env-id pointmaze-medium-multigoal-v0 --dataset-dir data

A run writes {output_dir}/{env_id}__{exp_name}__{seed}__{unixtime}/: args.json, TensorBoard events,
eval.csv (mean return, success rate and normalised score where the task defines them, else nan; validation
NLL), checkpoints/ and videos/.
"""

import copy
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
    """save a video of the first evaluation episode"""
    output_dir: str = "runs"
    """where run directories are created"""
    resume: Optional[str] = None
    """run directory or checkpoint file to continue from (its saved arguments are used)"""
    eval_only: bool = False
    """with --resume: evaluate that checkpoint (--eval-episodes, --capture-video) without training"""

    # data
    source: Literal["npz", "ogbench", "minari"] = "npz"
    """where the demonstrations come from (see env_id)"""
    env_id: str = "pointmaze-medium-multigoal-v0"
    """npz: <dataset_dir>/<env_id>.npz; ogbench: a singletask dataset (cube-single-play-singletask-task1-v0);
    minari: a local dataset id (mujoco/hopper/expert-v0)"""
    dataset_dir: str = "~/.ogbench/data"
    """directory of the .npz and OGBench files (Minari keeps its own: $MINARI_DATASETS_PATH or ~/.minari/datasets)"""
    make_dataset: bool = False
    """OGBench data missing and not downloadable: make it with the make_dataset.py beside this script (minutes)"""
    eval_env: Optional[str] = None
    """npz: gymnasium id to evaluate in (default: the file's env_name entry; without one, validation NLL only)"""
    obs_horizon: int = 2
    """observations the policy sees (h): o_{t-h+1}, ..., o_t"""
    action_horizon: int = 8
    """actions the policy predicts at once (k): a_t, ..., a_{t+k-1}"""
    exec_horizon: int = 4
    """actions executed from each predicted chunk (m <= k) before the policy is asked again"""
    noise_std: float = 0.1
    """flow and Gaussian: std of the noise added to training actions (scaled to [-1, 1]; denoised when acting)"""

    # policy
    policy: Literal["flow", "gaussian", "diffusion", "flow-matching"] = "flow"
    """the policy class: the paper's flow, a Gaussian MLP, a diffusion policy or flow matching"""
    num_blocks: int = 12
    """flow blocks"""
    hidden_dim: int = 512
    """width of the flow's coupling networks"""
    rep_dim: int = 256
    """size of the observation-history encoding that conditions the flow"""
    denoise: bool = True
    """flow: one Tweedie denoising step on sampled action chunks"""
    diffusion_steps: int = 10
    """diffusion: DDIM sampling steps over the 100 training timesteps (100: DDPM's ancestral sampler)"""
    flow_steps: int = 10
    """flow matching: Euler steps per sampled chunk"""

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
    """steps between training logs"""
    eval_interval: int = 100_000
    """steps between evaluations and validation NLL (also at step 0 and at the end)"""
    eval_episodes: int = 50
    """evaluation episodes"""
    eval_envs: int = 5
    """environments the evaluation episodes take turns on, the policy batched over them (each holds ~150 MB on cube)"""
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


class Policy(nn.Module):
    """What every policy class shares: observation normalisation and the action box, kept as buffers so that
    a checkpoint is a complete policy, and the verbs of training and evaluation. Observations come in as
    histories [B, h, o], actions as chunks [B, k, a] scaled to [-1, 1]; act() returns chunks in the
    environment's units. Here the flow's and the Gaussian's loss: -log p(chunk + noise | history)."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.chunk_shape, self.noise_std = (args.action_horizon, action_dim), args.noise_std
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("action_low", -torch.ones(action_dim))
        self.register_buffer("action_high", torch.ones(action_dim))

    def features(self, obs):
        return ((obs - self.obs_mean) / self.obs_std).flatten(1)

    @torch.no_grad()
    def set_units(self, observations, low: np.ndarray, high: np.ndarray):
        """The training observations' mean and std, and the environment's action box."""
        self.obs_mean.copy_(observations.mean(0))
        self.obs_std.copy_(observations.std(0).clamp_min(1e-3))
        self.action_low.copy_(torch.as_tensor(low))
        self.action_high.copy_(torch.as_tensor(high))

    def to_env_units(self, actions):
        return self.action_low + (actions.clamp(-1, 1) + 1) / 2 * (self.action_high - self.action_low)

    def draw(self, actions, generator=None):
        """The randomness of a training loss, for a whole batch: here the action noise."""
        return (torch.randn(actions.shape, generator=generator, device=actions.device),)

    def loss(self, obs, actions, noise):
        return -self.log_prob(obs, actions + self.noise_std * noise)

    def forward(self, *batch):  # what a DistributedDataParallel wrapper calls
        return self.loss(*batch)

    def after_step(self):
        """After each optimiser step: nothing (the diffusion policy updates its EMA)."""


class FlowPolicy(Policy):
    """p(chunk | history): an encoder of the history (4 x 512, SiLU, LayerNorm) conditions a flow over the
    flattened chunk (k x action_dim dimensions)."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__(obs_dim, action_dim, args)
        self.encoder = mlp([args.obs_horizon * obs_dim] + [512] * 4 + [args.rep_dim], nn.SiLU, layer_norm=True)
        self.flow = ConditionalFlow(args.action_horizon * action_dim, args.rep_dim, args.num_blocks, args.hidden_dim)
        self.use_denoise = args.denoise
        self.sampling = "one flow pass" + (" and a denoising step" if args.denoise else "")

    def log_prob(self, obs, actions):
        return self.flow.log_prob(actions.flatten(1), self.encoder(self.features(obs)))

    def act(self, obs, randn):
        """Chunks [B, k, a] in env units for histories [B, h, o]; randn(*shape) draws standard normals [B, *shape]
        (in evaluation one stream per episode, see episode_noise)."""
        cond = self.encoder(self.features(obs))
        actions = self.flow.sample(cond, randn(self.flow.dim))
        if self.use_denoise:
            actions = denoise(self.flow, actions, cond, self.noise_std)
        return self.to_env_units(actions.view(len(obs), *self.chunk_shape))


class GaussianPolicy(Policy):
    """A Gaussian MLP (3 x 512, GELU) over the flattened chunk, with a learned state-independent std."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__(obs_dim, action_dim, args)
        chunk_dim = args.action_horizon * action_dim
        self.net = mlp([args.obs_horizon * obs_dim, 512, 512, 512, chunk_dim], nn.GELU, layer_norm=False)
        self.log_std = nn.Parameter(torch.zeros(chunk_dim))
        self.sampling = "its mean (one pass)"

    def log_prob(self, obs, actions):
        z = (actions.flatten(1) - self.net(self.features(obs))) / self.log_std.exp()
        return (-0.5 * z.square() - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def act(self, obs, randn):
        return self.to_env_units(self.net(self.features(obs)).view(len(obs), *self.chunk_shape))  # the mean


class FlowMatchingPolicy(Policy):
    """Flow matching as FQL's BC flow: a velocity field, an MLP 4 x w (GELU) on concat(x_t, embed(t),
    encoder(history)) with the flow's encoder and w set so that the policy has the flow's parameter count; trained
    on the linear path x_t = (1 - t) z + t a, z ~ N(0, I), t ~ U(0, 1), to predict the velocity a - z (no action
    noise); acts with --flow-steps Euler steps from z. The diffusion policy uses the same network."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__(obs_dim, action_dim, args)
        self.steps, self.sampling = args.flow_steps, f"{args.flow_steps} Euler steps"
        self.encoder = mlp([args.obs_horizon * obs_dim] + [512] * 4 + [args.rep_dim], nn.SiLU, layer_norm=True)
        with torch.random.fork_rng(devices=[]):  # a flow policy of these sizes built aside, for its parameter count
            target = sum(p.numel() for p in FlowPolicy(obs_dim, action_dim, args).parameters())
        self.dim = args.action_horizon * action_dim
        target, in_dim = target - sum(p.numel() for p in self.encoder.parameters()), self.dim + 32 + args.rep_dim
        self.net = mlp([in_dim] + [matching_width(target, in_dim, self.dim)] * 4 + [self.dim], nn.GELU, False)

    def predict(self, x, t, cond, net=None):
        return (net or self.net)(torch.cat([x, time_embedding(t), cond], -1))

    def draw(self, actions, generator=None):
        """The randomness of a training loss, for a whole batch: the path's start z and time t."""
        z = torch.randn(len(actions), self.dim, generator=generator, device=actions.device)
        return z, torch.rand(len(actions), 1, generator=generator, device=actions.device)

    def loss(self, obs, actions, z, t):
        a = actions.flatten(1)
        return (self.predict((1 - t) * z + t * a, t, self.encoder(self.features(obs))) - (a - z)).square().mean(-1)

    def act(self, obs, randn):
        cond = self.encoder(self.features(obs))
        x = randn(self.dim)
        for i in range(self.steps):
            x = x + self.predict(x, torch.full((len(obs), 1), i / self.steps, device=obs.device), cond) / self.steps
        return self.to_env_units(x.view(len(obs), *self.chunk_shape))


class DiffusionPolicy(FlowMatchingPolicy):
    """Diffusion Policy's recipe on the flow-matching policy's network (not Diffusion Policy's 1-D convolutional
    U-Net): epsilon prediction over 100 timesteps of the squared-cosine schedule; acts by DDIM with
    --diffusion-steps steps (100: DDPM's ancestral sampler, which is DDIM with eta 1 on every step), predicted
    chunks clipped to [-1, 1], from an EMA of the weights (decay 1 - (1 + n)^-0.75 after n updates, at most
    0.9999, as Diffusion Policy's EMAModel)."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__(obs_dim, action_dim, args)
        f = torch.cos((torch.linspace(0, 1, 101, dtype=torch.float64) + 0.008) / 1.008 * math.pi / 2).square()
        self.register_buffer("alpha_bars", torch.cumprod(1 - (1 - f[1:] / f[:-1]).clamp(max=0.999), 0).float())
        self.ema = copy.deepcopy(nn.ModuleList([self.encoder, self.net])).requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros(()))
        self.steps, self.sampling = args.diffusion_steps, f"{args.diffusion_steps} DDIM steps (EMA weights)"

    def draw(self, actions, generator=None):
        """The randomness of a training loss, for a whole batch: the noise and the timestep."""
        noise = torch.randn(len(actions), self.dim, generator=generator, device=actions.device)
        return noise, torch.randint(100, (len(actions), 1), generator=generator, device=actions.device)

    def loss(self, obs, actions, noise, k):
        a_bar = self.alpha_bars[k]
        x = a_bar.sqrt() * actions.flatten(1) + (1 - a_bar).sqrt() * noise
        return (self.predict(x, k / 100, self.encoder(self.features(obs))) - noise).square().mean(-1)

    @torch.no_grad()
    def after_step(self):
        decay = (1 - (1 + self.ema_updates) ** -0.75).clamp(max=0.9999)
        for ema, p in zip(self.ema.parameters(), [*self.encoder.parameters(), *self.net.parameters()]):
            ema.lerp_(p, 1 - decay)
        self.ema_updates += 1

    def act(self, obs, randn):
        encoder, net = self.ema
        cond, one = encoder(self.features(obs)), torch.ones((), device=obs.device)
        x = randn(self.dim)
        ks = [i * (100 // self.steps) for i in reversed(range(self.steps))]  # 90, 80, ..., 0 for 10 steps
        for k, k_prev in zip(ks, ks[1:] + [-1]):
            a, a_prev = self.alpha_bars[k], self.alpha_bars[k_prev] if k_prev >= 0 else one
            eps = self.predict(x, torch.full((len(obs), 1), k / 100, device=obs.device), cond, net)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # the noise that the clipped prediction implies
            sigma = ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt() if self.steps == 100 else 0 * one
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma.square()).clamp_min(0).sqrt() * eps
            if self.steps == 100:  # DDPM: fresh noise at every step
                x = x + sigma * randn(self.dim)
        return self.to_env_units(x.view(len(obs), *self.chunk_shape))


POLICIES = dict(flow=FlowPolicy, gaussian=GaussianPolicy, diffusion=DiffusionPolicy)
POLICIES["flow-matching"] = FlowMatchingPolicy


# --------------------------------------------------------------------------------------------- algorithm


def bc_loss(model, policy, obs, actions, *, share: slice = slice(None)) -> torch.Tensor:
    """The policy's loss (flow, Gaussian: -log p(chunk + noise | history); diffusion: the noise error; flow
    matching: the velocity error) over this process's share of the batch. Its randomness is drawn for the whole
    batch, so the processes of a data-parallel run together see what a single process sees."""
    draws = policy.draw(actions)
    return model(obs[share], actions[share], *(d[share] for d in draws)).mean()


def update(model, policy, optimizer, batch, *, share: slice = slice(None)):
    """One AdamW step on a batch (histories, chunks); returns the loss for logging (not read here)."""
    loss = bc_loss(model, policy, *batch, share=share)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under DDP this also averages the gradients of all processes
    optimizer.step()
    policy.after_step()  # the diffusion policy's EMA of the weights
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


class ChunkDataset:
    """Demonstrations on `device`; samples observation histories [B, h, o] and action chunks [B, k, a] that stay
    inside one episode: a history reaching before the episode's start repeats its first observation, a chunk
    running past its end repeats its last action."""

    def __init__(self, data: Dict[str, np.ndarray], obs_horizon: int, action_horizon: int, device: torch.device):
        self.observations = torch.as_tensor(data["observations"], dtype=torch.float32, device=device)
        self.actions = torch.as_tensor(data["actions"], dtype=torch.float32, device=device)
        self.size = len(data["terminals"])
        ends = np.flatnonzero(data["terminals"])  # the last step of each episode
        if len(ends) == 0 or ends[-1] != self.size - 1:
            raise SystemExit(
                "dataset: the last step is not marked as an episode end (terminals); the file is truncated"
            )
        episode = np.searchsorted(ends, np.arange(self.size))
        first, last = np.r_[0, ends[:-1] + 1][episode], ends[episode]
        t = np.arange(self.size)[:, None]
        self.obs_index = torch.as_tensor(np.maximum(t + np.arange(1 - obs_horizon, 1), first[:, None]), device=device)
        self.action_index = torch.as_tensor(np.minimum(t + np.arange(action_horizon), last[:, None]), device=device)

    def sample(self, batch_size: int, generator: torch.Generator):
        """A batch drawn on the data's device by `generator` (no copy from the host per batch)."""
        idx = torch.randint(self.size, (batch_size,), generator=generator, device=self.observations.device)
        return self.observations[self.obs_index[idx]], self.actions[self.action_index[idx]]


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


def flatten_observation(space: gymnasium.Space, obs) -> np.ndarray:
    """Dict observations (one step or a batch of steps) as one vector, keys in the space's order."""
    if isinstance(space, gymnasium.spaces.Dict):
        return np.concatenate([flatten_observation(space[k], obs[k]) for k in space.keys()], -1)
    obs = np.asarray(obs, dtype=np.float32)
    return obs.reshape(*obs.shape[: obs.ndim - len(space.shape)], -1)


def load_minari(dataset_id: str, val_every: int):
    """A local Minari dataset and its transitions as train and validation dicts (every `val_every`-th episode,
    None if there is none): observations, next_observations, actions, rewards, masks (1 - termination) and
    terminals (True at each episode's last step)."""
    try:
        import minari
    except ImportError:
        raise SystemExit('--source minari needs Minari: pip install "minari[hdf5]"')
    try:
        dataset = minari.load_dataset(dataset_id)
    except (FileNotFoundError, ValueError) as err:
        local, root = list(minari.list_local_datasets()), os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
        raise SystemExit(
            f"Minari dataset {dataset_id!r} is not in {root} ({type(err).__name__}){did_you_mean(dataset_id, local)}\n"
            f"Local datasets: {', '.join(local) or 'none'}. Download it where there is network with\n"
            f"  minari download {dataset_id}\nand copy it into $MINARI_DATASETS_PATH (default ~/.minari/datasets)."
        )

    def arrays(episodes):
        obs = [flatten_observation(dataset.observation_space, e.observations) for e in episodes]
        actions = [np.asarray(e.actions, np.float32).reshape(len(e.actions), -1) for e in episodes]
        return {
            "observations": np.concatenate([o[:-1] for o in obs]),
            "next_observations": np.concatenate([o[1:] for o in obs]),
            "actions": np.concatenate(actions),
            "rewards": np.concatenate([np.asarray(e.rewards, np.float32) for e in episodes]),
            "masks": np.concatenate([1.0 - np.asarray(e.terminations, np.float32) for e in episodes]),
            "terminals": np.concatenate([np.arange(len(a)) == len(a) - 1 for a in actions]),
        }

    episodes = list(dataset.iterate_episodes())
    is_val = [val_every > 0 and i % val_every == val_every - 1 for i in range(len(episodes))]
    val = [e for e, v in zip(episodes, is_val) if v]
    return dataset, arrays([e for e, v in zip(episodes, is_val) if not v]), arrays(val) if val else None


def load_npz(path: str, make_hint: str) -> Dict[str, np.ndarray]:
    """A demonstration file: observations [N, o], actions [N, a], terminals [N] (True at each episode's end)."""
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing. {make_hint}")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as err:
        raise SystemExit(f"could not read {path} ({type(err).__name__}: {err}). {make_hint}")
    shapes = "observations [N, obs_dim], actions [N, action_dim] and terminals [N] (True at an episode's last step)"
    if missing := [k for k in ("observations", "actions", "terminals") if k not in data]:
        raise SystemExit(f"{path} lacks {', '.join(missing)}: a demonstration file needs {shapes}")
    n, obs, actions = len(data["terminals"]), data["observations"], data["actions"]
    if obs.ndim != 2 or actions.ndim != 2 or len(obs) != n or len(actions) != n:
        raise SystemExit(f"{path}: {obs.shape}, {actions.shape} and {data['terminals'].shape} must be {shapes}")
    return data


class AnyGoalMaze(gymnasium.Wrapper):
    """An OGBench maze episode from a fixed start cell that succeeds, and ends, on reaching any of several goal
    cells (within the maze's goal tolerance of a cell centre); reward 1 on success, else 0."""

    def __init__(self, env: gymnasium.Env, init_ij, goal_ijs):
        super().__init__(env)
        self.task_info = dict(init_ij=tuple(int(v) for v in init_ij), goal_ij=tuple(int(v) for v in goal_ijs[0]))
        self.goal_xys = np.array([env.unwrapped.ij_to_xy(tuple(int(v) for v in g)) for g in goal_ijs])

    def reset(self, *, seed=None, options=None):
        return self.env.reset(seed=seed, options=dict(task_info=self.task_info))

    def step(self, action):
        ob, _, terminated, truncated, info = self.env.step(action)
        reached = np.linalg.norm(self.goal_xys - self.env.unwrapped.get_xy(), axis=1).min() <= self.unwrapped._goal_tol
        info["success"] = float(reached)
        return ob, float(reached), terminated or reached, truncated, info


def load_task(args: Args, num_envs: int):
    """Train/val demonstrations (val None without a split), `num_envs` evaluation envs (none where there is no
    environment), the observation space of the envs, and the normalised score (a function of returns, or None)."""
    render = dict(render_mode="rgb_array", width=200, height=200) if args.capture_video else {}
    if args.source == "ogbench":
        env, train, val = load_ogbench(args.env_id, args.dataset_dir, True, args.make_dataset)
        envs = [ogbench.make_env_and_datasets(args.env_id, env_only=True, **render) for _ in range(num_envs)]
        return train, val, envs, env.observation_space, None
    if args.source == "minari":
        dataset, train, val = load_minari(args.env_id, val_every=10)
        score = None
        if None not in (dataset.storage.metadata.get("ref_min_score"), dataset.storage.metadata.get("ref_max_score")):
            import minari

            score = lambda returns: minari.get_normalized_score(dataset, np.asarray(returns))  # noqa: E731
        try:
            envs = [dataset.recover_environment(eval_env=True, **render) for _ in range(num_envs)]
        except Exception as err:  # the package that registers the environment is missing, ...
            install = "D4RL/* datasets: pip install gymnasium-robotics; mujoco/*: pip install mujoco"
            why = f"could not make the evaluation environment of {args.env_id} ({type(err).__name__}: {err})"
            raise SystemExit(f"{why}; install the package that provides it ({install})")
        space, fix = dataset.action_space, f"download it again: minari download {args.env_id}"
        for data in (train, val) if val is not None else (train,):
            check_data(data, f"Minari dataset {args.env_id}", fix, (space.low, space.high), None)
        return train, val, envs, dataset.observation_space, score
    directory = os.path.expanduser(args.dataset_dir)
    hint = "--source npz reads <dataset-dir>/<env-id>.npz with observations, actions and terminals."
    if args.env_id.endswith("-multigoal-v0"):
        hint = f"Make it with\n  python make_dataset.py {args.env_id} --dataset-dir {args.dataset_dir} --overwrite"
    train = load_npz(os.path.join(directory, f"{args.env_id}.npz"), hint)
    val_path = os.path.join(directory, f"{args.env_id}-val.npz")
    val = load_npz(val_path, hint) if os.path.exists(val_path) else None
    env_name = args.eval_env or (str(train["env_name"]) if "env_name" in train else None)
    if env_name is not None and env_name not in gymnasium.registry:
        raise SystemExit(
            f"unknown gymnasium environment {env_name!r} to evaluate in" + did_you_mean(env_name, gymnasium.registry)
        )
    envs = []
    for _ in range(num_envs if env_name is not None else 0):
        if "goal_ijs" in train and args.eval_env is None:  # make_dataset.py's multigoal maze task
            steps = dict(max_episode_steps=int(train["max_episode_steps"]))
            env = gymnasium.make(env_name, terminate_at_goal=False, add_noise_to_goal=False, **steps, **render)
            envs.append(AnyGoalMaze(env, train["init_ij"], train["goal_ijs"]))
        else:
            envs.append(gymnasium.make(env_name, **render))
    space = envs[0].action_space if envs else None
    box = (space.low, space.high) if isinstance(space, gymnasium.spaces.Box) else None
    obs_dim = gymnasium.spaces.flatdim(envs[0].observation_space) if envs else None
    fix = f"or --eval-env {args.eval_env} is not the environment they come from" if args.eval_env else hint
    for data, path in ((train, f"{args.env_id}.npz"), (val, f"{args.env_id}-val.npz")):
        if data is not None:
            check_data(data, os.path.join(directory, path), fix, box, obs_dim)
    return train, val, envs, envs[0].observation_space if envs else None, None


def action_box(args: Args, envs, actions: np.ndarray):
    """The box the policy acts in: the environment's, or the demonstrations' range where it has no bounded box."""
    space = envs[0].action_space if envs else None
    if envs and not isinstance(space, gymnasium.spaces.Box):
        raise SystemExit(f"{args.env_id}: the action space is {space}; the policies model continuous (Box) actions")
    if envs and actions.shape[1] != int(np.prod(space.shape)):
        raise SystemExit(f"{args.env_id}: the demonstrations have {actions.shape[1]}-D actions, the env {space.shape}")
    if envs and np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high)):
        return space.low.astype(np.float32), space.high.astype(np.float32)
    return actions.min(0), actions.max(0) + 1e-6


def scale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Actions from [low, high] to [-1, 1], the box the policies act in."""
    return np.clip(2 * (actions - low) / (high - low) - 1, -1, 1).astype(np.float32)


# -------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    policy, envs, obs_space, val_batch, args: Args, device, step: int, video_dir, score_fn
) -> Dict[str, float]:
    """Validation NLL of one fixed batch (nan without one); mean return, success rate (where the env reports
    success) and normalised score (where defined) over --eval-episodes episodes with fixed seeds on the pool of
    `envs`, the policy batched over the running ones."""
    policy.eval()
    stats = dict.fromkeys(("val_loss", "val_nll", "return", "success", "score"), math.nan)
    if val_batch:
        stats["val_loss"] = policy.loss(*val_batch[:2], *val_batch[2]).mean().item()
        stats["val_nll"] = stats["val_loss"] if hasattr(policy, "log_prob") else math.nan
    if not envs:
        policy.train()
        return stats
    tqdm.write(f"evaluating at step {step}: {args.eval_episodes} episodes ...")
    flat = (
        (lambda o: flatten_observation(obs_space, o))
        if obs_space is not None
        else (lambda o: np.asarray(o, np.float32))
    )
    seeds = [100_000 + i for i in range(args.eval_episodes)]  # the same for every run and step
    noise = [torch.Generator().manual_seed(args.seed * 1_000_003 + step + 7_919 * s) for s in seeds]
    history, plan, t, frames = {}, {}, {}, [] if video_dir is not None else None

    def start(reset, episode):
        ob = reset(seeds[episode])[0]
        history[episode], t[episode] = np.repeat(flat(ob)[None], args.obs_horizon, 0), 0  # padded with the first
        return ob

    def act(episodes, obs):  # a chunk is planned every exec_horizon steps of an episode
        for e, ob in zip(episodes, obs):
            if t[e] > 0:
                history[e] = np.concatenate([history[e][1:], flat(ob)[None]])
        due = [e for e in episodes if t[e] % args.exec_horizon == 0]
        if due:
            o = torch.as_tensor(np.array([history[e] for e in due]), dtype=torch.float32, device=device)
            plan.update(zip(due, policy.act(o, episode_noise([noise[e] for e in due], device)).cpu().numpy()))
        actions = [plan[e][t[e] % args.exec_horizon] for e in episodes]
        t.update((e, t[e] + 1) for e in episodes)
        return actions

    returns, success, _ = run_episodes(envs, args.eval_episodes, start, act, args.eval_max_steps, frames)
    if video_dir is not None:
        save_video(frames, os.path.join(video_dir, f"step{step}.mp4"))
    policy.train()
    stats["return"] = float(returns.mean())
    stats["success"] = float(np.nan_to_num(success).mean()) if not np.isnan(success).all() else math.nan
    stats["score"] = float(np.mean(score_fn(returns))) if score_fn is not None else math.nan
    return stats


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
    keep = ("resume", "eval_only", "eval_envs")
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
    names += ("obs_horizon", "action_horizon", "exec_horizon", "eval_envs")
    names += ("learning_rate", "num_blocks", "hidden_dim", "rep_dim", "eval_max_steps", "flow_steps", "diffusion_steps")
    problems = common_problems(args, names)
    if args.diffusion_steps > 100:
        problems.append("--diffusion-steps cannot exceed the 100 training timesteps (100: DDPM)")
    if args.exec_horizon > args.action_horizon:
        problems.append(
            f"--exec-horizon ({args.exec_horizon}) cannot exceed --action-horizon ({args.action_horizon}): "
            "the policy executes actions from the chunk it predicted"
        )
    if args.noise_std < 0:
        problems.append("--noise-std must be >= 0")
    if args.eval_env is not None and args.source != "npz":
        problems.append("--eval-env is for --source npz (OGBench and Minari datasets name their own environment)")
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

    train_data, val_data, envs, obs_space, score_fn = load_task(
        args, num_envs=min(args.eval_envs, args.eval_episodes) if is_main else 1
    )
    low, high = action_box(args, envs, train_data["actions"])
    for data in (train_data, val_data):
        if data is not None:
            data["actions"] = scale_actions(data["actions"], low, high)
    train = ChunkDataset(train_data, args.obs_horizon, args.action_horizon, device)
    if args.batch_size > train.size:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {train.size:,} training transitions")
    val = ChunkDataset(val_data, args.obs_horizon, args.action_horizon, device) if val_data is not None else None
    policy = POLICIES[args.policy](train.observations.shape[1], train.actions.shape[1], args).to(device)
    policy.set_units(train.observations, low, high)
    trained = [p for p in policy.parameters() if p.requires_grad]  # not the diffusion policy's EMA copy
    # fused: one kernel for all parameter tensors (on CPU ~5x faster than the default per-tensor loop)
    optimizer = torch.optim.AdamW(trained, args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args))
    start_step = 0
    if checkpoint is not None:
        for part, key in ((policy, "policy"), (optimizer, "optimizer"), (scheduler, "scheduler")):
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

    val_batch = None
    if val is not None:  # one fixed validation batch
        obs, actions = val.sample(1_024, torch.Generator(device).manual_seed(0))
        val_batch = (obs, actions, policy.draw(actions, torch.Generator(device).manual_seed(0)))
    pool = EnvPool(iter(envs).__next__, len(envs))  # the envs made above, stepped in this process
    evaluate_at = functools.partial(evaluate, policy, pool, obs_space, val_batch, args, device, score_fn=score_fn)
    if args.eval_only:  # no training: evaluate the checkpoint and write the result beside its run
        return evaluate_only(path, start_step, evaluate_at, args), policy

    run_dir = run_directory(args, path) if is_main else None
    if is_main:
        log = RunLog(
            run_dir, args, ["step", "wall_time", "val_loss", "val_nll", "return", "success", "score"], start_step
        )
        size = f"{sum(p.numel() for p in trained):,} parameters, acts with {policy.sampling}"
        size += f"; {train.size:,} transitions on {device}"
        where = f"resumed {run_dir} at step {start_step}" if start_step else f"writing to {run_dir}"
        print(f"{args.policy} policy, {size}" + (f" x {world} processes" if world > 1 else "") + f"; {where}")
        if not envs:
            print("no environment to evaluate in (give --eval-env): evaluations report the validation NLL only")
        if val is None:
            print("no validation split (an -val.npz file, or 10+ Minari episodes): val_nll is nan")

    if start_step == 0 and is_main:
        log.evaluation(0, evaluate_at(0, log.video_dir))
    first_bad = torch.tensor(-1, device=device)
    share = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)  # this process's rows
    train_step = functools.partial(update, model, policy, optimizer, share=share)
    if graphed:  # warmed up and captured on a batch of its own: the sampler's stream is left alone
        train_step = cuda_graphed(
            train_step, train.sample(args.batch_size, torch.Generator(device)), [policy], [optimizer]
        )
    steps = range(start_step + 1, args.total_steps + 1)
    with StopSignals() as stop:
        for step in tqdm(steps, initial=start_step, total=args.total_steps, smoothing=0.05, disable=not is_main):
            batch = train.sample(args.batch_size, sampler)  # the global batch, the same in every process
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
                state = dict(
                    policy=policy.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict()
                )
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
