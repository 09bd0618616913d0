"""nf_gcbc.py end to end through its CLI, on a tiny pointmaze dataset made by the test."""

import csv
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import tyro

import nf_gcbc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = "pointmaze-medium-navigate-v0"
QUICK = ["--total-steps", "6", "--batch-size", "16", "--log-interval", "2", "--eval-interval", "3",
         "--save-interval", "3", "--eval-episodes", "2", "--eval-max-steps", "5", "--warmup-steps", "2",
         "--num-blocks", "2", "--hidden-dim", "32", "--no-cuda"]  # fmt: skip


def run(argv):
    return nf_gcbc.main(tyro.cli(nf_gcbc.Args, args=argv))


def params(path):
    return torch.load(path, weights_only=True)["policy"]


@pytest.mark.parametrize("policy", ["flow", "gaussian", "flow-matching"])
def test_run_writes_evaluations_and_checkpoints_that_reload(tmp_path, pointmaze_dir, policy):
    run_dir, trained = run(
        ["--env-id", ENV, "--dataset-dir", pointmaze_dir, "--output-dir", str(tmp_path), "--policy", policy] + QUICK
    )
    with open(f"{run_dir}/eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 3, 6]
    for row in rows:
        for key in [f"task{t}_success" for t in range(1, 6)] + ["success", "val_loss"]:
            assert math.isfinite(float(row[key])), key
        assert math.isfinite(float(row["val_nll"])) == (policy != "flow-matching")  # no likelihood
    checkpoint = torch.load(f"{run_dir}/checkpoints/step_6.pt", weights_only=True)
    args = nf_gcbc.Args(**checkpoint["args"])
    reloaded = nf_gcbc.POLICIES[policy](2, 2, args)
    reloaded.load_state_dict(checkpoint["policy"])
    obs, goals = torch.randn(8, 2) * 5, torch.randn(8, 2) * 5
    with torch.no_grad():
        acts = [
            p.act(obs, goals, lambda *s: torch.randn(8, *s, generator=torch.Generator().manual_seed(3)))
            for p in (trained, reloaded)
        ]
    torch.testing.assert_close(acts[0], acts[1], rtol=0, atol=0)
    assert (tmp_path / run_dir.split("/")[-1] / "args.json").exists()


@pytest.mark.parametrize("policy", ["flow", "gaussian", "flow-matching"])
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, pointmaze_dir, policy):
    run_dir, _ = run(
        ["--env-id", ENV, "--dataset-dir", pointmaze_dir, "--output-dir", str(tmp_path / "a"), "--policy", policy]
        + QUICK
    )
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    run(["--resume", f"{copy}/checkpoints/step_3.pt"])
    for key, value in params(f"{run_dir}/checkpoints/step_6.pt").items():
        torch.testing.assert_close(params(f"{copy}/checkpoints/step_6.pt")[key], value, rtol=0, atol=0)
    with open(f"{copy}/eval.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 3, 6]
    # the same seed gives the same numbers
    again, _ = run(
        ["--env-id", ENV, "--dataset-dir", pointmaze_dir, "--output-dir", str(tmp_path / "b"), "--policy", policy]
        + QUICK
    )
    for key, value in params(f"{run_dir}/checkpoints/step_6.pt").items():
        torch.testing.assert_close(params(f"{again}/checkpoints/step_6.pt")[key], value, rtol=0, atol=0)
    evaluations = []
    for directory in (run_dir, again):
        with open(f"{directory}/eval.csv") as f:
            evaluations.append([{k: v for k, v in r.items() if k != "wall_time"} for r in csv.DictReader(f)])
    assert evaluations[0] == evaluations[1]  # evaluation included (OGBench's start noise uses NumPy's global RNG)


def test_resume_from_run_directory_picks_the_last_checkpoint(tmp_path, pointmaze_dir):
    run_dir, _ = run(["--env-id", ENV, "--dataset-dir", pointmaze_dir, "--output-dir", str(tmp_path)] + QUICK)
    assert nf_gcbc.load_checkpoint(run_dir)[1].endswith("step_6.pt")


def test_clear_errors(tmp_path, pointmaze_dir):
    base = ["--dataset-dir", pointmaze_dir, "--output-dir", str(tmp_path)] + QUICK
    with pytest.raises(SystemExit, match="did you mean pointmaze-medium-navigate-v0"):
        run(["--env-id", "pointmaze-medum-navigate-v0"] + base)
    with pytest.raises(SystemExit, match="python make_dataset.py pointmaze-large-navigate-v0"):
        run(["--env-id", "pointmaze-large-navigate-v0", "--dataset-dir", str(tmp_path / "empty")] + QUICK)
    with pytest.raises(SystemExit, match="singletask"):
        run(["--env-id", "pointmaze-medium-navigate-singletask-task1-v0"] + base)
    with pytest.raises(SystemExit, match="non-finite training loss at step"):
        run(["--env-id", ENV, "--learning-rate", "1e9"] + base)
    with pytest.raises(SystemExit, match="gamma"):
        run(["--env-id", ENV, "--gamma", "1.0"] + base)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / f"{ENV}.npz").write_bytes(b"not a zip file")
    (bad / f"{ENV}-val.npz").write_bytes(b"not a zip file")
    with pytest.raises(SystemExit, match="could not read"):
        run(["--env-id", ENV, "--dataset-dir", str(bad)] + QUICK)


def test_goals_come_from_the_same_trajectory(pointmaze_dir):
    import ogbench

    _, train, _ = ogbench.make_env_and_datasets(ENV, dataset_dir=pointmaze_dir)
    dataset = nf_gcbc.GoalDataset(train, torch.device("cpu"))
    trajectory = np.searchsorted(np.flatnonzero(train["terminals"]), np.arange(dataset.size))
    idx, goal_idx = (i.numpy() for i in dataset.sample_indices(5_000, 0.97, torch.Generator().manual_seed(0)))
    assert (trajectory[goal_idx] == trajectory[idx]).all()
    offsets = goal_idx - idx
    assert offsets.min() >= 0 and (offsets > 0).mean() > 0.9  # 0 only at a trajectory's last transition
    far = dataset.final.numpy()[idx] - idx >= 200  # here the trajectory's end cuts almost no offset (0.97^199 = 0.2%)
    assert far.sum() > 500 and abs(offsets[far].mean() - 1 / 0.03) < 4  # geometric, mean 1 / (1 - gamma)
    obs, actions, goals = dataset.sample(64, 0.97, torch.Generator().manual_seed(1))
    assert obs.shape == goals.shape == (64, 2) and actions.shape == (64, 2)


def can_render():
    code = "import gymnasium, ogbench; e = gymnasium.make('pointmaze-medium-v0', render_mode='rgb_array', width=32, "
    code += "height=32); e.reset(); e.render()"
    return (
        subprocess.run(
            [sys.executable, "-c", code], env=dict(os.environ, MUJOCO_GL="egl"), capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.skipif(not can_render(), reason="no offscreen OpenGL (EGL) for MuJoCo here")
def test_capture_video_writes_one_video_per_task_and_evaluation(tmp_path, pointmaze_dir):
    argv = ["--env-id", ENV, "--dataset-dir", pointmaze_dir, "--output-dir", str(tmp_path), "--capture-video"] + QUICK
    out = subprocess.run(
        [sys.executable, "nf_gcbc.py"] + argv,
        cwd=ROOT,
        env=dict(os.environ, MUJOCO_GL="egl", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = list(tmp_path.iterdir())
    videos = sorted(os.listdir(run_dir / "videos"))
    assert len(videos) == 15 and all(os.path.getsize(run_dir / "videos" / v) > 0 for v in videos)


def test_capture_video_without_a_display_says_how(tmp_path, pointmaze_dir, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    with pytest.raises(SystemExit, match="MUJOCO_GL=egl"):
        run(["--env-id", ENV, "--dataset-dir", pointmaze_dir, "--output-dir", str(tmp_path), "--capture-video"] + QUICK)


def test_non_finite_loss_stops_before_a_checkpoint_is_written(tmp_path, pointmaze_dir):
    argv = [
        "--env-id",
        ENV,
        "--dataset-dir",
        pointmaze_dir,
        "--output-dir",
        str(tmp_path),
        "--learning-rate",
        "1e9",
    ] + QUICK
    argv += ["--log-interval", "1000"]  # logging never comes first: the save at step 3 must still be guarded
    with pytest.raises(SystemExit, match="non-finite training loss at step"):
        run(argv)
    assert not list(tmp_path.glob("*/checkpoints/*.pt"))


def explicit_loss(policy, obs, goals, actions, draws, rows=slice(None)):
    """Each policy's loss written out from its definition (the likelihood policies without action noise)."""
    obs, goals, actions, draws = obs[rows], goals[rows], actions[rows], [d[rows] for d in draws]
    if not isinstance(policy, nf_gcbc.FlowMatchingPolicy):
        return -policy.log_prob(obs, goals, actions).mean()
    (z, t), cond = draws, policy.encoder(torch.cat([obs, goals], -1))
    x = (1 - t) * z + t * actions  # the linear path; its velocity is actions - z
    return (policy.velocity(torch.cat([x, nf_gcbc.time_embedding(t), cond], -1)) - (actions - z)).square().mean()


@pytest.mark.parametrize("name", ["flow", "gaussian", "flow-matching"])
def test_the_update_on_a_hand_built_batch(name):
    torch.manual_seed(0)
    policy = nf_gcbc.POLICIES[name](3, 2, nf_gcbc.Args(num_blocks=2, hidden_dim=16, rep_dim=8, noise_std=0.0))
    obs, goals, actions = torch.randn(5, 3), torch.randn(5, 3), torch.rand(5, 2) * 2 - 1
    draws = policy.draw(actions, torch.Generator().manual_seed(1))
    expected = explicit_loss(policy, obs, goals, actions, draws)
    torch.manual_seed(1)  # the training loss draws from the global generator
    torch.testing.assert_close(nf_gcbc.gcbc_loss(policy, policy, obs, actions, goals), expected)
    torch.manual_seed(1)  # a process's rows, with the randomness drawn for the whole batch
    half = nf_gcbc.gcbc_loss(policy, policy, obs, actions, goals, share=slice(0, 2))
    torch.testing.assert_close(half, explicit_loss(policy, obs, goals, actions, draws, slice(0, 2)))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in policy.parameters()]
    torch.manual_seed(1)
    logs = nf_gcbc.update(policy, policy, optimizer, (obs, actions, goals))
    torch.testing.assert_close(logs["loss"], expected.detach())
    assert not logs["loss"].requires_grad and any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert explicit_loss(policy, obs, goals, actions, draws) < expected  # one step on the batch lowers its loss


def test_action_checks_script_reads_runs_of_every_policy(tmp_path, pointmaze_dir, capsys):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gcbc_action_checks

    runs = [
        run(
            ["--env-id", ENV, "--dataset-dir", pointmaze_dir, "--output-dir", str(tmp_path / p), "--policy", p] + QUICK
        )[0]
        for p in ("flow", "flow-matching")
    ]
    capsys.readouterr()  # the training runs' output
    gcbc_action_checks.main(gcbc_action_checks.Args(runs=tuple(runs), step=6, dataset_dir=pointmaze_dir))
    lines = [line for line in capsys.readouterr().out.splitlines() if "action MSE" in line]
    assert "(flow): action MSE" in lines[0] and "success without denoising" in lines[0]
    assert "(flow-matching): action MSE" in lines[1] and "denoising" not in lines[1]
    with pytest.raises(SystemExit, match="step_7.pt does not exist"):
        gcbc_action_checks.main(gcbc_action_checks.Args(runs=tuple(runs), step=7, dataset_dir=pointmaze_dir))


def test_an_evaluation_episode_does_not_depend_on_what_the_env_did_before():
    """OGBench's cube tasks settle the goal scene with random actions from an unseeded action space at every reset:
    with seeded_reset the goal, the start and the physics are the same for a fresh env and for one that has run
    other episodes (before, one checkpoint's evaluation gave 0.56 in its run and 0.49 from --eval-only)."""
    import ogbench

    used, fresh = (ogbench.make_env_and_datasets("cube-single-play-v0", env_only=True) for _ in range(2))
    for seed in (7, 8):
        nf_gcbc.seeded_reset(used, seed, task_id=2)
        for _ in range(5):
            used.step(used.action_space.sample())
    first = [nf_gcbc.seeded_reset(env, 100_002, task_id=2, render_goal=False) for env in (used, fresh)]
    np.testing.assert_array_equal(first[0][0], first[1][0])
    np.testing.assert_array_equal(first[0][1]["goal"], first[1][1]["goal"])
    steps = [env.step(np.full(5, 0.3, np.float32))[0] for env in (used, fresh)]
    np.testing.assert_array_equal(steps[0], steps[1])


def test_a_checkpoint_without_the_batch_samplers_state_resumes_with_a_note(tmp_path, pointmaze_dir, capsys):
    """Checkpoints written before the batches were drawn on the device (by NumPy) have no sampler state: such a run
    continues, and says that its batches differ from an uninterrupted run's from there."""
    run_dir, _ = run(["--env-id", ENV, "--dataset-dir", pointmaze_dir, "--output-dir", str(tmp_path)] + QUICK)
    path = f"{run_dir}/checkpoints/step_3.pt"
    old = torch.load(path, weights_only=True)
    del old["sampler_rng"]
    torch.save(old, path)
    os.remove(f"{run_dir}/checkpoints/step_6.pt")
    run(["--resume", path])
    assert "batch sampler is from another version or device" in capsys.readouterr().out
    assert os.path.exists(f"{run_dir}/checkpoints/step_6.pt")


def test_compiled_training_computes_what_eager_training_does(tmp_path, pointmaze_dir):
    """--compile (torch.compile of the training step's networks; on one GPU the step is also captured as a CUDA
    graph, which scripts/gpu_check.sh compares there) gives the eager run's weights within float tolerance."""
    data = ["--env-id", ENV, "--dataset-dir", pointmaze_dir]
    eager, _ = run(data + ["--output-dir", str(tmp_path / "eager")] + QUICK)
    compiled, _ = run(data + ["--output-dir", str(tmp_path / "compiled"), "--compile"] + QUICK)
    for key, value in params(f"{eager}/checkpoints/step_6.pt").items():
        torch.testing.assert_close(params(f"{compiled}/checkpoints/step_6.pt")[key], value, rtol=1e-4, atol=1e-5)


def test_evaluation_in_worker_processes_writes_the_same_numbers(tmp_path, pointmaze_dir):
    """--eval-workers 2: the evaluation envs step in two other processes; eval.csv is the same but for wall time."""
    rows = []
    for workers in ("0", "2"):
        out = str(tmp_path / workers)
        run_dir, _ = run(
            ["--env-id", ENV, "--dataset-dir", pointmaze_dir, "--output-dir", out, "--eval-workers", workers] + QUICK
        )
        with open(f"{run_dir}/eval.csv") as f:
            rows.append([{k: v for k, v in r.items() if k != "wall_time"} for r in csv.DictReader(f)])
    assert rows[0] == rows[1] and len(rows[0]) == 3
