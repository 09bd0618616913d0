"""NF-UGS: reward-free exploration that commands the goals a normalizing flow finds least likely.

"Normalizing Flows are Capable Models for RL" (Ghugare & Eysenbach, 2025), unsupervised goal sampling. One
flow models the discounted occupancy p(g | s, a) of the agent's own x-y position g, trained by NLL on future
states of its replay buffer (geometric offset, goal noise). With probability 0.1 the (s, a) condition is
replaced by zeros, so the same flow also learns the marginal density p(g) of the states reached so far.
Every few steps each environment draws candidate goals from the buffer and commands the one with the lowest
marginal density: the frontier. A tanh-Gaussian SAC actor pi(a | s, g) maximises log p(g | s, a) - alpha *
log pi(a | s, g) on hindsight goals, alpha tuned toward a target entropy. No reward is ever used; the five
evaluation tasks of the maze are only used to measure success. `--goal-strategy uniform` commands a random
buffer state instead, `oracle` the evaluation goals; `--density gaussian` swaps the flow for a conditional
Gaussian (its marginal is then one Gaussian over the reached states).

    python nf_goal_explore.py --env-id pointmaze-medium-v0

A run writes {output_dir}/{env_id}__{exp_name}__{seed}__{unixtime}/: args.json, TensorBoard events (with the
heat map as an image), eval.csv (success overall and per task, coverage), heatmaps/ (a PNG per evaluation:
the maze, where the agent has been and the goals it was recently sent to), checkpoints/ (networks, optimisers,
replay buffer, visit counts, RNG states) and videos/.
"""

import csv
import dataclasses
import difflib
import functools
import glob
import io
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional

import gymnasium
import numpy as np
import ogbench  # noqa: F401  (registers the OGBench environments)
import torch
import tyro
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from flow import ConditionalFlow


@dataclass
class Args:
    # experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (part of the run directory)"""
    seed: int = 1
    """seed of the run (environments, initialisation, training noise)"""
    cuda: bool = True
    """use CUDA when it is available"""
    compile: bool = False
    """torch.compile the networks of the training step; on a GPU also capture the update as a CUDA graph"""
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

    # environment
    env_id: str = "pointmaze-medium-v0"
    """an OGBench maze used online, no dataset: pointmaze-/antmaze- medium-/large-/giant-v0"""
    num_envs: int = 4
    """parallel environments (a gymnasium vector env); every episode starts in the first evaluation task's start cell"""
    max_episode_steps: Optional[int] = None
    """length of a training episode (default: the environment's, 1000)"""

    # exploration
    goal_strategy: Literal["min-density", "uniform", "oracle"] = "min-density"
    """which goal each environment is sent to: the lowest marginal density among candidates from the buffer,
    a random buffer state, or one of the evaluation goals (an oracle baseline)"""
    num_candidates: int = 1024
    """buffer states each environment scores when it picks a goal"""
    goal_hold_steps: int = 100
    """environment steps a commanded goal is held before the next one is picked (also picked at each reset)"""

    # density model: the critic
    density: Literal["flow", "gaussian"] = "flow"
    """the model of p(g | s, a): the paper's flow or a conditional diagonal Gaussian with the same encoder"""
    num_blocks: int = 6
    """flow blocks"""
    hidden_dim: int = 256
    """width of the flow's coupling networks"""
    rep_dim: int = 64
    """size of the (state, action) encoding that conditions the density"""
    encoder_dim: int = 1024
    """width of the 4-layer (state, action) encoder (paper: 1024)"""
    condition_drop: float = 0.1
    """probability of replacing the condition by zeros in training, so the model also learns the marginal p(g)"""
    goal_noise: float = 0.05
    """std of the Gaussian noise added to training goals (x-y units of the maze)"""
    discount: float = 0.99
    """the goal is the state k >= 1 steps later in the same episode, P(k) proportional to discount^k"""
    learning_rate: float = 1e-4
    """AdamW learning rate of the density model"""
    weight_decay: float = 1e-6
    """AdamW weight decay of the density model"""

    # actor
    actor_dim: int = 1024
    """width of the actor's 4 hidden layers (paper: 1024)"""
    actor_learning_rate: float = 3e-4
    """Adam learning rate of the actor and of the temperature"""
    target_entropy: Optional[float] = None
    """the entropy the temperature is tuned toward (default: -action_dim / 2, as the paper)"""

    # budget
    total_env_steps: int = 1_000_000
    """environment steps, all environments together"""
    learning_starts: int = 10_000
    """environment steps before the first gradient step"""
    updates_per_step: int = 1
    """gradient steps (density, actor, temperature) per vector step of num_envs environment steps"""
    batch_size: int = 256
    """batch size"""
    buffer_size: int = 1_000_000
    """replay buffer capacity in transitions (whole episodes; the oldest are overwritten)"""

    # logging and evaluation
    log_interval: int = 10_000
    """environment steps between training logs"""
    eval_interval: int = 50_000
    """environment steps between evaluations and heat maps (also at 0 and at the end)"""
    eval_episodes: int = 10
    """evaluation episodes per task (5 tasks), run as one batch"""
    eval_max_steps: Optional[int] = None
    """cap on evaluation episode length (default: the environment's; lower only for quick checks)"""
    save_interval: int = 100_000
    """environment steps between checkpoints (also at the end); a checkpoint at an episode boundary (a multiple of
    num_envs x episode length) resumes exactly, one inside an episode starts new episodes"""
    recent_goals: int = 200
    """commanded goals drawn on the heat map (the most recent)"""


# ---------------------------------------------------------------------------------------------- networks


def mlp(sizes, activation, layer_norm: bool) -> nn.Sequential:
    """Linear layers of the given sizes with the activation (then LayerNorm, if asked) between them."""
    layers = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), activation()]
        layers += [nn.LayerNorm(sizes[i + 1])] if layer_norm else []
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


class XYScaled(nn.Module):
    """Holds the maze's x-y centre and half-extent as buffers: x-y coordinates (goals, and the first two
    observation dims) enter the networks in [-1, 1], so a checkpoint works in the environment's units."""

    def __init__(self, geometry: Optional["MazeGeometry"] = None):
        super().__init__()
        self.register_buffer(
            "xy_center", torch.zeros(2) if geometry is None else torch.tensor(geometry.center, dtype=torch.float32)
        )
        self.register_buffer(
            "xy_half", torch.ones(2) if geometry is None else torch.tensor(geometry.half, dtype=torch.float32)
        )

    def scale_xy(self, xy):
        return (xy - self.xy_center) / self.xy_half

    def scale_obs(self, obs):
        return torch.cat([self.scale_xy(obs[:, :2]), obs[:, 2:]], -1)


class Density(XYScaled):
    """What both models of p(g | s, a) share: a (state, action) encoder (4 x encoder_dim, SiLU, LayerNorm) whose
    output is the condition; a zero condition gives the marginal density of reached goals."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args, geometry: Optional["MazeGeometry"] = None):
        super().__init__(geometry)
        self.encoder = mlp([obs_dim + action_dim] + [args.encoder_dim] * 4 + [args.rep_dim], nn.SiLU, layer_norm=True)

    def condition(self, obs, actions):
        return self.encoder(torch.cat([self.scale_obs(obs), actions], -1))


class FlowDensity(Density):
    """log p(g | s, a): a flow over the 2-D goal."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args, geometry: Optional["MazeGeometry"] = None):
        super().__init__(obs_dim, action_dim, args, geometry)
        self.flow = ConditionalFlow(2, args.rep_dim, args.num_blocks, args.hidden_dim)

    def log_prob(self, goals, cond):
        return self.flow.log_prob(self.scale_xy(goals), cond)


class GaussianDensity(Density):
    """A linear head to the mean and log-std (clamped to [-5, 2]) of a diagonal Gaussian over the goal; the zero
    condition leaves the head's bias: one Gaussian over all reached goals."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args, geometry: Optional["MazeGeometry"] = None):
        super().__init__(obs_dim, action_dim, args, geometry)
        self.head = nn.Linear(args.rep_dim, 4)

    def log_prob(self, goals, cond):
        mean, log_std = self.head(cond).chunk(2, -1)
        return torch.distributions.Normal(mean, log_std.clamp(-5, 2).exp()).log_prob(self.scale_xy(goals)).sum(-1)


class Actor(XYScaled):
    """pi(a | s, g): a tanh-Gaussian (4 hidden layers, SiLU, LayerNorm; log-std squashed into [-5, 2])."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args, geometry: Optional["MazeGeometry"] = None):
        super().__init__(geometry)
        self.net = mlp([obs_dim + 2] + [args.actor_dim] * 4 + [2 * action_dim], nn.SiLU, layer_norm=True)

    def forward(self, obs, goals):
        mean, log_std = self.net(torch.cat([self.scale_obs(obs), self.scale_xy(goals)], -1)).chunk(2, -1)
        return mean, -5 + 3.5 * (torch.tanh(log_std) + 1)

    def sample(self, obs, goals):
        """Reparameterised actions in (-1, 1) and their log-density (with the tanh correction)."""
        mean, log_std = self(obs, goals)
        u = mean + log_std.exp() * torch.randn_like(mean)
        actions = torch.tanh(u)
        log_prob = torch.distributions.Normal(mean, log_std.exp()).log_prob(u) - torch.log(1 - actions.square() + 1e-6)
        return actions, log_prob.sum(-1)

    def act(self, obs, goals):
        return torch.tanh(self(obs, goals)[0])


# --------------------------------------------------------------------------------------------- algorithm


def update(batch, *, density, actor, optimizers, log_temperature, condition_drop, goal_noise, target_entropy):
    """One density (critic) step, one actor step and one temperature step on a batch of hindsight goals
    (observations, actions, goals = the x-y of a later state of the same episode). Returns tensors for logging."""
    # density (the critic): NLL of noised future goals; a dropped condition (zeros) learns the marginal p(g)
    cond = density.condition(batch["observations"], batch["actions"])
    keep = (torch.rand(len(cond), 1, device=cond.device) >= condition_drop).float()
    noisy_goals = batch["goals"] + goal_noise * torch.randn_like(batch["goals"])
    density_loss = -density.log_prob(noisy_goals, cond * keep).mean()
    optimizers["density"].zero_grad(set_to_none=True)
    density_loss.backward()
    optimizers["density"].step()

    # actor: maximise log p(g | s, a) of its own reparameterised actions, minus temperature * log pi
    actions, log_prob = actor.sample(batch["observations"], batch["goals"])
    density.requires_grad_(False)  # the actor's gradient flows through the density, not into its weights
    log_occupancy = density.log_prob(batch["goals"], density.condition(batch["observations"], actions))
    density.requires_grad_(True)
    temperature = log_temperature.detach().exp()
    actor_loss = (temperature * log_prob - log_occupancy).mean()
    optimizers["actor"].zero_grad(set_to_none=True)
    actor_loss.backward()
    optimizers["actor"].step()

    # temperature: toward the target entropy
    temperature_loss = -(log_temperature * (log_prob.detach() + target_entropy)).mean()
    optimizers["temperature"].zero_grad(set_to_none=True)
    temperature_loss.backward()
    optimizers["temperature"].step()
    logs = dict(
        density_loss=density_loss, actor_loss=actor_loss, log_occupancy=log_occupancy.mean(), entropy=-log_prob.mean()
    )
    return {k: v.detach() for k, v in logs.items()} | {"temperature": temperature}


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


@torch.no_grad()
def marginal_log_density(density, goals: np.ndarray, rep_dim: int) -> np.ndarray:
    """log p(g) of x-y goals [M, 2]: the density under the dropped (zero) condition."""
    goals = torch.as_tensor(goals, dtype=torch.float32, device=density.xy_center.device)
    return density.log_prob(goals, torch.zeros(len(goals), rep_dim, device=goals.device)).cpu().numpy()


def select_goals(
    strategy: str, candidates: np.ndarray, log_density, oracle_goals: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One goal per environment from candidates [N, C, 2]: the lowest log_density ([M, 2] -> [M]), the first
    (candidates are already uniform draws), or a random evaluation goal."""
    n = len(candidates)
    if strategy == "min-density":
        scores = np.asarray(log_density(candidates.reshape(-1, 2))).reshape(n, -1)
        return candidates[np.arange(n), scores.argmin(1)]
    if strategy == "uniform":
        return candidates[:, 0]
    return oracle_goals[rng.integers(len(oracle_goals), size=n)]


def pick_goals(buffer, density, args: Args, task_goals: np.ndarray, rng: np.random.Generator, sampler) -> np.ndarray:
    """A goal for each environment, chosen by --goal-strategy among --num-candidates states from the buffer."""
    candidates = buffer.sample_states(args.num_envs * args.num_candidates, sampler).reshape(args.num_envs, -1, 2)
    log_density = functools.partial(marginal_log_density, density, rep_dim=args.rep_dim)
    return select_goals(args.goal_strategy, candidates, log_density, task_goals, rng)


# -------------------------------------------------------------------------------------------------- data


class TrajectoryBuffer:
    """Whole episodes, one row each: observations [E, L + 1, obs_dim] and actions [E, L, action_dim], on `device`
    (on a GPU the batches are drawn there: no copy per update). The num_envs episodes that run together fill
    num_envs rows; the oldest rows are overwritten. Draws take a torch.Generator on the same device."""

    def __init__(self, capacity: int, length: int, obs_dim: int, action_dim: int, num_envs: int, device="cpu"):
        rows = capacity // length
        if rows < 2 * num_envs:
            why = f"--buffer-size {capacity} holds {rows} episodes of {length} steps, fewer than 2 x num_envs"
            raise SystemExit(f"{why} = {2 * num_envs} (raise --buffer-size to {2 * num_envs * length})")
        self.observations = torch.zeros((rows, length + 1, obs_dim), device=device)
        self.actions = torch.zeros((rows, length, action_dim), device=device)
        self.lengths = torch.zeros(rows, dtype=torch.int64, device=device)  # transitions stored in each row
        self.episodes = 0  # episodes started so far; row = episode index mod rows
        self.rows = torch.arange(num_envs, device=device)

    def start_episodes(self, obs: np.ndarray):
        self.rows = (self.episodes + torch.arange(len(obs), device=self.lengths.device)) % len(self.lengths)
        self.episodes += len(obs)
        self.lengths[self.rows] = 0
        self.observations[self.rows, 0] = torch.as_tensor(obs, device=self.lengths.device)

    def add(self, actions: torch.Tensor, next_obs: np.ndarray):
        t = self.lengths[self.rows]
        self.actions[self.rows, t] = actions
        self.observations[self.rows, t + 1] = torch.as_tensor(next_obs, device=self.lengths.device)
        self.lengths[self.rows] += 1

    def sample(self, batch_size: int, discount: float, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """(s_t, a_t, g = x-y of s_{t+k}) with t uniform over stored transitions and k in 1..(steps left in the
        episode), P(k) proportional to discount^k: the discounted occupancy of future states."""
        rand = functools.partial(torch.rand, batch_size, generator=generator, device=generator.device)
        rows = torch.multinomial(self.lengths.float(), batch_size, replacement=True, generator=generator)
        length = self.lengths[rows]
        t = torch.minimum((rand() * length).long(), length - 1)
        left = length - t  # future observations t+1 .. length
        u = rand()  # inverse CDF of the geometric truncated to 1..left
        k = 1 + torch.floor(torch.log1p(-u * (1 - discount ** left.float())) / math.log(discount)).long()
        k = torch.minimum(k.clamp(min=1), left)
        goals = self.observations[rows, t + k, :2]
        return {"observations": self.observations[rows, t], "actions": self.actions[rows, t], "goals": goals}

    def sample_states(self, n: int, generator: torch.Generator) -> np.ndarray:
        """x-y of n stored observations, uniformly."""
        started = torch.arange(len(self.lengths), device=self.lengths.device) < self.episodes  # holds a first obs
        counts = torch.where(started, self.lengths + 1, 0)
        rows = torch.multinomial(counts.float(), n, replacement=True, generator=generator)
        rand = torch.rand(n, generator=generator, device=generator.device)
        t = torch.minimum((rand * counts[rows]).long(), counts[rows] - 1)
        return self.observations[rows, t, :2].cpu().numpy()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        used = slice(0, min(self.episodes, len(self.lengths)))
        tensors = {"observations": self.observations, "actions": self.actions, "lengths": self.lengths}
        return {k: v[used].cpu().clone() for k, v in tensors.items()} | {"episodes": self.episodes}

    def load_state_dict(self, state: Dict[str, torch.Tensor]):
        n = len(state["lengths"])
        for name in ("observations", "actions", "lengths"):
            getattr(self, name)[:n] = state[name]
        self.episodes = int(state["episodes"])
        latest = self.episodes - len(self.rows) + torch.arange(len(self.rows), device=self.lengths.device)
        self.rows = latest % len(self.lengths)  # the latest episodes


# ------------------------------------------------------------------------------ environment and evaluation


def make_maze(env_id: str, **kwargs):
    """An OGBench maze env; a clear error when the name is not one."""
    mazes = [k for k in gymnasium.registry if len(k.split("-")) == 3 and k.split("-")[0] in ("pointmaze", "antmaze")]
    if env_id not in mazes:
        close, known = difflib.get_close_matches(env_id, mazes, n=3, cutoff=0.5), ", ".join(sorted(mazes))
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise SystemExit(
            f"unknown maze {env_id!r}: this script runs OGBench's point and ant mazes online ({known}){hint}"
        )
    return gymnasium.make(env_id, **kwargs)


class MazeGeometry:
    """Cells, free cells and the x-y <-> cell maps of an OGBench maze, read from its unwrapped env."""

    def __init__(self, env, bins_per_cell: int = 8):
        u = env.unwrapped
        self.map = np.asarray(u.maze_map)
        self.unit, self.offset = float(u._maze_unit), np.array([u._offset_x, u._offset_y], np.float64)
        self.bins = bins_per_cell
        h, w = self.map.shape
        self.low = -self.offset - self.unit / 2  # x-y of the map's lower-left corner
        self.high = self.low + self.unit * np.array([w, h])
        self.center, self.half = (self.low + self.high) / 2, (self.high - self.low) / 2
        self.task_starts = np.array([u.ij_to_xy(t["init_ij"]) for t in u.task_infos])
        self.task_goals = np.array([u.ij_to_xy(t["goal_ij"]) for t in u.task_infos])
        self.start_ij = tuple(u.task_infos[0]["init_ij"])

    def cells(self, xy: np.ndarray) -> np.ndarray:
        """[..., 2] x-y -> [..., 2] (i, j) cell indices (clipped to the map)."""
        ij = np.floor((xy[..., ::-1] - self.low[::-1]) / self.unit).astype(np.int64)
        return np.clip(ij, 0, np.array(self.map.shape) - 1)

    def fine_bins(self, xy: np.ndarray) -> np.ndarray:
        b = np.floor((xy[..., ::-1] - self.low[::-1]) / self.unit * self.bins).astype(np.int64)
        return np.clip(b, 0, np.array(self.map.shape) * self.bins - 1)


def draw_heatmap(path: str, geometry: MazeGeometry, heat: np.ndarray, recent_goals: np.ndarray, title: str):
    """The maze (walls dark), log visit counts, recently commanded goals (x) and the evaluation goals (stars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extent = [geometry.low[0], geometry.high[0], geometry.low[1], geometry.high[1]]
    fig, ax = plt.subplots(figsize=(5, 5 * geometry.map.shape[0] / geometry.map.shape[1] + 0.4), dpi=100)
    ax.imshow(np.where(geometry.map == 1, 1.0, np.nan), origin="lower", extent=extent, cmap="Greys", vmin=0, vmax=1.2)
    visits = np.where(heat > 0, np.log1p(heat), np.nan)
    image = ax.imshow(visits, origin="lower", extent=extent, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="log(1 + visits)")
    if len(recent_goals):
        ax.scatter(
            recent_goals[:, 0], recent_goals[:, 1], marker="x", s=14, c="red", linewidths=1, label="commanded goals"
        )
    ax.scatter(
        geometry.task_goals[:, 0],
        geometry.task_goals[:, 1],
        marker="*",
        s=160,
        c="orange",
        edgecolors="k",
        label="evaluation goals",
    )
    start = geometry.task_starts[0]
    ax.scatter([start[0]], [start[1]], marker="o", s=80, c="white", edgecolors="k", label="start")
    ax.set_xlim(extent[:2])
    ax.set_ylim(extent[2:])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    return fig


class Visits:
    """Where the agent has been (visit counts per maze cell for the coverage, per fine bin for the heat map) and
    the goals it was most recently sent to (drawn on the heat map)."""

    def __init__(self, geometry: MazeGeometry, recent: int):
        self.geometry, self.recent = geometry, recent
        self.cells = np.zeros(geometry.map.shape, np.int64)
        self.heat = np.zeros(np.array(geometry.map.shape) * geometry.bins, np.int64)
        self.recent_goals = np.zeros((0, 2))

    def add(self, xy: np.ndarray):
        np.add.at(self.cells, tuple(self.geometry.cells(xy).T), 1)
        np.add.at(self.heat, tuple(self.geometry.fine_bins(xy).T), 1)

    def sent(self, goals: np.ndarray) -> np.ndarray:
        if self.recent:
            self.recent_goals = np.concatenate([self.recent_goals, goals])[-self.recent :]
        return goals.astype(np.float32)

    def coverage(self) -> float:
        """The fraction of free maze cells visited."""
        return float((self.cells[self.geometry.map == 0] > 0).mean())

    def state_dict(self) -> Dict[str, torch.Tensor]:
        arrays = {"cell_visits": self.cells, "heat": self.heat, "recent_goals": self.recent_goals}
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]):
        self.cells, self.heat, self.recent_goals = (state[k].numpy() for k in ("cell_visits", "heat", "recent_goals"))


def act_and_record(envs, actor, obs: np.ndarray, goals: np.ndarray, buffer: TrajectoryBuffer, visits: Visits):
    """One step of every env toward its commanded goal with a sample of the actor; the transitions go into the
    buffer, the new positions into the visit counts. Returns the next observations and whether the episodes ended."""
    with torch.no_grad():
        device = actor.xy_center.device
        actions = actor.sample(torch.as_tensor(obs, device=device), torch.as_tensor(goals, device=device))[0]
    obs, _, terminated, truncated, _ = envs.step(actions.cpu().numpy())
    obs = obs.astype(np.float32)
    buffer.add(actions, obs)
    visits.add(obs[:, :2])
    return obs, bool((terminated | truncated).any())


def reset_envs(envs, buffer: TrajectoryBuffer, seed: int, episode_round: int, start_ij, record: bool = True):
    """Start a round of episodes (one per env) in the start cell; the same round always starts from the same states."""
    start = dict(task_info=dict(init_ij=start_ij, goal_ij=start_ij))  # the goal is never used
    np.random.seed(seed * 1_000_003 + episode_round)  # OGBench draws start noise from NumPy's global generator
    obs = envs.reset(seed=seed * 1_000_003 + episode_round, options=start)[0].astype(np.float32)
    if record:
        buffer.start_episodes(obs)
    return obs


@torch.no_grad()
def evaluate(
    actor, envs, geometry: MazeGeometry, args: Args, device, step: int, video_dir: Optional[str]
) -> Dict[str, float]:
    """Success on each of the maze's 5 tasks, args.eval_episodes episodes each, deterministic actions (tanh of
    the mean) toward the task's goal; all episodes run in lockstep with fixed evaluation seeds."""
    actor.eval()
    n, num_tasks = len(envs), len(geometry.task_goals)
    tqdm.write(f"evaluating at environment step {step}: {num_tasks} tasks x {n // num_tasks} episodes ...")
    obs, goals = [], []
    for i, env in enumerate(envs):
        np.random.seed(100_000 + i)  # OGBench draws start noise from NumPy's global generator
        obs.append(env.reset(seed=100_000 + i, options=dict(task_id=i % num_tasks + 1))[0])
        goals.append(np.asarray(env.unwrapped.cur_goal_xy))
    obs, goals = np.array(obs, np.float32), torch.as_tensor(np.array(goals), dtype=torch.float32, device=device)
    active, success, frames = np.ones(n, bool), np.zeros(n), []
    for _ in range(args.eval_max_steps or 10**9):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        actions = actor.act(torch.as_tensor(obs[idx], device=device), goals[idx]).cpu().numpy()
        if video_dir is not None and active[0]:
            frames.append(envs[0].render())
        for a, i in zip(actions, idx):
            ob, _, terminated, truncated, info = envs[i].step(a)
            obs[i] = ob
            success[i] = max(success[i], float(info["success"]))
            if terminated or truncated:
                active[i] = False
    if video_dir is not None:
        save_video(frames, os.path.join(video_dir, f"step{step}.mp4"))
    actor.train()
    per_task = success.reshape(-1, num_tasks).mean(0)  # episode i ran task i % num_tasks + 1
    return {"success": float(success.mean()), **{f"task{t + 1}": float(s) for t, s in enumerate(per_task)}}


def save_video(frames, path: str):
    import imageio.v2 as imageio

    try:
        imageio.mimsave(path, frames, fps=30)
    except Exception:  # no ffmpeg backend: fall back to a GIF
        imageio.mimsave(path[:-4] + ".gif", frames, duration=1 / 30)


def evaluate_and_draw(*, actor, envs, geometry, visits, args: Args, device, log, env_steps: int, updates: int):
    """An evaluation (a row of eval.csv with the coverage) and the heat map of where the agent has been."""
    stats = evaluate(actor, envs, geometry, args, device, env_steps, log.video_dir)
    log.evaluation(env_steps, stats | {"updates": updates, "coverage": visits.coverage()})
    title = f"{args.env_id}, {args.goal_strategy} goals, seed {args.seed}\n{env_steps:,} env steps: coverage "
    title += f"{visits.coverage():.2f}, success {stats['success']:.2f}"
    path = os.path.join(log.writer.log_dir, "heatmaps", f"env_step_{env_steps}.png")
    figure = draw_heatmap(path, geometry, visits.heat, visits.recent_goals, title)
    log.writer.add_figure("explore/heatmap", figure, env_steps)  # closes the figure


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


def save_checkpoint(run_dir: str, step: int, state: dict, args, rng: np.random.Generator, sampler: torch.Generator):
    """checkpoints/step_{step}.pt, written atomically: a plain dict of `state`, the script that wrote it, the
    run's arguments and its RNG states (the training noise's on the CPU and the GPU, the goal choices' and the
    batch sampler's)."""
    rngs = {"torch_rng": torch.get_rng_state(), "numpy_rng": json.dumps(rng.bit_generator.state)}
    rngs["sampler_rng"] = sampler.get_state()
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


def restore_rng(checkpoint: dict, rng: np.random.Generator, sampler: torch.Generator):
    torch.set_rng_state(checkpoint["torch_rng"])
    rng.bit_generator.state = json.loads(checkpoint["numpy_rng"])
    if "cuda_rng" in checkpoint and torch.cuda.is_available():
        torch.cuda.set_rng_state(checkpoint["cuda_rng"])
    try:
        sampler.set_state(checkpoint["sampler_rng"])
    except (KeyError, RuntimeError):  # an earlier version's checkpoint (NumPy drew its batches), or another device's
        sampler.manual_seed(checkpoint["updates"])
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


def resumed_args(args):
    """--resume: (the checkpoint, its path, the run's saved arguments); with --eval-only, this command's evaluation
    flags (--eval-episodes, --eval-max-steps, --capture-video) replace the saved ones. Without --resume: no
    checkpoint and these arguments."""
    if args.resume is None:
        return None, None, args
    checkpoint, path = load_checkpoint(args.resume)
    keep = ("resume", "eval_only") + (("eval_episodes", "eval_max_steps", "capture_video") if args.eval_only else ())
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


def check_args(args: Args):
    names = ("num_envs", "num_candidates", "goal_hold_steps", "total_env_steps", "updates_per_step", "batch_size")
    names += ("buffer_size", "log_interval", "eval_interval", "eval_episodes", "save_interval")
    names += ("max_episode_steps", "eval_max_steps", "learning_rate", "actor_learning_rate", "num_blocks")
    names += ("hidden_dim", "rep_dim", "encoder_dim", "actor_dim")
    problems = common_problems(args, names)
    if args.num_envs > 0 and args.total_env_steps % args.num_envs:
        fix = args.total_env_steps // args.num_envs * args.num_envs or args.num_envs
        problems.append(f"--total-env-steps counts all {args.num_envs} envs together: use a multiple, e.g. {fix}")
    if not 0 < args.discount < 1:
        problems.append("--discount must lie in (0, 1)")
    if not 0 <= args.condition_drop < 1:
        problems.append("--condition-drop must lie in [0, 1)")
    if args.goal_noise < 0 or args.learning_starts < 0 or args.recent_goals < 0:
        problems.append("--goal-noise, --learning-starts and --recent-goals must be >= 0")
    if args.goal_strategy == "min-density" and args.condition_drop == 0:
        problems.append("--goal-strategy min-density reads the marginal density, learnt only with --condition-drop > 0")
    if problems:
        raise SystemExit("; ".join(problems))


def make_envs(args: Args):
    """The training vector env (episodes never end at a goal: they are reward-free and last max_episode_steps),
    the evaluation envs (5 tasks x eval_episodes), the maze's geometry and the training episodes' length."""
    probe = make_maze(args.env_id, terminate_at_goal=False, max_episode_steps=args.max_episode_steps)
    if not np.allclose(probe.action_space.low, -1) or not np.allclose(probe.action_space.high, 1):
        raise SystemExit(f"{args.env_id}: the action space is {probe.action_space}; the tanh actor needs [-1, 1]")
    length = probe.spec.max_episode_steps
    make = functools.partial(make_maze, args.env_id, terminate_at_goal=False, max_episode_steps=length)
    envs = gymnasium.vector.SyncVectorEnv([make for _ in range(args.num_envs)])
    render = dict(render_mode="rgb_array", width=200, height=200) if args.capture_video else {}
    eval_envs = [make_maze(args.env_id, **render) for _ in range(5 * args.eval_episodes)]
    return envs, eval_envs, MazeGeometry(probe), length


def crossed(env_steps: int, num_envs: int, interval: int) -> bool:
    """Did the last vector step (num_envs environment steps) cross a multiple of interval?"""
    return env_steps // interval > (env_steps - num_envs) // interval


# -------------------------------------------------------------------------------------------------- main


def main(args: Args):
    checkpoint, path, args = resumed_args(args)
    check_args(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)  # the goal choices (host side)
    sampler = torch.Generator(device).manual_seed(args.seed)  # the batches and goal candidates, drawn on the device

    envs, eval_envs, geometry, length = make_envs(args)
    obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]

    actor = Actor(obs_dim, action_dim, args, geometry).to(device)
    density = (FlowDensity if args.density == "flow" else GaussianDensity)(obs_dim, action_dim, args, geometry)
    density = density.to(device)
    if args.compile:  # in place: parameters and state_dict keys are unchanged
        for module in (actor.net, density.encoder) + ((density.flow,) if args.density == "flow" else ()):
            module.compile()
    log_temperature = torch.zeros((), device=device, requires_grad=True)
    adam = functools.partial(torch.optim.Adam, lr=args.actor_learning_rate, fused=True)  # fused: one kernel for all
    adamw = torch.optim.AdamW(density.parameters(), args.learning_rate, weight_decay=args.weight_decay, fused=True)
    optimizers = {"actor": adam(actor.parameters()), "density": adamw, "temperature": adam([log_temperature])}
    parts = {"actor": actor, "density": density} | {f"{k}_optimizer": v for k, v in optimizers.items()}
    settings = dict(log_temperature=log_temperature, condition_drop=args.condition_drop, goal_noise=args.goal_noise)
    settings["target_entropy"] = -0.5 * action_dim if args.target_entropy is None else args.target_entropy
    buffer = TrajectoryBuffer(args.buffer_size, length, obs_dim, action_dim, args.num_envs, device)
    visits = Visits(geometry, args.recent_goals)
    env_steps = updates = 0
    if checkpoint is not None:
        for key, part in parts.items():
            part.load_state_dict(checkpoint[key])
        with torch.no_grad():
            log_temperature.copy_(checkpoint["log_temperature"])
        buffer.load_state_dict(checkpoint["buffer"])
        visits.load_state_dict(checkpoint)
        restore_rng(checkpoint, rng, sampler)
        env_steps, updates = checkpoint["env_steps"], checkpoint["updates"]
    graphed = args.compile and device.type == "cuda"  # the whole update as one CUDA graph, captured at its first batch
    for group in (g for o in optimizers.values() for g in o.param_groups):
        group["capturable"] = graphed  # (after loading: a checkpoint brings its own setting)
    train_step = functools.partial(update, density=density, actor=actor, optimizers=optimizers, **settings)

    if args.eval_only:  # no training: evaluate the checkpoint and write the result beside its run
        evaluate_at = functools.partial(evaluate, actor, eval_envs, geometry, args, device)
        return evaluate_only(path, env_steps, evaluate_at, args), actor

    run_dir = run_directory(args, path)
    tasks = [f"task{t + 1}" for t in range(len(geometry.task_goals))]
    log = RunLog(run_dir, args, ["env_steps", "wall_time", "updates", "success", "coverage"] + tasks, env_steps)
    os.makedirs(os.path.join(run_dir, "heatmaps"), exist_ok=True)
    size = f"{sum(p.numel() for p in density.parameters()):,} + {sum(p.numel() for p in actor.parameters()):,} actor"
    where = f"resumed {run_dir} at environment step {env_steps}" if env_steps else f"writing to {run_dir}"
    print(f"{args.density} density, {size} parameters, {args.num_envs} x {args.env_id}, device {device}; {where}")
    evaluation = dict(actor=actor, envs=eval_envs, geometry=geometry, visits=visits, args=args, device=device, log=log)
    next_goals = functools.partial(pick_goals, buffer, density, args, geometry.task_goals, rng, sampler)

    if checkpoint is not None and checkpoint["episode_step"] == 0:  # saved right after a reset: redo it, exactly
        obs = reset_envs(envs, buffer, args.seed, buffer.episodes // args.num_envs - 1, geometry.start_ij, record=False)
        goals, held, episode_step = checkpoint["goals"].numpy(), checkpoint["held"], 0
    else:  # a fresh run, or a checkpoint inside an episode, whose env state is not saved: new episodes
        obs = reset_envs(envs, buffer, args.seed, buffer.episodes // args.num_envs, geometry.start_ij)
        goals, held, episode_step = visits.sent(next_goals()), 0, 0
    if env_steps == 0:
        evaluate_and_draw(env_steps=0, updates=0, **evaluation)
    first_bad, logs = torch.tensor(-1, device=device), {}  # the first update with a non-finite loss
    progress = tqdm(total=args.total_env_steps, initial=env_steps, unit="env step", smoothing=0.05)
    with StopSignals() as stop, progress:
        while env_steps < args.total_env_steps:
            obs, done = act_and_record(envs, actor, obs, goals, buffer, visits)
            env_steps, held, episode_step = env_steps + args.num_envs, held + 1, episode_step + 1
            progress.update(args.num_envs)
            if done:  # the envs run in lockstep: all episodes end together
                obs = reset_envs(envs, buffer, args.seed, buffer.episodes // args.num_envs, geometry.start_ij)
                goals, held, episode_step = visits.sent(next_goals()), 0, 0
            elif held == args.goal_hold_steps:
                goals, held = visits.sent(next_goals()), 0

            for _ in range(args.updates_per_step if env_steps >= args.learning_starts else 0):
                batch = buffer.sample(args.batch_size, args.discount, sampler)
                if graphed and isinstance(train_step, functools.partial):  # the first update: capture it
                    train_step = cuda_graphed(train_step, batch, [density, actor, log_temperature], optimizers.values())
                logs = train_step(batch)
                updates += 1
                first_bad = non_finite_step(first_bad, updates, logs)

            last = env_steps >= args.total_env_steps
            intervals = (args.log_interval, args.eval_interval, args.save_interval)
            log_now, eval_now, save_now = (crossed(env_steps, args.num_envs, n) or last for n in intervals)
            save_now = save_now or stop.caught is not None  # SIGTERM, SIGUSR1 or Ctrl-C: save, then stop
            if (log_now or eval_now or save_now) and (bad := first_bad.item()) >= 0:  # before it logs, evaluates, saves
                where = f"gradient step {bad} (before environment step {env_steps})"
                raise SystemExit(f"non-finite training loss at {where}; stopping (try a lower --learning-rate)")
            if log_now:
                log.scalars(env_steps, logs | {"coverage": visits.coverage()})
            if eval_now:
                evaluate_and_draw(env_steps=env_steps, updates=updates, **evaluation)
            if save_now:
                state = {k: v.state_dict() for k, v in parts.items()} | visits.state_dict()
                state |= dict(buffer=buffer.state_dict(), log_temperature=log_temperature.detach())
                state |= dict(goals=torch.from_numpy(goals), held=held, episode_step=episode_step)
                state |= dict(env_steps=env_steps, updates=updates)
                save_checkpoint(run_dir, env_steps, state, args, rng, sampler)
            if stop.caught is not None:  # a checkpoint inside an episode resumes with new episodes
                log.close(stopped_by=f"{stop.caught} at environment step {env_steps}")
                raise SystemExit(1)
    envs.close()
    log.close()
    return run_dir, actor


if __name__ == "__main__":
    main(tyro.cli(Args))
