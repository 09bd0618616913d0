"""Bad data is refused when it is loaded, before a run directory is made, in one line that names the file, the
key, the first bad row and the fix; never a traceback from inside a library, never a wrong number."""

import dataclasses
import os
import shutil
import subprocess

import numpy as np
import pytest
import tyro

import nf_bc
import nf_gcbc
import nf_rlbc

QUICK = ["--total-steps", "2", "--batch-size", "8", "--eval-episodes", "1", "--eval-max-steps", "2",
         "--num-blocks", "2", "--hidden-dim", "16", "--rep-dim", "8", "--no-cuda"]  # fmt: skip
ENV = "pointmaze-medium-navigate-v0"


def demos(n=60, **changes):
    rng = np.random.default_rng(0)
    data = {
        "observations": rng.normal(size=(n, 3)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
        "terminals": np.arange(n) % 20 == 19,
    }
    return dict(data, **changes)


def bc(tmp_path, data):
    np.savez(tmp_path / "demos.npz", **data)
    argv = ["--env-id", "demos", "--dataset-dir", str(tmp_path), "--output-dir", str(tmp_path / "runs")] + QUICK
    return nf_bc.main(tyro.cli(nf_bc.Args, args=argv))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"observations": np.where(np.arange(60)[:, None] == 7, np.nan, demos()["observations"])},
         r"demos.npz: observations \(float.*a non-finite value in row 7"),
        ({"actions": np.ones((60, 2), np.int64)}, r"actions \(int64, \[60, 2\]\): expected floating-point"),
        ({"actions": np.zeros((59, 2), np.float32)}, "must be|has 59 rows where actions have 60|rows"),
        ({"observations": np.zeros((0, 3), np.float32), "actions": np.zeros((0, 2), np.float32),
          "terminals": np.zeros(0, bool)}, "no transitions"),
        ({"observations": np.array([["a"] * 3] * 60)}, "expected numeric values"),
        ({"terminals": np.zeros(60, bool)}, "the last step is not marked as an episode end"),
    ],
)  # fmt: skip
def test_broken_demonstrations_are_refused_before_a_run_starts(tmp_path, changes, message):
    with pytest.raises(SystemExit, match=message):
        bc(tmp_path, demos(**changes))
    assert not (tmp_path / "runs").exists()  # nothing was made


def test_broken_ogbench_files_name_the_command_that_remakes_them(tmp_path, pointmaze_dir):
    data = tmp_path / "data"
    shutil.copytree(pointmaze_dir, data)
    argv = ["--env-id", ENV, "--dataset-dir", str(data), "--output-dir", str(tmp_path / "runs")] + QUICK
    remake = f"python make_dataset.py {ENV} --dataset-dir {data} --overwrite"
    with np.load(data / f"{ENV}.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["actions"][11] = [3.0, 0.0]  # far outside OGBench's [-1, 1] box
    np.savez(data / f"{ENV}.npz", **arrays)
    with pytest.raises(SystemExit, match=r"actions row 11 is \[3. 0.\], outside the action box") as info:
        nf_gcbc.main(tyro.cli(nf_gcbc.Args, args=argv))
    assert remake in str(info.value)
    arrays["actions"][11], arrays["observations"][5, 1] = 0.0, np.inf
    np.savez(data / f"{ENV}.npz", **arrays)
    with pytest.raises(SystemExit, match=r"observations \(float32.*a non-finite value in row 5"):
        nf_gcbc.main(tyro.cli(nf_gcbc.Args, args=argv))
    for content in (b"", open(data / f"{ENV}.npz", "rb").read()[:1000]):  # empty, truncated
        (data / f"{ENV}.npz").write_bytes(content)
        with pytest.raises(SystemExit, match="could not read") as info:
            nf_gcbc.main(tyro.cli(nf_gcbc.Args, args=argv))
        assert remake in str(info.value)
    assert not (tmp_path / "runs").exists()


def test_a_task_number_the_environment_does_not_have(tmp_path, pointmaze_dir):
    argv = ["--env-id", "pointmaze-medium-navigate-singletask-task9-v0", "--dataset-dir", pointmaze_dir] + QUICK
    with pytest.raises(SystemExit, match="unknown OGBench dataset .*did you mean .*singletask-task"):
        nf_rlbc.main(tyro.cli(nf_rlbc.Args, args=argv + ["--output-dir", str(tmp_path)]))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "script,argv,message",
    [
        (nf_gcbc, ["--learning-rate", "-1"], "--learning-rate must be positive"),
        (nf_gcbc, ["--num-blocks", "0", "--eval-max-steps", "-3"], "--num-blocks must be positive; --eval-max-steps"),
        (nf_rlbc, ["--env-id", "pointmaze-medium-navigate-singletask-task1-v0", "--critic-dim", "0"], "--critic-dim"),
        (nf_gcbc, ["--batch-size", "100000"], r"--batch-size 100000 is larger than the \d+ training transitions"),
        (nf_gcbc, ["--policy", "flow-matching", "--flow-steps", "0"], "--flow-steps must be positive"),
        (nf_bc, ["--policy", "diffusion", "--diffusion-steps", "101"], "--diffusion-steps cannot exceed"),
    ],
)  # fmt: skip
def test_impossible_arguments_are_one_line(tmp_path, pointmaze_dir, script, argv, message):
    base = ["--env-id", ENV, "--dataset-dir", pointmaze_dir, "--output-dir", str(tmp_path / "runs")] + QUICK
    with pytest.raises(SystemExit, match=message):
        script.main(tyro.cli(script.Args, args=base + argv))
    assert not (tmp_path / "runs").exists()


def test_paths_that_cannot_work_are_refused_before_anything_starts(tmp_path, pointmaze_dir):
    (tmp_path / "a_file").write_text("")
    base = ["--env-id", ENV] + QUICK
    for argv, message in [
        (["--dataset-dir", pointmaze_dir, "--output-dir", str(tmp_path / "a_file")], "--output-dir .*a_file is a file"),
        (
            ["--dataset-dir", str(tmp_path / "a_file"), "--output-dir", str(tmp_path)],
            "--dataset-dir .*a_file is a file",
        ),
    ]:
        with pytest.raises(SystemExit, match=message):
            nf_gcbc.main(tyro.cli(nf_gcbc.Args, args=base + argv))
    import nf_goal_explore

    argv = ["--num-envs", "3", "--total-env-steps", "100", "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="--total-env-steps counts all 3 envs together: use a multiple, e.g. 99"):
        nf_goal_explore.main(tyro.cli(nf_goal_explore.Args, args=argv))


def test_make_dataset_flag_makes_a_missing_dataset_with_the_tool_beside_the_script(tmp_path, monkeypatch, capsys):
    """--make-dataset runs make_dataset.py (here at a tiny size, so the test is quick) when the file is missing
    and the download fails; without it the message names both ways."""
    import make_dataset

    def tiny_make_dataset(command, **kwargs):
        assert command[1].endswith("make_dataset.py") and command[2:] == [ENV, "--dataset-dir", str(tmp_path)]
        args = make_dataset.Args(env_name=ENV, dataset_dir=str(tmp_path), num_transitions=500, episode_steps=250)
        make_dataset.make_dataset(dataclasses.replace(args, num_workers=1))
        return subprocess.CompletedProcess(command, 0)

    with pytest.raises(SystemExit, match=f"python make_dataset.py {ENV} .*\n.*or add --make-dataset"):
        nf_gcbc.load_ogbench(ENV, str(tmp_path), singletask=False)
    monkeypatch.setattr(nf_gcbc.subprocess, "run", tiny_make_dataset)
    env, train, val = nf_gcbc.load_ogbench(ENV, str(tmp_path), singletask=False, make_missing=True)
    assert len(train["actions"]) > 400 and "making it with" in capsys.readouterr().out
