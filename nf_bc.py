"""NF-BC: behavioural cloning with a normalizing-flow policy over action chunks and observation history.

"Normalizing Flows are Capable Models for RL" (Ghugare & Eysenbach, 2025): maximise
log p(a_t, ..., a_{t+k-1} | o_{t-h+1}, ..., o_t) on demonstrations. When acting, the policy samples a chunk of
k actions from the last h observations and executes the first m of them before it samples again. Actions are
noised during training and denoised when acting. `--policy gaussian` swaps in a Gaussian MLP over the same
chunk (3 x 512, state-independent std, evaluated at its mean), trained on the same batches.

Demonstrations (--source): a plain .npz (observations, actions, terminals), such as the multimodal maze task
that make_dataset.py writes; an OGBench singletask dataset; or a Minari dataset stored locally.

    python make_dataset.py pointmaze-medium-multigoal-v0 --dataset-dir data
    python nf_bc.py --env-id pointmaze-medium-multigoal-v0 --dataset-dir data

A run writes {output_dir}/{env_id}__{exp_name}__{seed}__{unixtime}/: args.json, TensorBoard events,
eval.csv (mean return, success rate and normalised score where the task defines them, else nan; validation
NLL), checkpoints/ and videos/.
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
    """save a video of the first evaluation episode"""
    output_dir: str = "runs"
    """where run directories are created"""
    resume: Optional[str] = None
    """run directory or checkpoint file to continue from (its saved arguments are used)"""

    # data
    source: Literal["npz", "ogbench", "minari"] = "npz"
    """where the demonstrations come from (see env_id)"""
    env_id: str = "pointmaze-medium-multigoal-v0"
    """npz: <dataset_dir>/<env_id>.npz; ogbench: a singletask dataset (cube-single-play-singletask-task1-v0);
    minari: a local dataset id (mujoco/hopper/expert-v0)"""
    dataset_dir: str = "~/.ogbench/data"
    """directory of the .npz and OGBench files (Minari keeps its own: $MINARI_DATASETS_PATH or ~/.minari/datasets)"""
    eval_env: Optional[str] = None
    """npz: gymnasium id to evaluate in (default: the file's env_name entry; without one, validation NLL only)"""
    obs_horizon: int = 2
    """observations the policy sees (h): o_{t-h+1}, ..., o_t"""
    action_horizon: int = 8
    """actions the policy predicts at once (k): a_t, ..., a_{t+k-1}"""
    exec_horizon: int = 4
    """actions executed from each predicted chunk (m <= k) before the policy is asked again"""
    noise_std: float = 0.1
    """std of the Gaussian noise added to training actions (scaled to [-1, 1]; denoised at evaluation)"""

    # policy
    policy: Literal["flow", "gaussian"] = "flow"
    """the policy class: the paper's flow or a Gaussian MLP"""
    num_blocks: int = 12
    """flow blocks"""
    hidden_dim: int = 512
    """width of the flow's coupling networks"""
    rep_dim: int = 256
    """size of the observation-history encoding that conditions the flow"""
    denoise: bool = True
    """flow: one Tweedie denoising step on sampled action chunks"""

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
    """evaluation episodes, run as one batch"""
    eval_max_steps: Optional[int] = None
    """cap on evaluation episode length (default: the environment's; lower only for quick checks)"""
    save_interval: int = 100_000
    """steps between checkpoints (also at the end)"""


# ------------------------------------------------------------------------------------------------ data


def load_ogbench(env_id: str, dataset_dir: str):
    """The evaluation env and the train/val datasets; a clear error when the name or files are wrong."""
    if "singletask" not in env_id.split("-"):
        raise SystemExit(f"{env_id} is a goal-conditioned dataset; BC is evaluated on one task, so name a singletask "
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


def load_npz(path: str, make_hint: str) -> Dict[str, np.ndarray]:
    """A demonstration file: observations [N, o], actions [N, a], terminals [N] (True at each episode's end)."""
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing. {make_hint}")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as err:
        raise SystemExit(f"could not read {path} ({type(err).__name__}: {err}). {make_hint}")
    missing = [k for k in ("observations", "actions", "terminals") if k not in data]
    if missing:
        raise SystemExit(f"{path} lacks {', '.join(missing)}: a demonstration file needs observations [N, obs_dim], "
                         f"actions [N, action_dim] and terminals [N] (True at the last step of each episode)")  # fmt: skip
    n = len(data["terminals"])
    if data["observations"].ndim != 2 or data["actions"].ndim != 2 or len(data["observations"]) != n or len(data["actions"]) != n:
        raise SystemExit(f"{path}: observations {data['observations'].shape}, actions {data['actions'].shape} and "
                         f"terminals {data['terminals'].shape} must be [N, obs_dim], [N, action_dim] and [N]")  # fmt: skip
    return data


def flatten_observation(space: gymnasium.Space, obs) -> np.ndarray:
    """Dict observations (one step or a batch of steps) as one vector, keys in the space's order."""
    if isinstance(space, gymnasium.spaces.Dict):
        return np.concatenate([flatten_observation(space[k], obs[k]) for k in space.keys()], -1)
    obs = np.asarray(obs, dtype=np.float32)
    return obs.reshape(*obs.shape[: obs.ndim - len(space.shape)], -1)


def load_minari(dataset_id: str):
    """A local Minari dataset as train/val arrays (every 10th episode is validation) and the dataset itself."""
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
    val_ids = set(range(9, len(episodes), 10)) if len(episodes) >= 10 else set()
    splits = []
    for keep in (lambda i: i not in val_ids, lambda i: i in val_ids):
        chosen = [e for i, e in enumerate(episodes) if keep(i)]
        if not chosen:
            splits.append(None)
            continue
        splits.append({
            "observations": np.concatenate([flatten_observation(dataset.observation_space, e.observations)[:-1] for e in chosen]),
            "actions": np.concatenate([np.asarray(e.actions, np.float32).reshape(len(e.actions), -1) for e in chosen]),
            "terminals": np.concatenate([np.arange(len(e.actions)) == len(e.actions) - 1 for e in chosen]),
        })  # fmt: skip
    return dataset, splits[0], splits[1]


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
            raise SystemExit("dataset: the last step is not marked as an episode end (terminals); the file is truncated")
        episode = np.searchsorted(ends, np.arange(self.size))
        first, last = np.r_[0, ends[:-1] + 1][episode], ends[episode]
        t = np.arange(self.size)[:, None]
        self.obs_index = torch.as_tensor(np.maximum(t + np.arange(1 - obs_horizon, 1), first[:, None]), device=device)
        self.action_index = torch.as_tensor(np.minimum(t + np.arange(action_horizon), last[:, None]), device=device)

    def sample(self, batch_size: int, rng: np.random.Generator):
        idx = torch.as_tensor(rng.integers(self.size, size=batch_size), device=self.observations.device)
        return self.observations[self.obs_index[idx]], self.actions[self.action_index[idx]]


def scale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Actions from [low, high] to [-1, 1], the box the policies act in."""
    return np.clip(2 * (actions - low) / (high - low) - 1, -1, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------- environment


class AnyGoalMaze(gymnasium.Wrapper):
    """An OGBench maze episode from a fixed start cell that succeeds, and ends, on reaching any of several goal
    cells (within the maze's goal tolerance of a cell centre); reward 1 on success, else 0."""

    def __init__(self, env: gymnasium.Env, init_ij, goal_ijs):
        super().__init__(env)
        self.init_ij, self.goal_ijs = tuple(int(v) for v in init_ij), [tuple(int(v) for v in g) for g in goal_ijs]
        self.goal_xys = np.array([env.unwrapped.ij_to_xy(g) for g in self.goal_ijs])

    def reset(self, *, seed=None, options=None):
        return self.env.reset(seed=seed, options=dict(task_info=dict(init_ij=self.init_ij, goal_ij=self.goal_ijs[0])))

    def step(self, action):
        ob, _, terminated, truncated, info = self.env.step(action)
        reached = np.linalg.norm(self.goal_xys - self.env.unwrapped.get_xy(), axis=1).min() <= self.env.unwrapped._goal_tol
        info["success"] = float(reached)
        return ob, float(reached), terminated or reached, truncated, info


def load_task(args: Args):
    """Train/val demonstrations, a function that makes one evaluation env (or None), the observation space of
    that env, and the normalised score (a function of returns, or None)."""
    render = dict(render_mode="rgb_array", width=200, height=200) if args.capture_video else {}
    if args.source == "ogbench":
        env, train, val = load_ogbench(args.env_id, args.dataset_dir)
        return train, val, lambda: ogbench.make_env_and_datasets(args.env_id, env_only=True, **render), env.observation_space, None
    if args.source == "minari":
        dataset, train, val = load_minari(args.env_id)
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

        return train, val, make_minari_env, dataset.observation_space, score
    directory = os.path.expanduser(args.dataset_dir)
    hint = (f"Make it with\n  python make_dataset.py {args.env_id} --dataset-dir {args.dataset_dir}"
            if args.env_id.endswith("-multigoal-v0") else
            "--source npz reads <dataset-dir>/<env-id>.npz with observations, actions and terminals.")  # fmt: skip
    train = load_npz(os.path.join(directory, f"{args.env_id}.npz"), hint)
    val_path = os.path.join(directory, f"{args.env_id}-val.npz")
    val = load_npz(val_path, hint) if os.path.exists(val_path) else None
    env_name = args.eval_env or (str(train["env_name"]) if "env_name" in train else None)
    if env_name is None:
        return train, val, None, None, None
    if env_name not in gymnasium.registry:
        close = difflib.get_close_matches(env_name, list(gymnasium.registry), n=3, cutoff=0.6)
        raise SystemExit(f"unknown gymnasium environment {env_name!r} to evaluate in" + (f"; did you mean {' or '.join(close)}?" if close else ""))

    def make_env():
        if "goal_ijs" in train and args.eval_env is None:  # make_dataset.py's multigoal maze task
            steps = int(train["max_episode_steps"])
            env = gymnasium.make(env_name, terminate_at_goal=False, add_noise_to_goal=False, max_episode_steps=steps, **render)
            return AnyGoalMaze(env, train["init_ij"], train["goal_ijs"])
        return gymnasium.make(env_name, **render)

    return train, val, make_env, None, None


@torch.no_grad()
def evaluate(policy, envs, obs_space, args: Args, device, step: int, video_dir: Optional[str], score_fn) -> Dict[str, float]:
    """Mean return, success rate (where the env reports success) and normalised score (where defined) over one
    episode per env. All envs run in lockstep: every exec_horizon steps the policy plans a chunk for all of them."""
    policy.eval()
    generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)  # not the training RNG
    flat = (lambda o: flatten_observation(obs_space, o)) if obs_space is not None else (lambda o: np.asarray(o, np.float32))
    first = []
    for i, env in enumerate(envs):  # fixed evaluation seeds, the same for every run and step
        np.random.seed(100_000 + i)  # OGBench draws start and goal noise from NumPy's global generator
        first.append(flat(env.reset(seed=100_000 + i)[0]))
    history = np.repeat(np.array(first)[:, None], args.obs_horizon, axis=1)  # [n, h, o]: padded with the first
    n = len(envs)
    active, returns, success, reports_success = np.ones(n, bool), np.zeros(n), np.zeros(n), False
    plan, frames = None, []
    for t in range(args.eval_max_steps or 10**9):
        if not active.any():
            break
        if t % args.exec_horizon == 0:
            idx = np.flatnonzero(active)
            obs = torch.as_tensor(history[idx], dtype=torch.float32, device=device)
            chunk = policy.act(obs, generator, args.noise_std, args.denoise).cpu().numpy()
            plan = np.zeros((n,) + chunk.shape[1:], np.float32)
            plan[idx] = chunk
        if video_dir is not None and active[0]:
            frames.append(envs[0].render())
        for i in np.flatnonzero(active):
            ob, reward, terminated, truncated, info = envs[i].step(plan[i, t % args.exec_horizon])
            returns[i] += reward
            if "success" in info:
                reports_success = True
                success[i] = max(success[i], float(info["success"]))
            history[i, :-1], history[i, -1] = history[i, 1:].copy(), flat(ob)
            if terminated or truncated:
                active[i] = False
    if video_dir is not None:
        save_video(frames, os.path.join(video_dir, f"step{step}.mp4"))
    policy.train()
    return {"return": float(returns.mean()), "success": float(success.mean()) if reports_success else math.nan,
            "score": float(np.mean(score_fn(returns))) if score_fn is not None else math.nan}  # fmt: skip


def save_video(frames, path: str):
    import imageio.v2 as imageio

    try:
        imageio.mimsave(path, frames, fps=30)
    except Exception:  # no ffmpeg backend: fall back to a GIF
        imageio.mimsave(path[:-4] + ".gif", frames, duration=1 / 30)


# ---------------------------------------------------------------------------------------------- policies


def mlp(sizes, activation, layer_norm: bool) -> nn.Sequential:
    layers = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), activation()] + ([nn.LayerNorm(sizes[i + 1])] if layer_norm else [])
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


class Policy(nn.Module):
    """What both policy classes share: observation normalisation and the action box, kept as buffers so that
    a checkpoint is a complete policy. Observations come in as histories [B, h, o], actions as chunks [B, k, a]
    scaled to [-1, 1]; act() returns chunks in the environment's units."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.chunk_shape = (args.action_horizon, action_dim)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("action_low", -torch.ones(action_dim))
        self.register_buffer("action_high", torch.ones(action_dim))

    def features(self, obs):
        return ((obs - self.obs_mean) / self.obs_std).flatten(1)

    def to_env_units(self, actions):
        return self.action_low + (actions.clamp(-1, 1) + 1) / 2 * (self.action_high - self.action_low)

    def forward(self, obs, actions):  # what a DistributedDataParallel wrapper calls
        return self.log_prob(obs, actions)


class FlowPolicy(Policy):
    """p(chunk | history): an encoder of the history (4 x 512, SiLU, LayerNorm) conditions a flow over the
    flattened chunk (k x action_dim dimensions)."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__(obs_dim, action_dim, args)
        self.encoder = mlp([args.obs_horizon * obs_dim] + [512] * 4 + [args.rep_dim], nn.SiLU, layer_norm=True)
        self.flow = ConditionalFlow(args.action_horizon * action_dim, args.rep_dim, args.num_blocks, args.hidden_dim)

    def log_prob(self, obs, actions):
        return self.flow.log_prob(actions.flatten(1), self.encoder(self.features(obs)))

    def act(self, obs, generator: torch.Generator, noise_std: float, use_denoise: bool):
        cond = self.encoder(self.features(obs))
        z = torch.randn(len(obs), self.flow.dim, generator=generator, device=obs.device)
        actions = self.flow.sample(cond, z)
        if use_denoise:
            actions = denoise(self.flow, actions, cond, noise_std)
        return self.to_env_units(actions.view(len(obs), *self.chunk_shape))


class GaussianPolicy(Policy):
    """A Gaussian MLP (3 x 512, GELU) over the flattened chunk, with a learned state-independent std."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__(obs_dim, action_dim, args)
        self.net = mlp([args.obs_horizon * obs_dim, 512, 512, 512, args.action_horizon * action_dim], nn.GELU, layer_norm=False)
        self.log_std = nn.Parameter(torch.zeros(args.action_horizon * action_dim))

    def log_prob(self, obs, actions):
        mean = self.net(self.features(obs))
        return (-0.5 * ((actions.flatten(1) - mean) / self.log_std.exp()).square() - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def act(self, obs, generator: torch.Generator, noise_std: float, use_denoise: bool):
        return self.to_env_units(self.net(self.features(obs)).view(len(obs), *self.chunk_shape))  # the mean


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
                ("total_steps", "batch_size", "log_interval", "eval_interval", "eval_episodes", "save_interval",
                 "obs_horizon", "action_horizon", "exec_horizon") if getattr(args, name) <= 0]  # fmt: skip
    if args.capture_video and not os.environ.get("DISPLAY") and os.environ.get("MUJOCO_GL") not in ("egl", "osmesa"):
        problems.append("--capture-video without a display needs headless MuJoCo rendering chosen before Python "
                        "starts: MUJOCO_GL=egl python nf_bc.py ... (or MUJOCO_GL=osmesa)")  # fmt: skip
    if args.exec_horizon > args.action_horizon:
        problems.append(f"--exec-horizon ({args.exec_horizon}) cannot exceed --action-horizon ({args.action_horizon}): "
                        f"the policy executes actions from the chunk it predicted")  # fmt: skip
    if args.noise_std < 0:
        problems.append("--noise-std must be >= 0")
    if args.eval_env is not None and args.source != "npz":
        problems.append("--eval-env is for --source npz (OGBench and Minari datasets name their own environment)")
    if problems:
        raise SystemExit("; ".join(problems))


def train_step(model, optimizer, scheduler, train, args: Args, rank: int, world: int, rng) -> torch.Tensor:
    """One AdamW step on -log p(chunk + noise | history). Every process draws the same global batch and noise
    from the run's seed and trains on its own share; DDP averages the gradients, so N processes take the same
    steps as one process with the whole batch. Returns this process's loss."""
    obs, actions = train.sample(args.batch_size, rng)
    actions = actions + args.noise_std * torch.randn_like(actions)
    share = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)
    loss = -model(obs[share], actions[share]).mean()
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
        name = args.env_id.replace("/", "-")
        run_dir = os.path.join(args.output_dir, f"{name}__{args.exp_name}__{args.seed}__{int(time.time())}")
    check_args(args)
    rank, world, device = init_distributed(args)
    is_main = rank == 0  # the only process that evaluates, logs and saves
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    train_data, val_data, make_env, obs_space, score_fn = load_task(args)
    envs = [make_env() for _ in range(args.eval_episodes if is_main else 1)] if make_env is not None else []
    if envs and obs_space is None:
        obs_space = envs[0].observation_space
    if envs and not isinstance(envs[0].action_space, gymnasium.spaces.Box):
        raise SystemExit(f"{args.env_id}: the action space is {envs[0].action_space}; the policies model continuous (Box) actions")
    if envs and train_data["actions"].shape[1] != int(np.prod(envs[0].action_space.shape)):
        raise SystemExit(f"{args.env_id}: the demonstrations have {train_data['actions'].shape[1]}-D actions, the "
                         f"environment {envs[0].action_space.shape}")  # fmt: skip
    if envs and np.all(np.isfinite(envs[0].action_space.low)) and np.all(np.isfinite(envs[0].action_space.high)):
        low, high = envs[0].action_space.low.astype(np.float32), envs[0].action_space.high.astype(np.float32)
    else:  # no bounded box to act in: the demonstrations' range
        low, high = train_data["actions"].min(0), train_data["actions"].max(0) + 1e-6
    for data in (train_data, val_data):
        if data is not None:
            data["actions"] = scale_actions(data["actions"], low, high)
    train = ChunkDataset(train_data, args.obs_horizon, args.action_horizon, device)
    val = ChunkDataset(val_data, args.obs_horizon, args.action_horizon, device) if val_data is not None else None
    obs_dim, action_dim = train.observations.shape[1], train.actions.shape[1]

    policy = (FlowPolicy if args.policy == "flow" else GaussianPolicy)(obs_dim, action_dim, args).to(device)
    policy.obs_mean.copy_(train.observations.mean(0))
    policy.obs_std.copy_(train.observations.std(0).clamp_min(1e-3))
    policy.action_low.copy_(torch.as_tensor(low))
    policy.action_high.copy_(torch.as_tensor(high))
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
        video_dir = os.path.join(run_dir, "videos") if args.capture_video and envs else None
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
        fields = ["step", "wall_time", "val_nll", "return", "success", "score"]
        kept = []  # on resume, the evaluations up to the checkpoint (later ones are redone, as purge_step does)
        if start_step and os.path.exists(csv_path):
            with open(csv_path, newline="") as f:
                kept = [row for row in csv.reader(f)][1:]
            kept = [row for row in kept if int(row[0]) <= start_step]
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerows([fields] + kept)
        print(f"{args.policy} policy, {sum(p.numel() for p in policy.parameters()):,} parameters, {train.size:,} "
              f"transitions, device {device}" + (f" x {world} processes" if world > 1 else "") + f"; writing to {run_dir}")  # fmt: skip
        if not envs:
            print("no environment to evaluate in (give --eval-env): evaluations report the validation NLL only")
        if val is None:
            print("no validation split (an -val.npz file, or 10+ Minari episodes): val_nll is nan")


    if val is not None:  # one fixed validation batch
        val_obs, val_actions = val.sample(1_024, np.random.default_rng(0))
        val_noise = torch.randn(val_actions.shape, generator=torch.Generator(device).manual_seed(0), device=device)
        val_actions = val_actions + args.noise_std * val_noise

    def validation_nll():
        if val is None:
            return math.nan
        with torch.no_grad():
            return -policy.log_prob(val_obs, val_actions).mean().item()

    def run_evaluation(step):
        stats = dict.fromkeys(("return", "success", "score"), math.nan)
        if envs:
            stats = evaluate(policy, envs, obs_space, args, device, step, video_dir, score_fn)
        stats["val_nll"] = validation_nll()
        with open(csv_path, "a", newline="") as f:
            csv.writer(f).writerow([step, round(time.time() - start_time, 1)] + [stats[k] for k in fields[2:]])
        for k, v in stats.items():
            if not math.isnan(v):
                writer.add_scalar(f"eval/{k}", v, step)
        print(f"step {step}: " + ", ".join(f"{k} {stats[k]:.3f}" for k in fields[2:] if not math.isnan(stats[k])))

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
