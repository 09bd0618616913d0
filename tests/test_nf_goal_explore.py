"""nf_goal_explore.py end to end through its CLI on pointmaze with a tiny budget, and its parts by hand."""

import csv
import functools
import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch
import tyro

import nf_goal_explore

# 2 envs x 50-step episodes: a round of episodes is 100 env steps, so checkpoints every 100 steps sit at
# episode boundaries; updates start after 40 env steps
QUICK = ["--num-envs", "2", "--max-episode-steps", "50", "--total-env-steps", "300", "--learning-starts", "40",
         "--goal-hold-steps", "15", "--num-candidates", "16", "--batch-size", "16", "--buffer-size", "1000",
         "--encoder-dim", "32", "--actor-dim", "32", "--hidden-dim", "32", "--num-blocks", "2", "--rep-dim", "8",
         "--log-interval", "50", "--eval-interval", "100", "--save-interval", "100", "--eval-episodes", "1",
         "--eval-max-steps", "20", "--no-cuda"]  # fmt: skip


def load_script(name):
    path = os.path.join(os.path.dirname(nf_goal_explore.__file__), "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(argv):
    return nf_goal_explore.main(tyro.cli(nf_goal_explore.Args, args=argv))


def rows(run_dir):
    with open(f"{run_dir}/eval.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    "strategy,density", [("min-density", "flow"), ("uniform", "flow"), ("oracle", "flow"), ("min-density", "gaussian")]
)
def test_each_goal_strategy_explores_evaluates_and_draws(tmp_path, strategy, density):
    run_dir, actor = run(["--output-dir", str(tmp_path), "--goal-strategy", strategy, "--density", density] + QUICK)
    evaluations = rows(run_dir)
    assert [int(r["env_steps"]) for r in evaluations] == [0, 100, 200, 300]
    assert [int(r["updates"]) for r in evaluations] == [0, 31, 81, 131]  # one per vector step from env step 40 on
    for row in evaluations:
        assert 0 <= float(row["success"]) <= 1 and 0 <= float(row["coverage"]) <= 1
        assert set(row) >= {f"task{t}" for t in range(1, 6)}
    assert float(evaluations[-1]["coverage"]) > 0
    for step in (0, 100, 200, 300):  # the picture of each evaluation
        with open(f"{run_dir}/heatmaps/env_step_{step}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    if strategy == "min-density" and density == "flow":  # the README's montage of them
        montage = load_script("montage_heatmaps")
        montage.main(montage.Args(runs=[run_dir], env_steps=[0, 300], out=str(tmp_path / "montage.png")))
        assert os.path.getsize(tmp_path / "montage.png") > 0
        montage.main(montage.Args(runs=[run_dir, run_dir], env_steps=[300], columns=2, out=str(tmp_path / "row.png")))
        assert os.path.getsize(tmp_path / "row.png") > 0
        with pytest.raises(SystemExit, match="no such heat map"):
            montage.main(montage.Args(runs=[run_dir], env_steps=[150], out=str(tmp_path / "none.png")))
    checkpoint = torch.load(f"{run_dir}/checkpoints/step_300.pt", weights_only=True)
    assert set(checkpoint) >= {
        "actor",
        "density",
        "actor_optimizer",
        "density_optimizer",
        "log_temperature",
        "buffer",
        "cell_visits",
        "env_steps",
        "args",
    }
    assert checkpoint["buffer"]["episodes"] == 8 and int(checkpoint["cell_visits"].sum()) == 300
    assert len(checkpoint["recent_goals"]) > 0
    if strategy == "oracle":  # only the evaluation goals are ever commanded
        geometry = nf_goal_explore.MazeGeometry(nf_goal_explore.make_maze("pointmaze-medium-v0"))
        distances = np.linalg.norm(checkpoint["recent_goals"].numpy()[:, None] - geometry.task_goals[None], axis=-1)
        assert distances.min(1).max() < 1e-4
    args = nf_goal_explore.Args(**checkpoint["args"])
    reloaded = nf_goal_explore.Actor(2, 2, args)
    reloaded.load_state_dict(checkpoint["actor"])
    obs, goals = torch.rand(5, 2) * 20, torch.rand(5, 2) * 20
    with torch.no_grad():
        torch.testing.assert_close(actor.act(obs, goals), reloaded.act(obs, goals), rtol=0, atol=0)
        assert actor.act(obs, goals).abs().max() < 1


def test_min_density_selector_picks_the_least_likely_candidate():
    candidates = np.array([[[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]],  # env 0: (3, 4) is farthest from the mode at 0
                           [[2.0, 0.0], [0.5, 0.5], [-1.0, 0.0]]])  # env 1: (2, 0)  # fmt: skip
    log_density = lambda g: -np.square(g).sum(-1)  # noqa: E731
    rng = np.random.default_rng(0)
    chosen = nf_goal_explore.select_goals("min-density", candidates, log_density, np.zeros((5, 2)), rng)
    np.testing.assert_array_equal(chosen, [[3.0, 4.0], [2.0, 0.0]])
    np.testing.assert_array_equal(
        nf_goal_explore.select_goals("uniform", candidates, log_density, None, rng), candidates[:, 0]
    )
    oracle = np.array([[10.0, 10.0], [20.0, 20.0]])
    assert all(
        g.tolist() in oracle.tolist() for g in nf_goal_explore.select_goals("oracle", candidates, None, oracle, rng)
    )


def test_min_density_selector_with_a_fitted_flow_finds_the_rarely_visited_region():
    """A flow fitted (with condition dropout) to states that are 95% in one corner rates a state from the other
    corner as least likely."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    args = nf_goal_explore.Args(encoder_dim=32, hidden_dim=64, num_blocks=4, rep_dim=8)
    density = nf_goal_explore.FlowDensity(2, 2, args)
    optimizer = torch.optim.Adam(density.parameters(), lr=3e-3)
    common, rare = np.array([-0.6, -0.6]), np.array([0.6, 0.6])
    for _ in range(600):
        centres = np.where(rng.random((256, 1)) < 0.95, common, rare)
        goals = torch.as_tensor(centres + 0.05 * rng.standard_normal((256, 2)), dtype=torch.float32)
        loss = -density.log_prob(goals, torch.zeros(256, 8)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def log_density(g):
        with torch.no_grad():
            return density.log_prob(torch.as_tensor(g, dtype=torch.float32), torch.zeros(len(g), 8)).numpy()

    candidates = np.stack([common + 0.02 * rng.standard_normal((15, 2)) for _ in range(3)])
    candidates[:, 7] = rare  # one rarely visited candidate per environment, in a different slot each time
    chosen = nf_goal_explore.select_goals("min-density", candidates, log_density, None, rng)
    np.testing.assert_allclose(chosen, np.tile(rare, (3, 1)))


def test_buffer_goals_are_future_states_of_the_same_episode_at_geometric_offsets():
    buffer = nf_goal_explore.TrajectoryBuffer(capacity=4 * 200, length=200, obs_dim=3, action_dim=1, num_envs=2)
    for episode in range(3):  # x = episode index, y = time step: a goal's origin can be read off it
        buffer.start_episodes(np.array([[10 * episode + e, 0, 0] for e in range(2)], np.float32))
        for t in range(1, 201 if episode < 2 else 101):  # the third round stops half way
            buffer.add(torch.zeros((2, 1)), np.array([[10 * episode + e, t, 0] for e in range(2)], np.float32))
    assert buffer.episodes == 6 and sorted(buffer.lengths.tolist()) == [100, 100, 200, 200]  # 2 rows overwritten
    batch = buffer.sample(20_000, discount=0.97, generator=torch.Generator().manual_seed(0))
    obs, goals = batch["observations"].numpy(), batch["goals"].numpy()
    assert np.all(goals[:, 0] == obs[:, 0])  # the same episode
    offsets = goals[:, 1] - obs[:, 1]
    assert offsets.min() >= 1 and np.all(goals[:, 1] <= np.where(obs[:, 0] >= 20, 100, 200))
    far = (obs[:, 0] < 20) & (obs[:, 1] < 50)  # >= 150 steps before the end: geometric, mean 1 / (1 - discount)
    assert abs(offsets[far].mean() - 1 / 0.03) < 1.0
    assert abs(np.mean(offsets[far] == 1) - 0.03) < 0.01
    assert set(np.unique(obs[:, 0])) == {10, 11, 20, 21}  # the oldest round was overwritten
    states = buffer.sample_states(5_000, torch.Generator().manual_seed(1))
    assert set(np.unique(states[:, 0])) == {10, 11, 20, 21} and states[:, 1].max() <= 200


def test_resume_at_an_episode_boundary_matches_an_uninterrupted_run(tmp_path):
    full, _ = run(["--output-dir", str(tmp_path)] + QUICK)
    cut = str(tmp_path / "cut")
    shutil.copytree(full, cut)
    os.remove(f"{cut}/checkpoints/step_300.pt")  # as if the run had stopped after its checkpoint at step 200
    resumed, _ = run(["--resume", cut])
    assert resumed == cut
    a, b = (torch.load(f"{d}/checkpoints/step_300.pt", weights_only=True) for d in (full, cut))
    for key in ("actor", "density"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0, msg=f"{key}.{name}")
    torch.testing.assert_close(a["buffer"]["observations"], b["buffer"]["observations"], rtol=0, atol=0)
    assert torch.equal(a["cell_visits"], b["cell_visits"]) and torch.equal(a["log_temperature"], b["log_temperature"])
    drop = lambda rs: [{k: v for k, v in r.items() if k != "wall_time"} for r in rs]  # noqa: E731
    assert drop(rows(full)) == drop(rows(cut))


def test_a_checkpoint_of_an_earlier_version_resumes_with_a_note(tmp_path, capsys):
    """Checkpoints from before the batches were drawn on the device have no sampler state: they resume, with
    other batches than the run would have drawn, and say so."""
    full, _ = run(["--output-dir", str(tmp_path)] + QUICK)
    os.remove(f"{full}/checkpoints/step_300.pt")
    checkpoint = torch.load(f"{full}/checkpoints/step_200.pt", weights_only=True)
    del checkpoint["sampler_rng"]
    torch.save(checkpoint, f"{full}/checkpoints/step_200.pt")
    run(["--resume", full])
    assert "batch sampler is from another version or device" in capsys.readouterr().out
    assert os.path.exists(f"{full}/checkpoints/step_300.pt")


def test_same_seed_same_numbers(tmp_path):
    a, _ = run(["--output-dir", str(tmp_path / "a")] + QUICK[:5] + ["100"] + QUICK[6:])
    b, _ = run(["--output-dir", str(tmp_path / "b")] + QUICK[:5] + ["100"] + QUICK[6:])
    ca, cb = (torch.load(f"{d}/checkpoints/step_100.pt", weights_only=True) for d in (a, b))
    for name in ca["density"]:
        torch.testing.assert_close(ca["density"][name], cb["density"][name], rtol=0, atol=0)
    assert torch.equal(ca["heat"], cb["heat"])


def test_clear_errors(tmp_path):
    def error(argv):
        with pytest.raises(SystemExit) as info:
            run(["--output-dir", str(tmp_path)] + QUICK + argv)
        return str(info.value)

    assert "did you mean pointmaze-medium-v0" in error(["--env-id", "pointmaze-medum-v0"])
    assert "point and ant mazes" in error(["--env-id", "cube-single-v0"])
    assert "--condition-drop > 0" in error(["--condition-drop", "0"])
    assert "raise --buffer-size" in error(["--buffer-size", "100"])
    assert "--num-envs must be positive" in error(["--num-envs", "0"])
    assert "--discount must lie in (0, 1)" in error(["--discount", "1"])
    os.makedirs(tmp_path / "broken" / "checkpoints")
    (tmp_path / "broken" / "checkpoints" / "step_5.pt").write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in error(["--resume", str(tmp_path / "broken")])
    assert "no checkpoints" in error(["--resume", str(tmp_path)])


def test_the_update_on_a_hand_built_batch():
    """Without condition dropout and goal noise the density loss is the NLL of the batch's goals; the actor and
    the temperature move."""
    torch.manual_seed(0)
    args = nf_goal_explore.Args(encoder_dim=16, actor_dim=16, hidden_dim=16, num_blocks=2, rep_dim=8)
    density, actor = nf_goal_explore.FlowDensity(4, 2, args), nf_goal_explore.Actor(4, 2, args)
    log_temperature = torch.zeros((), requires_grad=True)
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    optimizers = {"density": adam(density.parameters()), "actor": adam(actor.parameters())}
    optimizers["temperature"] = adam([log_temperature])
    batch = {"observations": torch.randn(6, 4), "actions": torch.rand(6, 2) * 2 - 1, "goals": torch.randn(6, 2)}
    with torch.no_grad():
        expected = -density.log_prob(batch["goals"], density.condition(batch["observations"], batch["actions"])).mean()
    actor_before = [p.detach().clone() for p in actor.parameters()]
    settings = dict(log_temperature=log_temperature, condition_drop=0.0, goal_noise=0.0, target_entropy=-1.0)
    logs = nf_goal_explore.update(batch, density=density, actor=actor, optimizers=optimizers, **settings)
    torch.testing.assert_close(logs["density_loss"], expected)
    assert log_temperature.item() != 0 and any(not torch.equal(a, b) for a, b in zip(actor_before, actor.parameters()))
    assert set(logs) == {"density_loss", "actor_loss", "log_occupancy", "entropy", "temperature"}


def test_compiled_training_computes_what_eager_training_does(tmp_path):
    """--compile (torch.compile of the networks; on a GPU the update is also captured as a CUDA graph, which
    scripts/gpu_check.sh runs there) gives the eager run's weights within float tolerance."""
    quick = QUICK[:5] + ["100"] + QUICK[6:]
    eager, _ = run(["--output-dir", str(tmp_path / "eager")] + quick)
    compiled, _ = run(["--output-dir", str(tmp_path / "compiled"), "--compile"] + quick)
    a, b = (torch.load(f"{d}/checkpoints/step_100.pt", weights_only=True) for d in (eager, compiled))
    for part in ("actor", "density"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=1e-4, atol=1e-5, msg=f"{part}.{key}")
