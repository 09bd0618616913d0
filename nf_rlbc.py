"""NF-RLBC: offline RL with a normalizing-flow actor (SAC+BC / TD3+BC recipe) on OGBench singletask or Minari data.

"Normalizing Flows are Capable Models for RL" (Ghugare & Eysenbach, 2025): an ensemble of two critics learns
Q(s, a) by TD with a Polyak-averaged target and target actions sampled from the current actor; the actor is a
flow a = f(z; s), z ~ N(0, I), trained through its reparameterised samples to maximise min_i Q(s, a) while an
exact behaviour-cloning term alpha * NLL(a_data | s) keeps it near the data (plus an optional entropy term
with the flow's exact log-density). `--policy gaussian` is the same recipe with a Gaussian actor (state-
dependent mean and std, its own exact NLL), so the comparison changes one thing only. `--policy fql` swaps in
flow Q-learning's actor (a flow-matching BC policy and a one-step policy distilled from it that climbs Q) with
the same critics, target and batches.

    python make_dataset.py cube-single-play-v0 --num-transitions 100_000 --dataset-dir data
    python nf_rlbc.py --env-id cube-single-play-singletask-task1-v0 --dataset-dir data --online-steps 100_000

One loop runs both phases on one step axis: steps 1..total_steps are offline gradient steps, the online_steps
after them each take one environment step, then one update (SAC with the actor's exact log-density and a
tuned temperature). A run writes {output_dir}/{env_id}__{exp_name}__{seed}__{unixtime}/: args.json,
TensorBoard events, eval.csv (success rate where the task defines it, mean return, normalised score where
defined, else nan), checkpoints/ (networks, optimisers, the online transitions, RNG states) and videos/.
"""

import csv
import dataclasses
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
    """seed of the run (data order, initialisation, training noise)"""
    cuda: bool = True
    """use CUDA when it is available"""
    compile: bool = False
    """torch.compile the training step's networks; on a GPU also capture the offline step as a CUDA graph"""
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
    finetune_from: Optional[str] = None
    """a finished offline run (directory or checkpoint): a new run that starts the online phase from its actor and
    critics, skipping the offline steps (give the same architecture flags; --total-steps is taken from it)"""

    # data
    source: Literal["ogbench", "minari"] = "ogbench"
    """where the transitions come from (see env_id)"""
    env_id: str = "cube-single-play-singletask-task1-v0"
    """ogbench: a singletask dataset (rewards from its task); minari: a local dataset id (mujoco/hopper/expert-v0)"""
    dataset_dir: str = "~/.ogbench/data"
    """directory of the OGBench files (Minari keeps its own: $MINARI_DATASETS_PATH or ~/.minari/datasets)"""
    make_dataset: bool = False
    """OGBench data missing and not downloadable: make it with the make_dataset.py beside this script (minutes)"""

    # agent
    policy: Literal["flow", "gaussian", "fql"] = "flow"
    """the actor: the paper's flow, a Gaussian with the same encoder, or flow Q-learning's one-step policy (FQL)"""
    num_blocks: int = 6
    """flow blocks"""
    hidden_dim: int = 256
    """width of the flow's coupling networks"""
    rep_dim: int = 64
    """size of the state encoding that conditions the actor"""
    encoder_dim: int = 512
    """width of the actor's 4-layer state encoder (paper: 512); FQL: of its two 4-layer MLPs (FQL: 512)"""
    critic_dim: int = 512
    """width of each of the two 4-layer critics (paper: 512)"""
    alpha: float = 10.0
    """weight of the behaviour-cloning NLL in the actor loss (paper: 10 on cube/scene/puzzle, 1 on mazes); FQL: of
    its distillation loss (FQL's code: 300 on cube and scene, 1000 on puzzle, 10 on the ant mazes)"""
    flow_steps: int = 10
    """FQL: Euler steps of the BC flow whose actions the one-step policy distils"""
    normalize_q_loss: bool = False
    """FQL: divide its Q loss by the batch's mean |Q| (no gradient), so alpha does not depend on the Q scale"""
    entropy_weight: float = 0.0
    """weight of the actor's log-density of its own samples in the actor loss (an entropy bonus; paper: 0)"""
    discount: float = 0.995
    """discount factor"""
    tau: float = 0.005
    """Polyak rate of the target critic"""
    q_agg: Literal["min", "mean"] = "min"
    """how the two target critics are combined in the TD target"""

    # optimisation
    total_steps: int = 1_000_000
    """offline gradient steps (critic and actor each step)"""
    batch_size: int = 256
    """batch size"""
    learning_rate: float = 1e-4
    """Adam learning rate of actor and critic"""

    # online fine-tuning (after the offline steps)
    online_steps: int = 0
    """environment steps of online MaxEnt fine-tuning after the offline phase, one update per step (0: none)"""
    online_bc: Optional[Literal["anneal", "keep", "off"]] = None
    """the BC term online (flow, Gaussian: on the dataset's rows of each batch): alpha decayed linearly to 0, kept,
    or dropped (default: anneal; FQL: keep, as in its offline-to-online runs)"""
    online_ratio: float = 0.5
    """online: the share of each batch drawn from the online transitions (RLPD's symmetric sampling; the offline
    data would otherwise swamp them); 0: uniform over everything stored"""
    target_entropy: Optional[float] = None
    """online: the entropy the temperature is tuned toward (default: -action_dim)"""
    initial_temperature: float = 0.01
    """online: the starting entropy temperature (then tuned automatically)"""

    # logging and evaluation
    log_interval: int = 1_000
    """steps between training logs, counted within each phase"""
    eval_interval: int = 100_000
    """steps between evaluations, counted within each phase (also at 0 and at the end of each phase)"""
    eval_episodes: int = 50
    """evaluation episodes"""
    eval_envs: int = 5
    """environments the evaluation episodes take turns on, the actor batched over them (each holds ~150 MB on cube)"""
    eval_workers: int = 0
    """processes that step the evaluation envs in parallel (0: this process steps them)"""
    eval_max_steps: Optional[int] = None
    """cap on evaluation episode length (default: the environment's; lower only for quick checks)"""
    save_interval: int = 100_000
    """steps between checkpoints, counted within each phase (also at the end of each phase)"""


# ---------------------------------------------------------------------------------------------- networks


def mlp(sizes, activation, layer_norm: bool) -> nn.Sequential:
    """Linear layers of the given sizes with the activation (then LayerNorm, if asked) between them."""
    layers = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), activation()]
        layers += [nn.LayerNorm(sizes[i + 1])] if layer_norm else []
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


class Critic(nn.Module):
    """An ensemble of two Q(s, a) MLPs (4 x width, GELU, LayerNorm) run as one batched network: each layer stacks
    both members' weights ([2, in, out]) and applies them in one batched matmul. Returns [2, B]."""

    def __init__(self, obs_dim: int, action_dim: int, width: int = 512):
        super().__init__()
        members = [mlp([obs_dim + action_dim] + [width] * 4 + [1], nn.GELU, layer_norm=True) for _ in range(2)]

        def stacked(index: int, name: str, transpose=False):  # one layer's tensor of both members, [2, ..., out]
            tensors = [getattr(m[index], name) for m in members]
            return nn.Parameter(torch.stack([t.T if transpose else t[None] for t in tensors]).detach().contiguous())

        linears, norms = range(0, len(members[0]), 3), range(2, len(members[0]), 3)  # Linear, GELU, LayerNorm, ...
        self.weights = nn.ParameterList([stacked(i, "weight", transpose=True) for i in linears])
        self.biases = nn.ParameterList([stacked(i, "bias") for i in linears])
        self.norm_weights = nn.ParameterList([stacked(i, "weight") for i in norms])
        self.norm_biases = nn.ParameterList([stacked(i, "bias") for i in norms])

    def forward(self, obs, actions):
        x = torch.cat([obs, actions], -1).expand(2, -1, -1)
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(bias, x, weight)
            if i < len(self.norm_weights):
                x = nn.functional.layer_norm(nn.functional.gelu(x), x.shape[-1:])
                x = torch.addcmul(self.norm_biases[i], x, self.norm_weights[i])  # each member's LayerNorm affine
        return x.squeeze(-1)


class Actor(nn.Module):
    """What the three actors share: the action box as buffers (the actors work in [-1, 1]; act() returns actions in
    the environment's units) and the verbs the update and the evaluation call: `sample` (actions for the TD target
    and the online phase, with their log-density), `loss` (the actor's loss on a batch, given the critic) and
    `act` (evaluation). Here the SAC+BC loss of the actors with an exact log-density (flow, Gaussian)."""

    exact_density = True  # the MaxEnt terms (entropy bonus, online temperature) need the log-density of samples

    def __init__(self, action_dim: int):
        super().__init__()
        self.register_buffer("action_low", -torch.ones(action_dim))
        self.register_buffer("action_high", torch.ones(action_dim))

    @torch.no_grad()
    def set_box(self, low: np.ndarray, high: np.ndarray):
        self.action_low.copy_(torch.as_tensor(low))
        self.action_high.copy_(torch.as_tensor(high))

    def to_env_units(self, actions):
        return self.action_low + (actions.clamp(-1, 1) + 1) / 2 * (self.action_high - self.action_low)

    def loss(self, batch, critic, *, bc_weight: float, entropy_weight):
        """-min_i Q(s, a ~ pi) through reparameterised samples + bc_weight * NLL of the dataset's actions (on the
        dataset's rows only: online rows are the agent's own actions) + entropy_weight * log pi(a | s)."""
        actions, log_prob, data_log_prob = self.sample_and_score(batch["observations"], batch["actions"])
        q_pi = critic(batch["observations"], actions.clamp(-1, 1)).min(0).values
        offline = batch["offline"]
        bc_nll = -(data_log_prob * offline).sum() / offline.sum().clamp(min=1)
        loss = -q_pi.mean() + bc_weight * bc_nll + entropy_weight * log_prob.mean()
        outside = (actions.abs() > 1).float().mean()  # clipped: the critic's gradient no longer reaches them
        return loss, dict(bc_nll=bc_nll, q_pi=q_pi.mean(), log_prob=log_prob.mean(), outside_box=outside)


class FlowActor(Actor):
    """a = f(z; s), z ~ N(0, I), the flow conditioned on a state encoder (4 x encoder_dim, SiLU, LayerNorm):
    reparameterised samples with their exact log-density, and exact NLL of data."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__(action_dim)
        self.encoder = mlp([obs_dim] + [args.encoder_dim] * 4 + [args.rep_dim], nn.SiLU, layer_norm=True)
        self.flow = ConditionalFlow(action_dim, args.rep_dim, args.num_blocks, args.hidden_dim)

    def sample(self, obs):
        return self.flow.sample_with_log_prob(self.encoder(obs))

    def sample_and_score(self, obs, data_actions):
        """Reparameterised samples, their log-density and the log-density of data actions: one encoder pass."""
        cond = self.encoder(obs)
        actions, log_prob = self.flow.sample_with_log_prob(cond)
        return actions, log_prob, self.flow.log_prob(data_actions, cond)

    def act(self, obs, randn):
        """Actions [B, a] in env units for obs [B, o]; randn(*shape) draws standard normals [B, *shape] (in
        evaluation one stream per episode, see episode_noise)."""
        return self.to_env_units(self.flow.sample(self.encoder(obs), randn(self.flow.dim)))


class GaussianActor(Actor):
    """The flow actor's state encoder, then a linear head to a mean and a state-dependent log-std (clamped to
    [-5, 2]); evaluated at its mean."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__(action_dim)
        self.encoder = mlp([obs_dim] + [args.encoder_dim] * 4 + [args.rep_dim], nn.SiLU, layer_norm=True)
        self.head = nn.Linear(args.rep_dim, 2 * action_dim)

    def distribution(self, obs):
        mean, log_std = self.head(self.encoder(obs)).chunk(2, -1)
        return torch.distributions.Normal(mean, log_std.clamp(-5, 2).exp())

    def sample(self, obs):
        dist = self.distribution(obs)
        actions = dist.rsample()
        return actions, dist.log_prob(actions).sum(-1)

    def sample_and_score(self, obs, data_actions):
        dist = self.distribution(obs)
        actions = dist.rsample()
        return actions, dist.log_prob(actions).sum(-1), dist.log_prob(data_actions).sum(-1)

    def act(self, obs, randn):
        return self.to_env_units(self.distribution(obs).mean)


class FQLActor(Actor):
    """Flow Q-learning (Park, Li & Levine, 2025) as its public code defines it: a BC flow, the velocity field
    v(s, a_t, t) of flow matching on the data's actions, and a one-step policy mu(s, z), both MLPs 4 x encoder_dim
    (GELU, no LayerNorm). mu stays near the BC flow's --flow-steps Euler solution from the same z (alpha times the
    squared distance) while it climbs the critics' mean Q; mu alone acts and gives the TD target's actions. It has
    no log-density, so no MaxEnt terms: online it goes on with the same losses on the growing buffer."""

    exact_density = False

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__(action_dim)
        self.velocity = mlp([obs_dim + action_dim + 1] + [args.encoder_dim] * 4 + [action_dim], nn.GELU, False)
        self.one_step = mlp([obs_dim + action_dim] + [args.encoder_dim] * 4 + [action_dim], nn.GELU, False)
        self.action_dim, self.flow_steps, self.normalize_q_loss = action_dim, args.flow_steps, args.normalize_q_loss

    def sample(self, obs):
        z = torch.randn(len(obs), self.action_dim, device=obs.device)
        return self.one_step(torch.cat([obs, z], -1)).clamp(-1, 1), torch.zeros(len(obs), device=obs.device)

    @torch.no_grad()
    def bc_flow_actions(self, obs, z):
        """The BC flow's Euler solution from z, clipped to the box: the one-step policy's target."""
        for i in range(self.flow_steps):
            t = torch.full((len(obs), 1), i / self.flow_steps, device=obs.device)
            z = z + self.velocity(torch.cat([obs, z, t], -1)) / self.flow_steps
        return z.clamp(-1, 1)

    def loss(self, batch, critic, *, bc_weight: float, entropy_weight=0.0):
        """BC flow matching + bc_weight (alpha) * distillation - the critics' mean Q (optionally divided by its
        batch mean |Q|, without gradient: FQL's --normalize-q-loss)."""
        obs, actions = batch["observations"], batch["actions"]
        # BC flow: the velocity of a_t = (1 - t) x0 + t a, on every row of the batch (FQL clones its whole buffer)
        x0, t = torch.randn_like(actions), torch.rand(len(actions), 1, device=actions.device)
        velocity = self.velocity(torch.cat([obs, (1 - t) * x0 + t * actions, t], -1))
        bc_flow_loss = (velocity - (actions - x0)).square().mean()
        # one-step policy: the BC flow's action from the same z, and a high Q
        z = torch.randn_like(actions)
        pi = self.one_step(torch.cat([obs, z], -1))
        distill_loss = (pi - self.bc_flow_actions(obs, z)).square().mean()
        q = critic(obs, pi.clamp(-1, 1)).mean(0)
        q_loss = -q.mean() / (q.abs().mean().detach() if self.normalize_q_loss else 1.0)
        loss = bc_flow_loss + bc_weight * distill_loss + q_loss
        outside = (pi.abs() > 1).float().mean()
        return loss, dict(bc_flow_loss=bc_flow_loss, distill_loss=distill_loss, q_pi=q.mean(), outside_box=outside)

    def act(self, obs, randn):
        return self.to_env_units(self.one_step(torch.cat([obs, randn(self.action_dim)], -1)))


ACTORS = {"flow": FlowActor, "gaussian": GaussianActor, "fql": FQLActor}


# --------------------------------------------------------------------------------------------- algorithm


def td_target(actor, target_critic, batch, *, discount: float, q_agg: str, temperature=0.0) -> torch.Tensor:
    """r + discount * mask * (agg_i Q_target_i(s', a') - temperature * log pi(a' | s')), a' ~ actor(s') clipped
    to the action box. Offline the temperature is 0 (the paper's target); online it is SAC's soft target."""
    with torch.no_grad():
        next_actions, next_log_prob = actor.sample(batch["next_observations"])
        next_q = target_critic(batch["next_observations"], next_actions.clamp(-1, 1))
        next_q = next_q.min(0).values if q_agg == "min" else next_q.mean(0)
        return batch["rewards"] + discount * batch["masks"] * (next_q - temperature * next_log_prob)


def update(
    batch,
    *,
    actor,
    critic,
    target_critic,
    optimizers,
    log_temperature,
    online: bool,
    bc_weight: float,
    entropy_weight: float,
    target_entropy: float,
    discount: float,
    tau: float,
    q_agg: str,
):
    """One step on a batch: critic, actor, (online, actors with a log-density) temperature, target critic.
    Offline the TD target is the paper's (no entropy) and the actor's entropy term has `entropy_weight`; online
    both use the tuned temperature (the MaxEnt phase), except for FQL, which has no log-density. Returns the
    logged values as tensors (not read here, so no host sync)."""
    maxent = online and actor.exact_density
    temperature = log_temperature.detach().exp() if maxent else 0.0
    # critic: TD toward the target critic's value of the actor's next action
    q = critic(batch["observations"], batch["actions"])
    td_error = q - td_target(actor, target_critic, batch, discount=discount, q_agg=q_agg, temperature=temperature)
    critic_loss = td_error.square().mean()
    optimizers["critic"].zero_grad(set_to_none=True)
    critic_loss.backward()
    optimizers["critic"].step()

    # actor: its own loss (SAC+BC or FQL's), its gradient through the critic but not into the critic's weights
    critic.requires_grad_(False)
    actor_loss, logs = actor.loss(
        batch, critic, bc_weight=bc_weight, entropy_weight=temperature if maxent else entropy_weight
    )
    critic.requires_grad_(True)
    optimizers["actor"].zero_grad(set_to_none=True)
    actor_loss.backward()
    optimizers["actor"].step()

    # temperature (MaxEnt phase): toward the target entropy, on the log-density of the batch the actor trained on
    if maxent:
        temperature_loss = -log_temperature * (logs["log_prob"].detach() + target_entropy)
        optimizers["temperature"].zero_grad(set_to_none=True)
        temperature_loss.backward()
        optimizers["temperature"].step()

    # target critic: Polyak averaging
    with torch.no_grad():
        torch._foreach_lerp_(list(target_critic.parameters()), list(critic.parameters()), tau)
    logs = dict(critic_loss=critic_loss, actor_loss=actor_loss, q_mean=q.mean()) | logs
    return {k: v.detach() for k, v in logs.items()}


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


def bc_weight_at(step: int, args: Args) -> float:
    """The BC weight: alpha offline; online annealed linearly to 0 over the online steps, kept, or dropped."""
    if step <= args.total_steps:
        return args.alpha
    progress = (step - args.total_steps) / args.online_steps
    mode = args.online_bc or ("keep" if args.policy == "fql" else "anneal")
    return {"anneal": args.alpha * (1 - progress), "keep": args.alpha, "off": 0.0}[mode]


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


class ReplayBuffer:
    """(s, a, r, mask, s') on `device`: the offline transitions, then room for `capacity` online ones. A batch
    takes `online_ratio` of its rows from the online part (once it has any), the rest from the offline part;
    its `offline` column marks the dataset's rows."""

    KEYS = ("observations", "actions", "rewards", "masks", "next_observations")

    def __init__(self, data: Dict[str, np.ndarray], device: torch.device, capacity: int):
        offline = {k: torch.as_tensor(np.asarray(data[k]), dtype=torch.float32, device=device) for k in self.KEYS}
        self.size = self.offline_size = len(offline["rewards"])
        if any(len(v) != self.size for v in offline.values()):
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in offline.items())
            raise SystemExit(f"dataset: {shapes} differ in length")
        self.data = {k: torch.cat([v, v.new_zeros((capacity,) + v.shape[1:])]) for k, v in offline.items()}

    def sample(self, batch_size: int, generator: torch.Generator, online_ratio: float = 0.0) -> Dict[str, torch.Tensor]:
        """A batch drawn on the buffer's device by `generator` (no copy from the host per batch)."""
        draw = functools.partial(torch.randint, generator=generator, device=self.data["rewards"].device)
        if online_ratio > 0 and self.size > self.offline_size:
            num_online = round(batch_size * online_ratio)
            offline = draw(self.offline_size, (batch_size - num_online,))
            idx = torch.cat([offline, draw(self.offline_size, self.size, (num_online,))])
        else:
            idx = draw(self.size, (batch_size,))
        return dict({k: v[idx] for k, v in self.data.items()}, offline=(idx < self.offline_size).float())

    def add(self, **transition):
        for k, v in transition.items():
            self.data[k][self.size] = torch.as_tensor(v, dtype=torch.float32)
        self.size += 1

    def online_part(self) -> Dict[str, torch.Tensor]:
        return {k: v[self.offline_size : self.size].cpu() for k, v in self.data.items()}

    def load_online_part(self, part: Dict[str, torch.Tensor]):
        for key, value in part.items():
            self.data[key][self.offline_size : self.offline_size + len(value)] = value.to(self.data[key].device)
        self.size = self.offline_size + len(part["rewards"])


class OnlineEnv:
    """The online phase's environment: each step acts with a sample of the actor, stores the transition in the
    replay buffer and returns the episode's return and success when it ends."""

    def __init__(self, env, obs_space, seed: int, device: torch.device):
        self.env, self.obs_space, self.device = env, obs_space, device
        self.ob = flatten_observation(obs_space, seeded_reset(env, seed)[0])  # a resume starts a new episode
        self.episode_return, self.episode_success = 0.0, 0.0

    def step(self, actor, replay: ReplayBuffer) -> Optional[Dict[str, float]]:
        with torch.no_grad():
            action = actor.sample(torch.as_tensor(self.ob[None], dtype=torch.float32, device=self.device))[0][0]
            action = action.clamp(-1, 1)
        next_ob, reward, terminated, truncated, info = self.env.step(actor.to_env_units(action).cpu().numpy())
        next_ob = flatten_observation(self.obs_space, next_ob)
        replay.add(
            observations=self.ob, actions=action, rewards=reward, masks=1.0 - terminated, next_observations=next_ob
        )
        self.ob, self.episode_return = next_ob, self.episode_return + reward
        self.episode_success = max(self.episode_success, float(info.get("success", 0.0)))
        if not (terminated or truncated):
            return None
        episode = {"episode_return": self.episode_return, "episode_success": self.episode_success}
        self.ob, self.episode_return, self.episode_success = (
            flatten_observation(self.obs_space, self.env.reset()[0]),
            0.0,
            0.0,
        )
        return episode


def action_box(env_id: str, space) -> tuple:
    """The bounds of the environment's action box, which the actors' [-1, 1] is scaled to."""
    if not isinstance(space, gymnasium.spaces.Box) or not (
        np.isfinite(space.low).all() and np.isfinite(space.high).all()
    ):
        raise SystemExit(f"{env_id}: the action space is {space}; the actors need a bounded Box")
    return space.low.astype(np.float32), space.high.astype(np.float32)


def scale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Actions from [low, high] to [-1, 1], the box the policies act in."""
    return np.clip(2 * (actions - low) / (high - low) - 1, -1, 1).astype(np.float32)


def load_task(args: Args):
    """The transitions, a function that makes one evaluation env, the observation and action spaces and the
    normalised score."""
    render = dict(render_mode="rgb_array", width=200, height=200) if args.capture_video else {}
    if args.source == "ogbench":
        env, train, _ = load_ogbench(args.env_id, args.dataset_dir, True, args.make_dataset)
        make_env = functools.partial(ogbench.make_env_and_datasets, args.env_id, env_only=True, **render)
        return train, make_env, env.observation_space, env.action_space, None
    dataset, train, _ = load_minari(args.env_id, val_every=0)
    space, fix = dataset.action_space, f"download it again: minari download {args.env_id}"
    check_data(train, f"Minari dataset {args.env_id}", fix, (space.low, space.high), None)
    score = None
    if None not in (dataset.storage.metadata.get("ref_min_score"), dataset.storage.metadata.get("ref_max_score")):
        import minari

        score = lambda returns: minari.get_normalized_score(dataset, np.asarray(returns))  # noqa: E731

    def make_minari_env():
        try:
            return dataset.recover_environment(eval_env=True, **render)
        except Exception as err:  # the package that registers the environment is missing, ...
            install = "D4RL/* datasets: pip install gymnasium-robotics; mujoco/*: pip install mujoco"
            why = f"could not make the evaluation environment of {args.env_id} ({type(err).__name__}: {err})"
            raise SystemExit(f"{why}; install the package that provides it ({install})")

    return train, make_minari_env, dataset.observation_space, dataset.action_space, score


# -------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    actor, envs, obs_space, args: Args, device, step: int, video_dir: Optional[str], score_fn
) -> Dict[str, float]:
    """Success rate (where the env reports success), mean return and normalised score (where defined) over
    --eval-episodes episodes with fixed seeds on the pool of `envs`, the actor batched over the running ones."""
    actor.eval()
    tqdm.write(f"evaluating at step {step}: {args.eval_episodes} episodes ...")
    seeds = [100_000 + i for i in range(args.eval_episodes)]  # the same for every run and step
    noise = [torch.Generator().manual_seed(args.seed * 1_000_003 + step + 7_919 * s) for s in seeds]
    frames = [] if video_dir is not None else None

    def start(reset, episode):
        return reset(seeds[episode])[0]

    def act(episodes, obs):
        obs = np.array([flatten_observation(obs_space, o) for o in obs])
        obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
        return actor.act(obs, episode_noise([noise[e] for e in episodes], device)).cpu().numpy()

    returns, success, _ = run_episodes(envs, args.eval_episodes, start, act, args.eval_max_steps, frames)
    if video_dir is not None:
        save_video(frames, os.path.join(video_dir, f"step{step}.mp4"))
    actor.train()
    return {
        "success": float(np.nan_to_num(success).mean()) if not np.isnan(success).all() else math.nan,
        "return": float(returns.mean()),
        "score": float(np.mean(score_fn(returns))) if score_fn is not None else math.nan,
    }


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


ARCHITECTURE = ("source", "env_id", "policy", "num_blocks", "hidden_dim", "rep_dim", "encoder_dim", "critic_dim")


def read_checkpoint(args: Args):
    """(checkpoint or None, its path, the run's arguments): --resume continues a run with its saved arguments;
    --finetune-from starts a new run from an offline run's networks with this command's online settings."""
    if args.resume is not None and args.finetune_from is not None:
        raise SystemExit("--resume continues a run with its own arguments; --finetune-from starts a new one: give one")
    if args.resume is not None or args.finetune_from is None:
        return resumed_args(args)
    checkpoint, path = load_checkpoint(args.finetune_from, "--finetune-from")
    if checkpoint["env_steps"] > 0:
        raise SystemExit(f"--finetune-from {path}: that checkpoint is already online; continue it with --resume")
    offline = dataclasses.asdict(Args(**checkpoint["args"]))  # flags added since it was saved get their defaults
    if differ := [f"--{k.replace('_', '-')} {offline[k]}" for k in ARCHITECTURE if offline[k] != getattr(args, k)]:
        raise SystemExit(f"--finetune-from {path} was trained with {' '.join(differ)}; pass the same")
    return checkpoint, path, dataclasses.replace(args, total_steps=checkpoint["step"])


def restore(checkpoint: dict, path: str, args: Args, parts: dict, log_temperature, replay, sampler):
    """Load a checkpoint into the run's `parts` (networks and optimisers): with --resume everything, to continue
    exactly; with --finetune-from the networks and their optimisers, at this command's learning rate."""
    if set(checkpoint["critic"]) != set(parts["critic"].state_dict()):
        why = "its critics are not this version's one batched network (saved before they were batched?)"
        raise SystemExit(f"{path}: {why}; train it again with this nf_rlbc.py")
    if not args.resume:
        for key in ("actor", "critic", "target_critic", "actor_optimizer", "critic_optimizer"):
            parts[key].load_state_dict(checkpoint[key])
        for group in parts["actor_optimizer"].param_groups + parts["critic_optimizer"].param_groups:
            group["lr"] = args.learning_rate
        return
    for key, part in parts.items():
        part.load_state_dict(checkpoint[key])
    with torch.no_grad():
        log_temperature.copy_(checkpoint["log_temperature"])
    replay.load_online_part(checkpoint["online_transitions"])
    restore_rng(checkpoint, sampler)


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


def check_args(args: Args):
    names = ("total_steps", "batch_size", "log_interval", "eval_interval", "eval_episodes", "save_interval")
    names += ("learning_rate", "num_blocks", "hidden_dim", "rep_dim", "encoder_dim", "critic_dim", "eval_max_steps")
    names += ("flow_steps", "eval_envs")
    problems = common_problems(args, names)
    if not 0 <= args.discount < 1:
        problems.append("--discount must lie in [0, 1)")
    if not 0 < args.tau <= 1:
        problems.append("--tau must lie in (0, 1]")
    if args.alpha < 0 or args.entropy_weight < 0:
        problems.append("--alpha and --entropy-weight must be >= 0")
    if args.online_steps < 0 or args.initial_temperature <= 0:
        problems.append("--online-steps must be >= 0 and --initial-temperature > 0")
    if not 0 <= args.online_ratio <= 1:
        problems.append("--online-ratio must lie in [0, 1]")
    if args.policy == "fql" and (args.entropy_weight > 0 or args.target_entropy is not None):
        problems.append(
            "--policy fql has no log-density, so no entropy term or temperature: drop --entropy-weight and "
            "--target-entropy (online, FQL goes on with its own losses; MaxEnt fine-tuning needs flow or gaussian)"
        )
    if args.finetune_from is not None and args.online_steps == 0:
        problems.append("--finetune-from starts an online phase: give it --online-steps N")
    if args.eval_workers < 0 or (args.eval_workers and args.source == "minari"):
        problems.append("--eval-workers must be >= 0, and 0 with --source minari (its envs do not pickle)")
    if problems:
        raise SystemExit("; ".join(problems))


# -------------------------------------------------------------------------------------------------- main


def main(args: Args):
    checkpoint, path, args = read_checkpoint(args)
    check_args(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    sampler = torch.Generator(device).manual_seed(args.seed)  # the batches, drawn where the data is

    train_data, make_env, obs_space, action_space, score_fn = load_task(args)
    envs = EnvPool(make_env, min(args.eval_envs, args.eval_episodes), args.eval_workers)
    low, high = action_box(args.env_id, action_space)
    train_data = dict(train_data, actions=scale_actions(train_data["actions"], low, high))
    replay = ReplayBuffer(train_data, device, capacity=args.online_steps)  # the offline data, then online transitions
    if args.batch_size > replay.size:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {replay.size:,} training transitions")
    obs_dim, action_dim = replay.data["observations"].shape[1], replay.data["actions"].shape[1]

    actor = ACTORS[args.policy](obs_dim, action_dim, args).to(device)
    actor.set_box(low, high)
    critic = Critic(obs_dim, action_dim, args.critic_dim).to(device)
    target_critic = Critic(obs_dim, action_dim, args.critic_dim).to(device).requires_grad_(False)
    target_critic.load_state_dict(critic.state_dict())
    if args.compile:  # in place: parameters and state_dict keys are unchanged
        for module in (critic, target_critic, *actor.children()):
            module.compile()
    log_temperature = torch.tensor(math.log(args.initial_temperature), device=device, requires_grad=True)  # online
    adam = functools.partial(torch.optim.Adam, lr=args.learning_rate, fused=True)  # fused: one kernel for all tensors
    optimizers = {"actor": adam(actor.parameters()), "critic": adam(critic.parameters())}
    optimizers["temperature"] = adam([log_temperature])
    parts = {"actor": actor, "critic": critic, "target_critic": target_critic}  # what a checkpoint holds
    parts.update({f"{k}_optimizer": v for k, v in optimizers.items()})
    if checkpoint is not None:
        restore(checkpoint, path, args, parts, log_temperature, replay, sampler)
    start_step = checkpoint["step"] if checkpoint is not None else 0
    graphed = args.compile and device.type == "cuda"  # the offline step as one CUDA graph
    for group in (g for o in optimizers.values() for g in o.param_groups):
        group["capturable"] = graphed  # (after loading: a checkpoint brings its own setting)

    evaluate_at = functools.partial(evaluate, actor, envs, obs_space, args, device, score_fn=score_fn)
    if args.eval_only:  # no training: evaluate the checkpoint and write the result beside its run
        return evaluate_only(path, start_step, evaluate_at, args), actor

    run_dir = run_directory(args, path if args.resume else None)
    log = RunLog(run_dir, args, ["step", "wall_time", "env_steps", "success", "return", "score"], start_step)
    size = f"{sum(p.numel() for p in actor.parameters()):,} + {sum(p.numel() for p in critic.parameters()):,} critic"
    where = f"resumed {run_dir} at step {start_step}" if args.resume else f"writing to {run_dir}"
    print(f"{args.policy} actor, {size} parameters, {replay.size:,} transitions, device {device}; {where}")
    agent = dict(actor=actor, critic=critic, target_critic=target_critic, optimizers=optimizers)
    settings = dict(log_temperature=log_temperature, discount=args.discount, tau=args.tau, q_agg=args.q_agg)
    settings["entropy_weight"] = args.entropy_weight
    settings["target_entropy"] = -float(action_dim) if args.target_entropy is None else args.target_entropy

    def env_steps(step: int) -> int:
        return max(0, step - args.total_steps)

    train_step = functools.partial(update, **agent, **settings)
    offline_step = functools.partial(train_step, online=False, bc_weight=args.alpha)
    if graphed and start_step < args.total_steps:  # warmed up and captured on a batch of its own
        batch = replay.sample(args.batch_size, torch.Generator(device))
        networks, captured = [actor, critic, target_critic], [optimizers["critic"], optimizers["actor"]]
        offline_step = cuda_graphed(offline_step, batch, networks, captured)

    if not args.resume:  # the start of the run, or of a --finetune-from run's online phase
        log.evaluation(start_step, dict(evaluate_at(start_step, log.video_dir), env_steps=0))
    first_bad, online_env, total = torch.tensor(-1, device=device), None, args.total_steps + args.online_steps
    with StopSignals() as stop:
        for step in tqdm(range(start_step + 1, total + 1), initial=start_step, total=total, smoothing=0.05):
            online = step > args.total_steps
            if online:  # one environment step with the current actor, into the replay buffer
                if online_env is None:  # made when the online phase starts (a resume starts a new episode)
                    online_env = OnlineEnv(make_env(), obs_space, args.seed + env_steps(step - 1), device)
                if episode := online_env.step(actor, replay):
                    log.scalars(step, episode, "online")
            batch = replay.sample(args.batch_size, sampler, args.online_ratio if online else 0.0)
            logs = train_step(batch, online=True, bc_weight=bc_weight_at(step, args)) if online else offline_step(batch)
            first_bad = non_finite_step(first_bad, step, logs)

            phase_step, last = env_steps(step) if online else step, step in (args.total_steps, total)
            intervals = (args.log_interval, args.eval_interval, args.save_interval)
            log_now, eval_now, save_now = (phase_step % n == 0 or last for n in intervals)
            save_now = save_now or stop.caught is not None  # SIGTERM, SIGUSR1 or Ctrl-C: save, then stop
            if (log_now or eval_now or save_now) and (bad := first_bad.item()) >= 0:  # before it logs, evaluates, saves
                where = f"online env step {bad - args.total_steps}" if bad > args.total_steps else f"offline step {bad}"
                raise SystemExit(f"non-finite training loss at {where}; stopping (try a lower --learning-rate)")
            if log_now:
                online_logs = {"temperature": log_temperature.detach().exp(), "bc_weight": bc_weight_at(step, args)}
                log.scalars(step, logs | online_logs if online else logs)
            if eval_now:
                log.evaluation(step, dict(evaluate_at(step, log.video_dir), env_steps=env_steps(step)))
            if save_now:
                state = {k: v.state_dict() for k, v in parts.items()} | {"log_temperature": log_temperature.detach()}
                state |= {"online_transitions": replay.online_part(), "step": step, "env_steps": env_steps(step)}
                save_checkpoint(run_dir, step, state, args, sampler)
            if stop.caught is not None:
                log.close(stopped_by=f"{stop.caught} at step {step}")
                raise SystemExit(1)
    log.close()
    return run_dir, actor


if __name__ == "__main__":
    main(tyro.cli(Args))
