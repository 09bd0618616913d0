"""make_dataset.py: tiny OGBench datasets that the unchanged ogbench loader reads, and the oracle itself."""

import dataclasses
import os
import subprocess
import sys

import gymnasium
import numpy as np
import ogbench
import pytest

import make_dataset
from make_dataset import Args, oracle_direction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(tmp_path, name, **kwargs):
    kwargs.setdefault("num_workers", 1)
    return make_dataset.make_dataset(Args(env_name=name, dataset_dir=str(tmp_path), **kwargs))


def check_raw_episodes(path, episode_steps, num_episodes):
    raw = np.load(path)
    assert raw["terminals"].dtype == bool and raw["observations"].dtype == np.float32
    assert len(raw["terminals"]) == episode_steps * num_episodes
    ends = np.flatnonzero(raw["terminals"])
    np.testing.assert_array_equal(ends, np.arange(1, num_episodes + 1) * episode_steps - 1)
    return raw


def test_tiny_pointmaze_loads_through_ogbench(tmp_path):
    paths = make(tmp_path, "pointmaze-medium-navigate-v0", num_transitions=5_000)
    check_raw_episodes(paths["train"], 1001, 5)
    check_raw_episodes(paths["val"], 1001, 1)
    env, train, val = ogbench.make_env_and_datasets(
        "pointmaze-medium-navigate-v0", dataset_dir=str(tmp_path), add_info=True
    )
    # OGBench drops the last observation of each episode to build next_observations
    assert train["observations"].shape == (5 * 1000, 2) and val["observations"].shape == (1000, 2)
    assert train["actions"].shape == (5000, 2) and np.abs(train["actions"]).max() <= 1
    assert train["next_observations"].shape == (5000, 2) and train["terminals"].sum() == 5
    # qpos is stored for the same time step as the observation (singletask rewards depend on it)
    np.testing.assert_allclose(train["observations"], train["qpos"][:, :2], atol=1e-6)
    assert env.observation_space.shape == (2,)
    successes = []
    for task in range(1, 6):
        _, train, _ = ogbench.make_env_and_datasets(
            f"pointmaze-medium-navigate-singletask-task{task}-v0", dataset_dir=str(tmp_path)
        )
        assert set(np.unique(train["rewards"])) <= {-1.0, 0.0}
        np.testing.assert_array_equal(train["masks"], -train["rewards"])
        successes.append((train["rewards"] == 0).sum())
    print(f"singletask successes per task in 5 navigate episodes: {successes}")
    assert sum(s > 0 for s in successes) >= 2  # navigate data passes through the task goals: rewards vary


def test_tiny_cube_single_loads_through_ogbench(tmp_path):
    paths = make(tmp_path, "cube-single-play-v0", num_transitions=400, episode_steps=200)
    check_raw_episodes(paths["train"], 200, 2)
    check_raw_episodes(paths["val"], 200, 1)
    _, train, val = ogbench.make_env_and_datasets("cube-single-play-v0", dataset_dir=str(tmp_path), add_info=True)
    assert train["observations"].shape == (398, 28) and train["actions"].shape == (398, 5)
    assert val["observations"].shape == (199, 28)
    assert train["qpos"].dtype == np.float32 and train["qvel"].shape[0] == 398
    # the cube position in the observation (scaled around the table centre) is the cube's qpos
    cube_from_ob = train["observations"][:, 19:22] / 10 + np.array([0.425, 0.0, 0.0])
    np.testing.assert_allclose(cube_from_ob, train["qpos"][:, 14:17], atol=1e-5)
    assert np.abs(np.diff(train["qpos"][:, 14:17], axis=0)).max() > 1e-3  # the oracle moves the cube
    _, train, _ = ogbench.make_env_and_datasets("cube-single-play-singletask-task2-v0", dataset_dir=str(tmp_path))
    # Rewards are -1 + [cube within 4 cm of the task's goal]; tiny play data almost never places the cube
    # there, so variation is checked on scene below and on the full datasets (README).
    assert set(np.unique(train["rewards"])) <= {-1.0, 0.0}


def test_tiny_scene_singletask_rewards_vary(tmp_path):
    make(tmp_path, "scene-play-v0", num_transitions=300, episode_steps=300)
    _, train, _ = ogbench.make_env_and_datasets(
        "scene-play-singletask-task1-v0", dataset_dir=str(tmp_path), add_info=True
    )
    assert train["button_states"].dtype == np.int64 and train["button_states"].shape == (299, 2)
    rewards = train["rewards"]
    assert rewards.min() >= -5 and rewards.max() <= 0  # 5 objects: cube, 2 buttons, drawer, window
    assert len(np.unique(rewards)) > 1


def test_same_files_for_any_number_of_workers(tmp_path):
    one = make(tmp_path / "one", "pointmaze-medium-stitch-v0", num_transitions=400, num_workers=1)
    two = make(tmp_path / "two", "pointmaze-medium-stitch-v0", num_transitions=400, num_workers=2)
    a, b = np.load(one["train"]), np.load(two["train"])
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])
    other_seed = make(tmp_path / "seed1", "pointmaze-medium-stitch-v0", num_transitions=400, seed=1)
    assert not np.array_equal(np.load(other_seed["train"])["actions"], a["actions"])


def test_oracle_without_noise_solves_the_evaluation_tasks():
    """OGBench's BFS rule brings the agent into every goal cell; with the final approach inside that cell
    (goals are jittered off the cell centre) it reaches the goals themselves."""
    env = gymnasium.make("pointmaze-medium-v0")
    maze = env.unwrapped
    reached_cell, successes = [], []
    for task in range(1, 6):
        for final_approach in (False, True):
            env.reset(seed=task, options=dict(task_id=task))
            in_cell = success = False
            for _ in range(1000):
                _, _, terminated, truncated, info = env.step(oracle_direction(env, final_approach))
                in_cell = in_cell or maze.xy_to_ij(maze.get_xy()) == maze.xy_to_ij(maze.cur_goal_xy)
                success = success or bool(info["success"])
                if terminated or truncated:
                    break
            (successes if final_approach else reached_cell).append(success if final_approach else in_cell)
    print(
        f"noise-free oracle on pointmaze-medium tasks 1-5: goal cell reached {reached_cell}, goal reached {successes}"
    )
    assert all(reached_cell)
    assert np.mean(successes) >= 0.9


def test_unknown_and_expert_datasets_are_explained():
    with pytest.raises(ValueError, match="Did you mean pointmaze-medium-navigate-v0"):
        make_dataset.recipe_for("pointmaze-medum-navigate-v0")
    with pytest.raises(ValueError, match="(?s)expert policies.*download_datasets"):
        make_dataset.recipe_for("antmaze-large-navigate-v0")
    assert (
        make_dataset.recipe_for("cube-single-play-singletask-task3-v0") is make_dataset.RECIPES["cube-single-play-v0"]
    )


def test_cli_errors_are_one_line_not_a_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "make_dataset.py", "humanoidmaze-medium-navigate-v0", "--dataset-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "cannot be regenerated here" in out.stderr


def test_existing_files_are_kept_and_a_failed_write_leaves_nothing(tmp_path):
    paths = make(tmp_path, "pointmaze-medium-stitch-v0", num_transitions=200)
    before = os.path.getmtime(paths["train"])
    make(tmp_path, "pointmaze-medium-stitch-v0", num_transitions=200)
    assert os.path.getmtime(paths["train"]) == before
    target = str(tmp_path / "broken.npz")
    with pytest.raises(Exception):
        make_dataset.save_atomic(target, {"x": np.zeros(3), "bad": ValueLike()})
    assert not any("broken" in f for f in os.listdir(tmp_path))


class ValueLike:
    """An object numpy cannot write without pickling (savez refuses pickles): the write fails half-way."""

    def __array__(self, *args, **kwargs):
        raise RuntimeError("simulated failure while writing")


def test_multigoal_demonstrations_split_between_the_goals(tmp_path):
    paths = make(tmp_path, "pointmaze-medium-multigoal-v0", num_episodes=40)
    raw = np.load(paths["train"])
    assert str(raw["env_name"]) == "pointmaze-medium-v0" and int(raw["max_episode_steps"]) == 300
    env = gymnasium.make("pointmaze-medium-v0")
    start_xy = env.unwrapped.ij_to_xy(tuple(raw["init_ij"]))
    goal_xys = np.array([env.unwrapped.ij_to_xy(tuple(g)) for g in raw["goal_ijs"]])
    ends = np.flatnonzero(raw["terminals"])
    starts = np.r_[0, ends[:-1] + 1]
    assert len(ends) == 40 and ends[-1] == len(raw["terminals"]) - 1
    # every episode starts in the start cell (OGBench jitters it by up to 1 per axis) and ends at one goal
    assert np.abs(raw["observations"][starts] - start_xy).max() <= 1.0 + 1e-4
    final_distance = np.linalg.norm(raw["observations"][ends][:, None] - goal_xys, axis=-1)
    assert final_distance.min(1).max() < 1.5  # the last stored observation is one step before the goal is reached
    reached = final_distance.argmin(1)
    assert len(np.unique(reached)) == len(goal_xys)  # the demonstrations use every goal (40 episodes, 4 goals)
    assert (np.diff(np.r_[-1, ends]) < 300).all()  # demonstrations finish well inside the time limit


def test_episode_count_and_transition_count_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        make(tmp_path, "pointmaze-medium-multigoal-v0", num_episodes=2, num_transitions=100)


def test_an_unwritable_directory_is_refused_before_collecting_and_stale_temporary_files_go(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    args = make_dataset.Args(
        env_name="pointmaze-medium-navigate-v0",
        dataset_dir=str(tmp_path / "a_file"),
        num_transitions=500,
        episode_steps=250,
        num_workers=1,
    )
    with pytest.raises(SystemExit, match="--dataset-dir .*a_file: cannot write there"):
        make_dataset.main(args)
    assert "episode" not in capsys.readouterr().out  # nothing was collected
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"pointmaze-medium-navigate-v0.npz.tmp-{gone.pid}"  # what a killed run leaves
    stale.write_bytes(b"half a file")
    make_dataset.main(dataclasses.replace(args, dataset_dir=str(tmp_path)))
    assert not stale.exists() and "left by a run that was killed" in capsys.readouterr().out


def test_a_collecting_process_that_cannot_start_stops_the_run_with_its_reason(tmp_path):
    """A worker whose set-up fails (here: scipy, which OGBench's oracles import, is broken) ends the run with one
    line; multiprocessing.Pool would otherwise restart such workers forever and the run would hang."""
    broken = tmp_path / "broken" / "scipy"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('scipy is broken on purpose')\n")
    out = subprocess.run(
        [sys.executable, "make_dataset.py", "cube-single-play-v0", "--dataset-dir", str(tmp_path / "data")]
        + ["--num-transitions", "2000", "--num-workers", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=f"{tmp_path / 'broken'}{os.pathsep}{ROOT}"),
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "could not set up the environment of a collecting process (ImportError: scipy is broken" in out.stderr
