"""NF-RLBC: offline RL with a normalizing-flow actor (SAC+BC / TD3+BC recipe) on OGBench singletask or Minari data.

"Normalizing Flows are Capable Models for RL" (Ghugare & Eysenbach, 2025): an ensemble of two critics learns
Q(s, a) by TD with a Polyak-averaged target and target actions sampled from the current actor; the actor is a
flow a = f(z; s), z ~ N(0, I), trained through its reparameterised samples to maximise min_i Q(s, a) while an
exact behaviour-cloning term alpha * NLL(a_data | s) keeps it near the data (plus an optional entropy term
with the flow's exact log-density). `--policy gaussian` is the same recipe with a Gaussian actor (state-
dependent mean and std, its own exact NLL), so the comparison changes one thing only.

    python make_dataset.py cube-single-play-v0 --num-transitions 100_000 --dataset-dir data
    python nf_rlbc.py --env-id cube-single-play-singletask-task1-v0 --dataset-dir data

A run writes {output_dir}/{env_id}__{exp_name}__{seed}__{unixtime}/: args.json, TensorBoard events,
eval.csv (success rate where the task defines it, mean return, normalised score where defined, else nan),
checkpoints/ (actor, critic, target critic, both optimisers, RNG states) and videos/.
"""

import csv
import dataclasses
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
    """torch.compile the networks of the training step (the first steps are slow while it compiles)"""
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

    # agent
    policy: Literal["flow", "gaussian"] = "flow"
    """the actor: the paper's flow or a Gaussian with the same encoder"""
    num_blocks: int = 6
    """flow blocks"""
    hidden_dim: int = 256
    """width of the flow's coupling networks"""
    rep_dim: int = 64
    """size of the state encoding that conditions the actor"""
    encoder_dim: int = 512
    """width of the actor's 4-layer state encoder (paper: 512)"""
    critic_dim: int = 512
    """width of each of the two 4-layer critics (paper: 512)"""
    alpha: float = 10.0
    """weight of the behaviour-cloning NLL in the actor loss (paper: 10 on cube/scene/puzzle, 1 on mazes)"""
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
    online_bc: Literal["anneal", "keep", "off"] = "anneal"
    """the BC term online, on the dataset's rows of each batch: alpha decayed linearly to 0 over online_steps, kept, or dropped"""
    online_ratio: float = 0.5
    """online: the share of each batch drawn from the online transitions (RLPD's symmetric sampling; the offline
    data would otherwise swamp them); 0: uniform over everything stored"""
    target_entropy: Optional[float] = None
    """online: the entropy the temperature is tuned toward (default: -action_dim)"""
    initial_temperature: float = 0.01
    """online: the starting entropy temperature (then tuned automatically)"""

    # logging and evaluation
    log_interval: int = 1_000
    """steps between training logs"""
    eval_interval: int = 100_000
    """steps between evaluations, offline gradient steps and online env steps alike (also at 0 and each end)"""
    eval_episodes: int = 50
    """evaluation episodes, run as one batch"""
    eval_max_steps: Optional[int] = None
    """cap on evaluation episode length (default: the environment's; lower only for quick checks)"""
    save_interval: int = 100_000
    """steps between checkpoints (also at the end)"""


# ------------------------------------------------------------------------------------------------ data


def load_ogbench(env_id: str, dataset_dir: str):
    """The evaluation env and the train/val datasets; a clear error when the name or files are wrong."""
    if "singletask" not in env_id.split("-"):
        raise SystemExit(f"{env_id} is a goal-conditioned dataset; offline RL needs the rewards of one task, so name a singletask "
                         f"variant, e.g. {env_id[:-3]}-singletask-task1-v0")  # fmt: skip
    parts = env_id.split("-")
    parts = parts[: parts.index("singletask")] + parts[-1:]  # the dataset that a singletask name reads
    env_name = "-".join(parts[:-2] + parts[-1:])
    if len(parts) < 3 or env_name not in gymnasium.registry:
        known = [k for k in gymnasium.registry if any(w in k for w in ("maze", "cube", "scene", "puzzle", "soccer"))]
        names = [f"{k[:-3]}-{t}-singletask-v0" for k in known for t in ("navigate", "stitch", "explore", "play", "noisy")]
        close = difflib.get_close_matches(env_id, names, n=3, cutoff=0.6)
        raise SystemExit(f"unknown OGBench dataset {env_id!r}" + (f"; did you mean {' or '.join(close)}?" if close else ""))
    dataset_dir = os.path.expanduser(dataset_dir)
    dataset = "-".join(parts)
    path = os.path.join(dataset_dir, f"{dataset}.npz")
    if not os.path.exists(path):
        try:
            ogbench.download_datasets([dataset], dataset_dir)
        except Exception as err:  # no network, unknown file, ...
            raise SystemExit(
                f"{path} is missing and OGBench's download failed ({type(err).__name__}: {err}).\n"
                f"Make it locally with OGBench's own oracles:\n"
                f"  python make_dataset.py {dataset} --dataset-dir {dataset_dir}"
            )
    try:
        env, train, val = ogbench.make_env_and_datasets(env_id, dataset_dir=dataset_dir)
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"could not read {path} ({type(err).__name__}: {err}); remake it with\n"
                         f"  python make_dataset.py {dataset} --dataset-dir {dataset_dir} --overwrite")  # fmt: skip
    return env, train, val



def flatten_observation(space: gymnasium.Space, obs) -> np.ndarray:
    """Dict observations (one step or a batch of steps) as one vector, keys in the space's order."""
    if isinstance(space, gymnasium.spaces.Dict):
        return np.concatenate([flatten_observation(space[k], obs[k]) for k in space.keys()], -1)
    obs = np.asarray(obs, dtype=np.float32)
    return obs.reshape(*obs.shape[: obs.ndim - len(space.shape)], -1)



def load_minari(dataset_id: str):
    """A local Minari dataset as one transition array dict (masks = 1 - termination) and the dataset itself."""
    try:
        import minari
    except ImportError:
        raise SystemExit('--source minari needs Minari: pip install "minari[hdf5]"')
    try:
        dataset = minari.load_dataset(dataset_id)
    except (FileNotFoundError, ValueError) as err:
        local = list(minari.list_local_datasets())
        close = difflib.get_close_matches(dataset_id, local, n=3, cutoff=0.6)
        root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
        raise SystemExit(f"Minari dataset {dataset_id!r} is not in {root} ({type(err).__name__}).\n"
                         + (f"Did you mean {' or '.join(close)}? " if close else "")
                         + f"Local datasets: {', '.join(local) or 'none'}. Download it where there is network with\n"
                         f"  minari download {dataset_id}\n"
                         f"and copy it into $MINARI_DATASETS_PATH (default ~/.minari/datasets).")  # fmt: skip
    episodes = list(dataset.iterate_episodes())
    flat = [flatten_observation(dataset.observation_space, e.observations) for e in episodes]
    data = {
        "observations": np.concatenate([o[:-1] for o in flat]),
        "next_observations": np.concatenate([o[1:] for o in flat]),
        "actions": np.concatenate([np.asarray(e.actions, np.float32).reshape(len(e.actions), -1) for e in episodes]),
        "rewards": np.concatenate([np.asarray(e.rewards, np.float32) for e in episodes]),
        "masks": np.concatenate([1.0 - np.asarray(e.terminations, np.float32) for e in episodes]),
    }  # fmt: skip
    return dataset, data


class ReplayBuffer:
    """(s, a, r, mask, s') on `device`: the offline transitions, then room for `capacity` online ones. A batch
    takes `online_ratio` of its rows from the online part (once it has any), the rest from the offline part;
    its `offline` column marks the dataset's rows."""

    KEYS = ("observations", "actions", "rewards", "masks", "next_observations")

    def __init__(self, data: Dict[str, np.ndarray], device: torch.device, capacity: int):
        offline = {k: torch.as_tensor(np.asarray(data[k]), dtype=torch.float32, device=device) for k in self.KEYS}
        self.size = self.offline_size = len(offline["rewards"])
        if any(len(v) != self.size for v in offline.values()):
            raise SystemExit(f"dataset: {', '.join(f'{k} {tuple(v.shape)}' for k, v in offline.items())} differ in length")
        self.data = {k: torch.cat([v, v.new_zeros((capacity,) + v.shape[1:])]) for k, v in offline.items()}

    def sample(self, batch_size: int, rng: np.random.Generator, online_ratio: float = 0.0) -> Dict[str, torch.Tensor]:
        if online_ratio > 0 and self.size > self.offline_size:
            num_online = round(batch_size * online_ratio)
            idx = np.concatenate([rng.integers(self.offline_size, size=batch_size - num_online),
                                  rng.integers(self.offline_size, self.size, size=num_online)])  # fmt: skip
        else:
            idx = rng.integers(self.size, size=batch_size)
        idx = torch.as_tensor(idx, device=self.data["rewards"].device)
        return dict({k: v[idx] for k, v in self.data.items()}, offline=(idx < self.offline_size).float())

    def add(self, **transition):
        for k, v in transition.items():
            self.data[k][self.size] = torch.as_tensor(v, dtype=torch.float32)
        self.size += 1

    def online_part(self) -> Dict[str, torch.Tensor]:
        return {k: v[self.offline_size : self.size].cpu() for k, v in self.data.items()}


def scale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Actions from [low, high] to [-1, 1], the box the policies act in."""
    return np.clip(2 * (actions - low) / (high - low) - 1, -1, 1).astype(np.float32)


def load_task(args: Args):
    """The transitions, a function that makes one evaluation env, the observation space and the normalised score."""
    render = dict(render_mode="rgb_array", width=200, height=200) if args.capture_video else {}
    if args.source == "ogbench":
        env, train, _ = load_ogbench(args.env_id, args.dataset_dir)
        return train, lambda: ogbench.make_env_and_datasets(args.env_id, env_only=True, **render), env.observation_space, None
    dataset, train = load_minari(args.env_id)
    ref = dataset.storage.metadata
    score = None
    if ref.get("ref_min_score") is not None and ref.get("ref_max_score") is not None:
        import minari

        score = lambda returns: minari.get_normalized_score(dataset, np.asarray(returns))  # noqa: E731

    def make_minari_env():
        try:
            return dataset.recover_environment(eval_env=True, **render)
        except Exception as err:  # the package that registers the environment is missing, ...
            raise SystemExit(f"could not make the evaluation environment of {args.env_id} ({type(err).__name__}: "
                             f"{err}); install the package that provides it (D4RL/* datasets: pip install "
                             f"gymnasium-robotics; mujoco/*: pip install mujoco)")  # fmt: skip

    return train, make_minari_env, dataset.observation_space, score


# ------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(actor, envs, obs_space, args: Args, device, step: int, video_dir: Optional[str], score_fn) -> Dict[str, float]:
    """Success rate (where the env reports success), mean return and normalised score (where defined) over one
    episode per env; all envs run in lockstep, the actor batched, with fixed evaluation seeds."""
    actor.eval()
    generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)  # not the training RNG
    obs = []
    for i, env in enumerate(envs):
        np.random.seed(100_000 + i)  # OGBench draws start and goal noise from NumPy's global generator
        obs.append(flatten_observation(obs_space, env.reset(seed=100_000 + i)[0]))
    obs, n = np.array(obs), len(envs)
    active, returns, success, reports_success, frames = np.ones(n, bool), np.zeros(n), np.zeros(n), False, []
    for _ in range(args.eval_max_steps or 10**9):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        actions = actor.act(torch.as_tensor(obs[idx], dtype=torch.float32, device=device), generator).cpu().numpy()
        if video_dir is not None and active[0]:
            frames.append(envs[0].render())
        for a, i in zip(actions, idx):
            ob, reward, terminated, truncated, info = envs[i].step(a)
            obs[i] = flatten_observation(obs_space, ob)
            returns[i] += reward
            if "success" in info:
                reports_success = True
                success[i] = max(success[i], float(info["success"]))
            if terminated or truncated:
                active[i] = False
    if video_dir is not None:
        save_video(frames, os.path.join(video_dir, f"step{step}.mp4"))
    actor.train()
    return {"success": float(success.mean()) if reports_success else math.nan, "return": float(returns.mean()),
            "score": float(np.mean(score_fn(returns))) if score_fn is not None else math.nan}  # fmt: skip


def save_video(frames, path: str):
    import imageio.v2 as imageio

    try:
        imageio.mimsave(path, frames, fps=30)
    except Exception:  # no ffmpeg backend: fall back to a GIF
        imageio.mimsave(path[:-4] + ".gif", frames, duration=1 / 30)


# ---------------------------------------------------------------------------------------------- networks


def mlp(sizes, activation, layer_norm: bool) -> nn.Sequential:
    layers = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), activation()] + ([nn.LayerNorm(sizes[i + 1])] if layer_norm else [])
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))



class Critic(nn.Module):
    """An ensemble of two Q(s, a) MLPs (4 x width, GELU, LayerNorm); returns [2, B]."""

    def __init__(self, obs_dim: int, action_dim: int, width: int = 512):
        super().__init__()
        self.nets = nn.ModuleList([mlp([obs_dim + action_dim] + [width] * 4 + [1], nn.GELU, layer_norm=True) for _ in range(2)])

    def forward(self, obs, actions):
        x = torch.cat([obs, actions], -1)
        return torch.stack([net(x).squeeze(-1) for net in self.nets])


class Actor(nn.Module):
    """What both actors share: a state encoder (4 x encoder_dim, SiLU, LayerNorm) and the action box, kept as buffers.
    The actors work in [-1, 1]; act() returns actions in the environment's units."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.encoder = mlp([obs_dim] + [args.encoder_dim] * 4 + [args.rep_dim], nn.SiLU, layer_norm=True)
        self.register_buffer("action_low", -torch.ones(action_dim))
        self.register_buffer("action_high", torch.ones(action_dim))

    def to_env_units(self, actions):
        return self.action_low + (actions.clamp(-1, 1) + 1) / 2 * (self.action_high - self.action_low)


class FlowActor(Actor):
    """a = f(z; s), z ~ N(0, I): reparameterised samples with their exact log-density, and exact NLL of data."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__(obs_dim, action_dim, args)
        self.flow = ConditionalFlow(action_dim, args.rep_dim, args.num_blocks, args.hidden_dim)

    def sample(self, obs):
        return self.flow.sample_with_log_prob(self.encoder(obs))

    def sample_and_score(self, obs, data_actions):
        """Reparameterised samples, their log-density and the log-density of data actions: one encoder pass."""
        cond = self.encoder(obs)
        actions, log_prob = self.flow.sample_with_log_prob(cond)
        return actions, log_prob, self.flow.log_prob(data_actions, cond)

    def act(self, obs, generator: torch.Generator):
        z = torch.randn(len(obs), self.flow.dim, generator=generator, device=obs.device)
        return self.to_env_units(self.flow.sample(self.encoder(obs), z))


class GaussianActor(Actor):
    """The same encoder, then a linear head to a mean and a state-dependent log-std (clamped to [-5, 2]);
    evaluated at its mean."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__(obs_dim, action_dim, args)
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

    def act(self, obs, generator: torch.Generator):
        return self.to_env_units(self.distribution(obs).mean)


def td_target(actor, target_critic, batch: Dict[str, torch.Tensor], args: Args, temperature: float = 0.0) -> torch.Tensor:
    """r + discount * mask * (agg_i Q_target_i(s', a') - temperature * log pi(a' | s')), a' ~ actor(s') clipped
    to the action box. Offline the temperature is 0 (the paper's target); online it is SAC's soft target."""
    with torch.no_grad():
        next_actions, next_log_prob = actor.sample(batch["next_observations"])
        next_q = target_critic(batch["next_observations"], next_actions.clamp(-1, 1))
        next_q = next_q.min(0).values if args.q_agg == "min" else next_q.mean(0)
        return batch["rewards"] + args.discount * batch["masks"] * (next_q - temperature * next_log_prob)


# ---------------------------------------------------------------------------------------------- training


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


def check_args(args: Args):
    problems = [f"--{name.replace('_', '-')} must be positive" for name in
                ("total_steps", "batch_size", "log_interval", "eval_interval", "eval_episodes", "save_interval")
                if getattr(args, name) <= 0]  # fmt: skip
    if args.capture_video and not os.environ.get("DISPLAY") and os.environ.get("MUJOCO_GL") not in ("egl", "osmesa"):
        problems.append("--capture-video without a display needs headless MuJoCo rendering chosen before Python "
                        "starts: MUJOCO_GL=egl python nf_rlbc.py ... (or MUJOCO_GL=osmesa)")  # fmt: skip
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
    if args.finetune_from is not None and args.online_steps == 0:
        problems.append("--finetune-from starts an online phase: give it --online-steps N")
    if problems:
        raise SystemExit("; ".join(problems))


ARCHITECTURE = ("source", "env_id", "policy", "num_blocks", "hidden_dim", "rep_dim", "encoder_dim", "critic_dim")


def main(args: Args):
    checkpoint = None
    if args.resume is not None and args.finetune_from is not None:
        raise SystemExit("--resume continues a run with its own arguments; --finetune-from starts a new one: give one")
    if args.resume is not None:
        path = find_checkpoint(args.resume)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise SystemExit(f"--resume {path}: not a readable checkpoint ({type(err).__name__}: {err})")
        args = dataclasses.replace(Args(**checkpoint["args"]), resume=args.resume)
        run_dir = os.path.dirname(os.path.dirname(path))
    elif args.finetune_from is not None:  # a new run: the offline run's networks, this command's online settings
        path = find_checkpoint(args.finetune_from, "--finetune-from")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise SystemExit(f"--finetune-from {path}: not a readable checkpoint ({type(err).__name__}: {err})")
        if checkpoint["env_steps"] > 0:
            raise SystemExit(f"--finetune-from {path}: that checkpoint is already online; continue it with --resume")
        offline = dataclasses.asdict(Args(**checkpoint["args"]))  # flags added since it was saved get their defaults
        differ = [f"--{k.replace('_', '-')} {offline[k]}" for k in ARCHITECTURE if offline[k] != getattr(args, k)]
        if differ:
            raise SystemExit(f"--finetune-from {path} was trained with {' '.join(differ)}; pass the same")
        args = dataclasses.replace(args, total_steps=checkpoint["step"])
    if args.resume is None:
        name = args.env_id.replace("/", "-")
        run_dir = os.path.join(args.output_dir, f"{name}__{args.exp_name}__{args.seed}__{int(time.time())}")
    check_args(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    train_data, make_env, obs_space, score_fn = load_task(args)
    envs = [make_env() for _ in range(args.eval_episodes)]
    space = envs[0].action_space
    if not isinstance(space, gymnasium.spaces.Box) or not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        raise SystemExit(f"{args.env_id}: the action space is {space}; the actors need a bounded Box")
    low, high = space.low.astype(np.float32), space.high.astype(np.float32)
    train_data = dict(train_data, actions=scale_actions(train_data["actions"], low, high))
    replay = ReplayBuffer(train_data, device, capacity=args.online_steps)  # the offline data, then online transitions
    obs_dim, action_dim = replay.data["observations"].shape[1], replay.data["actions"].shape[1]

    actor = (FlowActor if args.policy == "flow" else GaussianActor)(obs_dim, action_dim, args).to(device)
    actor.action_low.copy_(torch.as_tensor(low))
    actor.action_high.copy_(torch.as_tensor(high))
    critic = Critic(obs_dim, action_dim, args.critic_dim).to(device)
    target_critic = Critic(obs_dim, action_dim, args.critic_dim).to(device).requires_grad_(False)
    target_critic.load_state_dict(critic.state_dict())
    if args.compile:  # in place: parameters and state_dict keys are unchanged
        for module in (critic, target_critic, actor.encoder) + ((actor.flow,) if args.policy == "flow" else ()):
            module.compile()
    # fused: one kernel for all parameter tensors (on CPU ~5x faster than the default per-tensor loop)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, fused=True)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.learning_rate, fused=True)
    log_temperature = torch.tensor(math.log(args.initial_temperature), device=device, requires_grad=True)  # online
    temperature_optimizer = torch.optim.Adam([log_temperature], lr=args.learning_rate, fused=True)
    target_entropy = -float(action_dim) if args.target_entropy is None else args.target_entropy
    start_step = start_env_step = 0
    if checkpoint is not None and args.resume is None:  # --finetune-from: the networks and their optimisers only
        for module, key in ((actor, "actor"), (critic, "critic"), (target_critic, "target_critic"),
                            (actor_optimizer, "actor_optimizer"), (critic_optimizer, "critic_optimizer")):  # fmt: skip
            module.load_state_dict(checkpoint[key])
        for optimizer in (actor_optimizer, critic_optimizer):  # this command's learning rate, not the saved one
            for group in optimizer.param_groups:
                group["lr"] = args.learning_rate
        start_step = args.total_steps
        print(f"fine-tuning {path} (offline step {start_step}) online")
    elif checkpoint is not None:
        for module, key in ((actor, "actor"), (critic, "critic"), (target_critic, "target_critic"),
                            (actor_optimizer, "actor_optimizer"), (critic_optimizer, "critic_optimizer"),
                            (temperature_optimizer, "temperature_optimizer")):  # fmt: skip
            module.load_state_dict(checkpoint[key])
        with torch.no_grad():
            log_temperature.copy_(checkpoint["log_temperature"])
        for key, value in checkpoint["online_transitions"].items():  # the replay buffer's online part
            replay.data[key][replay.offline_size : replay.offline_size + len(value)] = value.to(device)
        replay.size = replay.offline_size + checkpoint["env_steps"]
        torch.set_rng_state(checkpoint["torch_rng"])
        rng.bit_generator.state = json.loads(checkpoint["numpy_rng"])
        start_step, start_env_step = checkpoint["step"], checkpoint["env_steps"]
        print(f"resumed {run_dir} at step {start_step}, {start_env_step} online env steps")

    if args.resume is None:
        run_dir = claim_run_dir(run_dir)
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
    fields = ["step", "env_steps", "wall_time", "success", "return", "score"]
    kept = []  # on resume, the evaluations up to the checkpoint (later ones are redone, as purge_step does)
    if start_step and os.path.exists(csv_path):
        with open(csv_path, newline="") as f:
            kept = [row for row in csv.reader(f)][1:]
        kept = [row for row in kept if int(row[0]) <= start_step and int(row[1]) <= start_env_step]
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([fields] + kept)
    print(f"{args.policy} actor, {sum(p.numel() for p in actor.parameters()):,} + {sum(p.numel() for p in critic.parameters()):,} "
          f"critic parameters, {replay.size:,} transitions, device {device}; writing to {run_dir}")  # fmt: skip

    def run_evaluation(step, env_steps):
        stats = evaluate(actor, envs, obs_space, args, device, step + env_steps, video_dir, score_fn)
        with open(csv_path, "a", newline="") as f:
            csv.writer(f).writerow([step, env_steps, round(time.time() - start_time, 1)] + [stats[k] for k in fields[3:]])
        for k, v in stats.items():
            if not math.isnan(v):
                writer.add_scalar(f"eval/{k}", v, step + env_steps)
        where = f"step {step}" + (f", online env step {env_steps}" if env_steps else "")
        print(f"{where}: " + ", ".join(f"{k} {stats[k]:.3f}" for k in fields[3:] if not math.isnan(stats[k])))

    def save(step, env_steps):
        torch.save({"actor": actor.state_dict(), "critic": critic.state_dict(), "target_critic": target_critic.state_dict(),
                    "actor_optimizer": actor_optimizer.state_dict(), "critic_optimizer": critic_optimizer.state_dict(),
                    "log_temperature": log_temperature.detach(), "temperature_optimizer": temperature_optimizer.state_dict(),
                    "online_transitions": replay.online_part(), "step": step, "env_steps": env_steps,
                    "args": dataclasses.asdict(args), "torch_rng": torch.get_rng_state(),
                    "numpy_rng": json.dumps(rng.bit_generator.state)},
                   os.path.join(run_dir, "checkpoints", f"step_{step + env_steps}.pt"))  # fmt: skip

    def update(bc_weight, target_temperature, entropy_weight, online_ratio=0.0):
        """One critic and one actor step on a batch from the replay buffer; returns the losses for logging."""
        batch = replay.sample(args.batch_size, rng, online_ratio)
        q = critic(batch["observations"], batch["actions"])
        critic_loss = (q - td_target(actor, target_critic, batch, args, target_temperature)).square().mean()
        critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_optimizer.step()

        actions, log_prob, data_log_prob = actor.sample_and_score(batch["observations"], batch["actions"])
        critic.requires_grad_(False)  # the actor's gradient flows through the critic, not into its weights
        q_pi = critic(batch["observations"], actions.clamp(-1, 1)).min(0).values  # reparameterised through the actor
        critic.requires_grad_(True)
        # behaviour cloning on the dataset's rows only: cloning the agent's own online actions would anchor it to them
        offline = batch["offline"]
        bc_nll = -(data_log_prob * offline).sum() / offline.sum().clamp(min=1)
        actor_loss = -q_pi.mean() + bc_weight * bc_nll + entropy_weight * log_prob.mean()
        actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        actor_optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(target_critic.parameters()), list(critic.parameters()), args.tau)
        return {"critic_loss": critic_loss, "actor_loss": actor_loss, "bc_nll": bc_nll, "q_mean": q.mean(),
                "q_pi": q_pi.mean(), "log_prob": log_prob.mean()}  # fmt: skip

    def check_finite(losses, first_bad, step):
        bad = ~torch.isfinite(losses["critic_loss"]) | ~torch.isfinite(losses["actor_loss"])
        return torch.where((first_bad < 0) & bad, step, first_bad)

    def stop_if_non_finite(first_bad, phase):
        if first_bad.item() >= 0:  # before anything logs, evaluates or saves a broken agent
            raise SystemExit(f"non-finite training loss at {phase} step {first_bad.item()}; stopping (try a lower --learning-rate)")

    start_time = time.time()
    if start_step == 0 or (args.finetune_from is not None and start_env_step == 0):
        run_evaluation(start_step, 0)  # the start of the run, or of a --finetune-from run's online phase
    first_bad_step = torch.tensor(-1, device=device)  # first non-finite loss, tracked without a host sync
    last_log_time, last_log_step = time.time(), start_step
    for step in tqdm(range(start_step + 1, args.total_steps + 1), initial=start_step, total=args.total_steps, smoothing=0.05):
        losses = update(args.alpha, 0.0, args.entropy_weight)
        first_bad_step = check_finite(losses, first_bad_step, step)
        last = step == args.total_steps
        if any(step % n == 0 for n in (args.log_interval, args.eval_interval, args.save_interval)) or last:
            stop_if_non_finite(first_bad_step, "offline")
        if step % args.log_interval == 0 or last:
            speed = (step - last_log_step) / (time.time() - last_log_time)
            last_log_time, last_log_step = time.time(), step
            for key, value in losses.items():
                writer.add_scalar(f"train/{key}", value.item(), step)
            writer.add_scalar("perf/steps_per_second", speed, step)
        if step % args.eval_interval == 0 or last:
            run_evaluation(step, 0)
        if step % args.save_interval == 0 or last:
            save(step, 0)

    if args.online_steps > start_env_step:  # online MaxEnt fine-tuning: SAC with the actor's exact log-density
        env = make_env()
        np.random.seed(args.seed + start_env_step)  # OGBench draws start noise from NumPy's global generator
        ob = flatten_observation(obs_space, env.reset(seed=args.seed + start_env_step)[0])  # a resume starts an episode
        episode_return, episode_success = 0.0, 0.0
        first_bad_step = torch.tensor(-1, device=device)
        for env_step in tqdm(range(start_env_step + 1, args.online_steps + 1), initial=start_env_step, total=args.online_steps):
            with torch.no_grad():
                action, _ = actor.sample(torch.as_tensor(ob[None], dtype=torch.float32, device=device))
                action = action[0].clamp(-1, 1)
            next_ob, reward, terminated, truncated, info = env.step(actor.to_env_units(action).cpu().numpy())
            next_ob = flatten_observation(obs_space, next_ob)
            replay.add(observations=ob, actions=action, rewards=reward, masks=1.0 - terminated, next_observations=next_ob)
            episode_return += reward
            episode_success = max(episode_success, float(info.get("success", 0.0)))
            ob = next_ob
            if terminated or truncated:
                writer.add_scalar("online/episode_return", episode_return, args.total_steps + env_step)
                writer.add_scalar("online/episode_success", episode_success, args.total_steps + env_step)
                ob = flatten_observation(obs_space, env.reset()[0])
                episode_return, episode_success = 0.0, 0.0

            bc_weight = {"anneal": args.alpha * (1 - env_step / args.online_steps), "keep": args.alpha, "off": 0.0}[args.online_bc]
            temperature = log_temperature.detach().exp()
            losses = update(bc_weight, temperature, temperature, args.online_ratio)
            log_prob = losses["log_prob"].detach()  # of the batch the actor just trained on (as Stable-Baselines3)
            temperature_loss = -log_temperature * (log_prob + target_entropy)  # tune toward the target entropy
            temperature_optimizer.zero_grad(set_to_none=True)
            temperature_loss.backward()
            temperature_optimizer.step()
            first_bad_step = check_finite(losses, first_bad_step, env_step)

            last = env_step == args.online_steps
            if any(env_step % n == 0 for n in (args.log_interval, args.eval_interval, args.save_interval)) or last:
                stop_if_non_finite(first_bad_step, "online env")
            if env_step % args.log_interval == 0 or last:
                for key, value in losses.items():
                    writer.add_scalar(f"online/{key}", value.item(), args.total_steps + env_step)
                writer.add_scalar("online/temperature", temperature.item(), args.total_steps + env_step)
                writer.add_scalar("online/bc_weight", bc_weight, args.total_steps + env_step)
            if env_step % args.eval_interval == 0 or last:
                run_evaluation(args.total_steps, env_step)
            if env_step % args.save_interval == 0 or last:
                save(args.total_steps, env_step)
    writer.close()
    if args.track:
        wandb.finish()
    return run_dir, actor


if __name__ == "__main__":
    main(tyro.cli(Args))
