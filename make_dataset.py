"""Regenerate OGBench datasets locally with OGBench's own oracles, in OGBench's file format.

For machines that cannot reach OGBench's dataset server. Follows the recipe of OGBench's public
data_gen_scripts (episode counts and lengths, oracles, noise) with the oracles that ship in the `ogbench`
package, and writes <name>.npz and <name>-val.npz (train and validation episodes, 10:1) into an OGBench
dataset directory, so that the unchanged `ogbench.make_env_and_datasets(name, dataset_dir=...)` loads them,
singletask names included (qpos, qvel and button_states are stored).

    python make_dataset.py pointmaze-medium-navigate-v0                      # OGBench's size, ~/.ogbench/data
    python make_dataset.py cube-single-play-v0 --num-transitions 100_000 --dataset-dir data
    python make_dataset.py pointmaze-medium-multigoal-v0 --dataset-dir data    # multimodal demonstrations

`pointmaze-medium-multigoal-v0` is not an OGBench dataset but an imitation task built from OGBench's maze and
its oracle: every episode starts in the same cell and drives to one of several goal cells, chosen at random,
all the same number of cells away along different routes. The file also records the environment, the
start and the goal cells, and nf_bc.py evaluates a policy by reaching any of the goals.

Episodes are seeded one by one from --seed, so on one machine the files are the same for any --num-workers
(across machines the simulation's floating point may differ: see docs/datasets.md). Files are
written under a temporary name and renamed, so a killed run never leaves a file that loads.
"""

import difflib
import glob
import hashlib
import math
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from typing import Dict, Optional

import numpy as np
import tyro
from tqdm import tqdm

DEFAULT_DATASET_DIR = "~/.ogbench/data"


@dataclass
class Args:
    env_name: tyro.conf.Positional[str]
    """OGBench dataset name, e.g. pointmaze-medium-navigate-v0 (a singletask name maps to its dataset)"""
    dataset_dir: str = DEFAULT_DATASET_DIR
    """directory to write <name>.npz and <name>-val.npz into (OGBench's default)"""
    num_transitions: Optional[int] = None
    """training transitions (rounded up to whole episodes); default: OGBench's published size"""
    num_episodes: Optional[int] = None
    """training episodes (instead of --num-transitions; validation gets a tenth)"""
    episode_steps: Optional[int] = None
    """steps per episode; default: OGBench's (change it only for quick tests)"""
    seed: int = 0
    """random seed"""
    num_workers: int = 0
    """processes that collect episodes (0: one per CPU core, at most 8)"""
    overwrite: bool = False
    """replace existing files"""


@dataclass(frozen=True)
class Recipe:
    env_id: str  # the gymnasium id of the environment
    dataset_type: str  # navigate | stitch | multigoal (mazes), play | noisy (manipulation)
    num_episodes: int  # training episodes; validation gets a tenth of this
    episode_steps: int
    noise: float = 0.0  # mazes: Gaussian action noise; manipulation: oracle noise
    p_random_action: float = 0.0  # noisy manipulation datasets


# multigoal imitation tasks: the start cell and the goal cells, all the same number of cells from the start
# (breadth-first). In pointmaze-medium the start lies in a corridor between two T-junctions: the demonstrations
# split at the start (left or right) and again at the junction (up or down), 4 cells from the start each way.
MULTIGOAL_CELLS = {"medium": ((3, 3), ((1, 1), (5, 1), (2, 6), (4, 6)))}


def _recipes() -> Dict[str, Recipe]:
    """OGBench's data_gen_scripts/commands.sh, for the datasets whose oracles ship in the package."""
    recipes = {}
    for maze in ("medium", "large", "giant", "teleport"):
        nav = (500, 2001) if maze == "giant" else (1000, 1001)
        recipes[f"pointmaze-{maze}-navigate-v0"] = Recipe(f"pointmaze-{maze}-v0", "navigate", *nav, noise=0.5)
        recipes[f"pointmaze-{maze}-stitch-v0"] = Recipe(f"pointmaze-{maze}-v0", "stitch", 5000, 201, noise=0.5)
    for maze in MULTIGOAL_CELLS:  # not OGBench's: imitation demonstrations (episodes end at the goal)
        recipes[f"pointmaze-{maze}-multigoal-v0"] = Recipe(f"pointmaze-{maze}-v0", "multigoal", 500, 300, noise=0.2)
    for env in ("cube-single", "cube-double", "scene", "puzzle-3x3"):
        recipes[f"{env}-play-v0"] = Recipe(f"{env}-v0", "play", 1000, 1001, noise=0.1)
        p_random = 0.2 if env.startswith("puzzle") else 0.1
        recipes[f"{env}-noisy-v0"] = Recipe(f"{env}-v0", "noisy", 1000, 1001, noise=0.1, p_random_action=p_random)
    return recipes


RECIPES = _recipes()
NEEDS_EXPERTS = ("antmaze", "humanoidmaze", "antsoccer")  # collected with trained policies OGBench does not ship


def dataset_name_of(name: str) -> str:
    """The dataset file a name reads: singletask names drop 'singletask' and 'taskN' as OGBench does."""
    parts = name.split("-")
    if "singletask" in parts:
        pos = parts.index("singletask")
        parts = parts[:pos] + parts[-1:]
    return "-".join(parts)


def recipe_for(name: str) -> Recipe:
    """The recipe for a dataset or singletask name, or a ValueError that says what to do instead."""
    dataset = dataset_name_of(name)
    if dataset in RECIPES:
        return RECIPES[dataset]
    if any(dataset.startswith(prefix) or dataset.startswith("visual-" + prefix) for prefix in NEEDS_EXPERTS):
        raise ValueError(
            f"{dataset} was collected by OGBench with trained expert policies that the ogbench package does not "
            f"ship, so it cannot be regenerated here. On a machine with network access run\n"
            f"  python -c \"import ogbench; ogbench.download_datasets(['{dataset}'], '{DEFAULT_DATASET_DIR}')\"\n"
            f"and copy {dataset}.npz and {dataset}-val.npz into your --dataset-dir."
        )
    close = difflib.get_close_matches(dataset, RECIPES, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ValueError(f"Unknown dataset {name!r}.{hint} Datasets this tool makes: {', '.join(sorted(RECIPES))}.")


# ---------------------------------------------------------------------------------------------- mazes


def maze_cells(maze_map: np.ndarray):
    """All free cells, and the free cells that are not straight hallway pieces (OGBench's goal cells)."""
    free, vertex = [], []
    for i, j in zip(*np.nonzero(maze_map == 0)):
        free.append((int(i), int(j)))
        vertical = (
            maze_map[i - 1, j] == 0 and maze_map[i + 1, j] == 0 and maze_map[i, j - 1] == 1 and maze_map[i, j + 1] == 1
        )
        horizontal = (
            maze_map[i, j - 1] == 0 and maze_map[i, j + 1] == 0 and maze_map[i - 1, j] == 1 and maze_map[i + 1, j] == 1
        )
        if not (vertical or horizontal):
            vertex.append((int(i), int(j)))
    return free, vertex


def cells_at_distance(maze_map: np.ndarray, start, steps: int):
    """Free cells exactly `steps` moves from `start` (breadth-first search)."""
    dist = {start: 0}
    frontier, found = [start], []
    while frontier:
        nxt = []
        for i, j in frontier:
            for ni, nj in ((i - 1, j), (i, j - 1), (i + 1, j), (i, j + 1)):
                inside = 0 <= ni < maze_map.shape[0] and 0 <= nj < maze_map.shape[1]
                if inside and maze_map[ni, nj] == 0 and (ni, nj) not in dist:
                    dist[(ni, nj)] = dist[(i, j)] + 1
                    (found if dist[(ni, nj)] == steps else nxt).append((ni, nj))
        frontier = nxt
    return found


def oracle_direction(env, final_approach: bool = False) -> np.ndarray:
    """Unit vector from the agent toward OGBench's BFS subgoal (the centre of the next cell on the way).

    In the goal's own cell that subgoal is the cell centre, while goals are jittered around it, so OGBench's
    data relies on the action noise to touch the goal. `final_approach` steers to the goal itself there
    (for noise-free control); the datasets keep OGBench's rule.
    """
    maze, xy = env.unwrapped, env.unwrapped.get_xy()
    subgoal, _ = maze.get_oracle_subgoal(xy, maze.cur_goal_xy)
    if final_approach and maze.xy_to_ij(xy) == maze.xy_to_ij(maze.cur_goal_xy):
        subgoal = maze.cur_goal_xy
    direction = subgoal - xy
    return direction / (np.linalg.norm(direction) + 1e-6)


def maze_episode(env, recipe: Recipe, rng: np.random.Generator, cells) -> Dict[str, list]:
    """One pointmaze episode: drive toward BFS subgoals with Gaussian action noise; on 'navigate' a new
    goal is drawn whenever the current one is reached, on 'stitch' the goal is 4 cells from the start."""
    free, vertex = cells
    init_ij = free[rng.integers(len(free))]
    if recipe.dataset_type == "stitch":
        near = cells_at_distance(env.unwrapped.maze_map, init_ij, 4)
        goal_ij = near[rng.integers(len(near))] if near else init_ij
    else:
        goal_ij = vertex[rng.integers(len(vertex))]
    ob, _ = env.reset(options=dict(task_info=dict(init_ij=init_ij, goal_ij=goal_ij)))
    episode = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
    done = False
    while not done:
        action = np.clip(oracle_direction(env) + rng.normal(0.0, recipe.noise, 2), -1, 1)  # the point agent's policy
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if info["success"] and recipe.dataset_type == "navigate":
            env.unwrapped.set_goal(vertex[rng.integers(len(vertex))])
        for key, value in (
            ("observations", ob),
            ("actions", action),
            ("terminals", done),
            ("qpos", info["prev_qpos"]),
            ("qvel", info["prev_qvel"]),
        ):
            episode[key].append(value)
        ob = next_ob
    return episode


def multigoal_episode(env, recipe: Recipe, rng: np.random.Generator, cells) -> Dict[str, list]:
    """One demonstration: from the start cell to one goal cell chosen uniformly, steering into the goal
    itself (noise std recipe.noise); the episode ends when the goal is reached."""
    start, goals = cells
    goal_ij = goals[rng.integers(len(goals))]
    ob, _ = env.reset(options=dict(task_info=dict(init_ij=start, goal_ij=goal_ij)))
    episode = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
    done = False
    while not done:
        action = np.clip(oracle_direction(env, final_approach=True) + rng.normal(0.0, recipe.noise, 2), -1, 1)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        for key, value in (
            ("observations", ob),
            ("actions", action),
            ("terminals", done),
            ("qpos", info["prev_qpos"]),
            ("qvel", info["prev_qvel"]),
        ):
            episode[key].append(value)
        ob = next_ob
    return episode


def multigoal_metadata(recipe: Recipe) -> Dict[str, np.ndarray]:
    """What nf_bc.py needs to evaluate in the task: the environment, the start and the goal cells."""
    start, goals = MULTIGOAL_CELLS[recipe.env_id.split("-")[1]]
    return {
        "env_name": np.array(recipe.env_id),
        "init_ij": np.array(start),
        "goal_ijs": np.array(goals),
        "max_episode_steps": np.array(recipe.episode_steps),
    }


# ----------------------------------------------------------------------------------------- manipulation


def make_oracles(env, recipe: Recipe):
    """OGBench's plan oracles ('play') or Markov oracles ('noisy'), by the kind of task they solve."""
    if recipe.dataset_type == "play":
        from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle as Button
        from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle as Cube
        from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle as Drawer
        from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle as Window

        kw = dict(env=env, noise=recipe.noise, noise_smoothing=0.5)
        cube_kw = kw
    else:
        from ogbench.manipspace.oracles.markov.button_markov import ButtonMarkovOracle as Button
        from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle as Cube
        from ogbench.manipspace.oracles.markov.drawer_markov import DrawerMarkovOracle as Drawer
        from ogbench.manipspace.oracles.markov.window_markov import WindowMarkovOracle as Window

        kw = dict(env=env, min_norm=0.4)
        cube_kw = dict(kw, max_step=100) if recipe.env_id.startswith("scene") else kw
    if recipe.env_id.startswith("cube"):
        return {"cube": Cube(**kw)}
    if recipe.env_id.startswith("scene"):
        return {"cube": Cube(**cube_kw), "button": Button(**kw), "drawer": Drawer(**kw), "window": Window(**kw)}
    return {"button": Button(**kw, gripper_always_closed=True)}  # puzzle


def stack_probability(env_id: str, rng: np.random.Generator) -> float:
    """How often the oracle is asked to stack cubes (OGBench's per-episode choice)."""
    if "single" in env_id:
        return 0.0
    if "double" in env_id:
        return rng.uniform(0.0, 0.25)
    return 0.5


def scene_is_healthy(qpos: np.ndarray) -> bool:
    """OGBench's check that the cube stays visible unless it is in the drawer."""
    cube = qpos[:, 14:17]
    too_far_right = (cube[:, 1] >= 0.29).any()
    too_far_left = ((cube[:, 1] <= -0.3) & ((cube[:, 2] < 0.06) | (cube[:, 2] > 0.08))).any()
    return not (too_far_right or too_far_left)


def manipulation_episode(env, recipe: Recipe, rng: np.random.Generator, oracles) -> Dict[str, list]:
    """One play/noisy episode: the oracle solves task after task that the environment proposes."""
    ob, info = env.reset()
    p_stack = stack_probability(recipe.env_id, rng)
    xi = rng.uniform(0, recipe.noise)  # per-episode action noise of the Markov oracles
    agent = oracles[info["privileged/target_task"]]
    agent.reset(ob, info)
    keys = ["observations", "actions", "terminals", "qpos", "qvel"]
    has_buttons = hasattr(env.unwrapped, "_cur_button_states")
    episode = {k: [] for k in keys + (["button_states"] if has_buttons else [])}
    done = False
    while not done:
        if rng.random() < recipe.p_random_action:
            action = rng.uniform(-1, 1, env.action_space.shape)
        else:
            action = np.array(agent.select_action(ob, info))
            if recipe.dataset_type == "noisy":
                action = action + rng.normal(0, [xi, xi, xi, xi * 3, xi * 10], action.shape)
        action = np.clip(action, -1, 1)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if agent.done:  # the environment proposes the next task
            agent_ob, agent_info = env.unwrapped.set_new_target(p_stack=p_stack)
            agent = oracles[agent_info["privileged/target_task"]]
            agent.reset(agent_ob, agent_info)
        episode["observations"].append(ob)
        episode["actions"].append(action)
        episode["terminals"].append(done)
        episode["qpos"].append(info["prev_qpos"])
        episode["qvel"].append(info["prev_qvel"])
        if has_buttons:
            episode["button_states"].append(info["prev_button_states"])
        ob = next_ob
    return episode


# ------------------------------------------------------------------------------------------ collection

_worker = {}  # per-process environment and helpers, built once by _init_worker


def _init_worker(recipe: Recipe, episode_steps: int):
    """Builds the process's environment and helpers; a failure is kept for _collect to raise (a failing initializer
    makes multiprocessing.Pool restart its workers forever, so the run would hang instead of stopping)."""
    _worker.clear()  # in-process collection (one worker) may follow an earlier run
    try:
        _build_worker(recipe, episode_steps)
    except Exception as err:
        _worker["error"] = f"{type(err).__name__}: {err}"


def _build_worker(recipe: Recipe, episode_steps: int):
    import gymnasium
    import ogbench  # noqa: F401  (registers the environments)

    kwargs = dict(terminate_at_goal=False, max_episode_steps=episode_steps)
    if recipe.dataset_type in ("play", "noisy"):
        kwargs["mode"] = "data_collection"
    if recipe.dataset_type == "multigoal":  # demonstrations end at the goal, which is the cell centre
        kwargs.update(terminate_at_goal=True, add_noise_to_goal=False)
    env = gymnasium.make(recipe.env_id, **kwargs)
    _worker.update(env=env, recipe=recipe)
    if recipe.dataset_type in ("play", "noisy"):
        _worker["oracles"] = make_oracles(env, recipe)
    elif recipe.dataset_type == "multigoal":
        _worker["multigoal"] = MULTIGOAL_CELLS[recipe.env_id.split("-")[1]]
    else:
        _worker["cells"] = maze_cells(env.unwrapped.maze_map)


def _collect(job) -> Dict[str, np.ndarray]:
    """Collect episode `index` with its own seed (the same whichever process runs it)."""
    if "error" in _worker:
        raise ValueError(f"could not set up the environment of a collecting process ({_worker['error']})")
    seed, index = job
    env, recipe = _worker["env"], _worker["recipe"]
    for attempt in range(100):
        episode_seed = int(np.random.SeedSequence([seed, index, attempt]).generate_state(1)[0])
        rng = np.random.default_rng(episode_seed)
        np.random.seed(episode_seed)  # OGBench's environments and oracles draw from the global generator
        env.action_space.seed(episode_seed)
        env.reset(seed=episode_seed)
        if "oracles" in _worker:
            episode = manipulation_episode(env, recipe, rng, _worker["oracles"])
            if recipe.env_id.startswith("scene") and not scene_is_healthy(np.array(episode["qpos"])):
                continue  # OGBench retries such episodes
        elif "multigoal" in _worker:
            episode = multigoal_episode(env, recipe, rng, _worker["multigoal"])
        else:
            episode = maze_episode(env, recipe, rng, _worker["cells"])
        return episode
    raise RuntimeError(f"episode {index}: no healthy episode in 100 attempts")


DTYPES = {"terminals": bool, "button_states": np.int64}  # everything else float32, as OGBench stores it


def to_arrays(episodes) -> Dict[str, np.ndarray]:
    return {
        k: np.concatenate([np.asarray(ep[k], dtype=DTYPES.get(k, np.float32)) for ep in episodes]) for k in episodes[0]
    }


def save_atomic(path: str, arrays: Dict[str, np.ndarray]):
    """np.savez_compressed to a temporary name in the same directory, then an atomic rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_directory(directory: str, name: str):
    """Before any episode is collected: the directory can be written to, and temporary files left by a killed
    run of this tool (its pid is in their name) are removed."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".{name}.probe-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as err:  # a file where the directory should be, no permission, a full disk, ...
        raise ValueError(f"--dataset-dir {directory}: cannot write there ({type(err).__name__}: {err})")
    for stale in glob.glob(os.path.join(directory, f"{name}*.npz.tmp-*")):
        pid = stale.rsplit("-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether its writer is still running
        except ProcessLookupError:
            os.remove(stale)
            print(f"removed {stale}, left by a run that was killed")
        except PermissionError:  # another user's live process
            pass


def make_dataset(args: Args) -> Dict[str, str]:
    """Generate the train and validation files; returns their paths."""
    recipe = recipe_for(args.env_name)
    name = dataset_name_of(args.env_name)
    episode_steps = args.episode_steps or recipe.episode_steps
    if episode_steps < 2 or any(n is not None and n < 1 for n in (args.num_transitions, args.num_episodes)):
        raise ValueError("--episode-steps must be >= 2, --num-transitions and --num-episodes >= 1")
    if args.num_transitions is not None and args.num_episodes is not None:
        raise ValueError("give --num-transitions or --num-episodes, not both")
    num_train = args.num_episodes or recipe.num_episodes
    if args.num_transitions is not None:
        num_train = math.ceil(args.num_transitions / episode_steps)
    num_val = max(1, num_train // 10)
    directory = os.path.expanduser(args.dataset_dir)
    paths = {"train": os.path.join(directory, f"{name}.npz"), "val": os.path.join(directory, f"{name}-val.npz")}
    if not args.overwrite and all(os.path.exists(p) for p in paths.values()):
        print(f"{paths['train']} and its -val file exist; nothing to do (--overwrite replaces them)")
        return paths
    check_directory(directory, name)
    workers = args.num_workers or min(os.cpu_count() or 1, 8)
    jobs = [(args.seed, i) for i in range(num_train + num_val)]
    up_to = "up to " if recipe.dataset_type == "multigoal" else ""
    print(
        f"{name}: {num_train} + {num_val} (val) episodes x {up_to}{episode_steps} steps of {recipe.env_id} "
        f"({recipe.dataset_type}), seed {args.seed}, {workers} worker(s) -> {directory}"
    )
    start = time.time()
    episodes = []
    with tqdm(total=len(jobs), unit="episode", smoothing=0.05) as bar:
        if workers == 1:
            _init_worker(recipe, episode_steps)
            results = map(_collect, jobs)
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (recipe, episode_steps))
            results = pool.imap(_collect, jobs)
        for episode in results:
            episodes.append(episode)
            bar.update()
        if workers > 1:
            pool.close()
            pool.join()
    train, val = to_arrays(episodes[:num_train]), to_arrays(episodes[num_train:])
    if recipe.dataset_type == "multigoal":
        metadata = multigoal_metadata(replace(recipe, episode_steps=episode_steps))
        train.update(metadata)
        val.update(metadata)
    save_atomic(paths["val"], val)  # val first: a train file on disk implies its val file is complete
    save_atomic(paths["train"], train)
    elapsed = time.time() - start
    total = len(train["actions"]) + len(val["actions"])
    print(
        f"wrote {len(train['actions']):,} train + {len(val['actions']):,} val transitions in {elapsed:.0f} s "
        f"({total / elapsed:,.0f}/s) to {paths['train']}"
    )
    with open(paths["train"], "rb") as f:  # to check that another machine made the same file (it may not)
        print(f"md5 of the training file: {hashlib.file_digest(f, 'md5').hexdigest()}")
    return paths


def main(args: Args):
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill by SIGTERM cleans its temporary files too
    try:
        make_dataset(args)
    except ValueError as err:
        raise SystemExit(f"make_dataset.py: {err}")


if __name__ == "__main__":
    main(tyro.cli(Args))
