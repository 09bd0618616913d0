"""nf_bc.py end to end through its CLI for each data source (npz, OGBench, Minari), on data made by the test."""

import csv
import math
import shutil

import gymnasium
import numpy as np
import pytest
import torch
import torch._inductor.config
import tyro
from conftest import MINARI_ID

import make_dataset
import nf_bc

QUICK = ["--total-steps", "6", "--batch-size", "16", "--log-interval", "2", "--eval-interval", "3",
         "--save-interval", "3", "--eval-episodes", "2", "--eval-max-steps", "7", "--warmup-steps", "2",
         "--num-blocks", "2", "--hidden-dim", "32", "--rep-dim", "16", "--obs-horizon", "2",
         "--action-horizon", "3", "--exec-horizon", "2", "--no-cuda"]  # fmt: skip


@pytest.fixture(scope="module")
def npz_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("npz")
    make_dataset.make_dataset(
        make_dataset.Args(
            env_name="pointmaze-medium-multigoal-v0", dataset_dir=str(path), num_episodes=10, num_workers=1
        )
    )
    return str(path)


def source_args(source, npz_dir, pointmaze_dir):
    if source == "npz":
        return ["--source", "npz", "--env-id", "pointmaze-medium-multigoal-v0", "--dataset-dir", npz_dir]
    if source == "ogbench":
        return [
            "--source",
            "ogbench",
            "--env-id",
            "pointmaze-medium-navigate-singletask-task1-v0",
            "--dataset-dir",
            pointmaze_dir,
        ]
    return ["--source", "minari", "--env-id", MINARI_ID]


def run(argv):
    return nf_bc.main(tyro.cli(nf_bc.Args, args=argv))


def params(path):
    return torch.load(path, weights_only=True)["policy"]


def rows(run_dir):
    with open(f"{run_dir}/eval.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    "source,policy",
    [(s, p) for s in ("npz", "ogbench", "minari") for p in ("flow", "gaussian")]
    + [("npz", "diffusion"), ("npz", "flow-matching")],
)
def test_each_source_trains_evaluates_and_reloads(tmp_path, npz_dir, pointmaze_dir, minari_dir, source, policy):
    run_dir, trained = run(
        source_args(source, npz_dir, pointmaze_dir) + ["--output-dir", str(tmp_path), "--policy", policy] + QUICK
    )
    evaluations = rows(run_dir)
    assert [int(r["step"]) for r in evaluations] == [0, 3, 6]
    defined = {
        "npz": ["val_loss", "val_nll", "return", "success"],
        "ogbench": ["val_loss", "val_nll", "return", "success"],
        "minari": ["val_loss", "val_nll", "return", "score"],
    }[source]
    if policy in ("diffusion", "flow-matching"):  # no likelihood
        defined.remove("val_nll")
    for row in evaluations:
        for key in ["val_loss", "val_nll", "return", "success", "score"]:
            assert math.isfinite(float(row[key])) == (key in defined), (key, row)
    checkpoint = torch.load(f"{run_dir}/checkpoints/step_6.pt", weights_only=True)
    args = nf_bc.Args(**checkpoint["args"])
    obs_dim, action_dim = {"npz": (2, 2), "ogbench": (2, 2), "minari": (3, 1)}[source]
    reloaded = nf_bc.POLICIES[policy](obs_dim, action_dim, args)
    reloaded.load_state_dict(checkpoint["policy"])
    obs = torch.randn(8, 2, obs_dim) * 3
    with torch.no_grad():
        chunks = [
            p.act(obs, lambda *s: torch.randn(len(obs), *s, generator=torch.Generator().manual_seed(3)))
            for p in (trained, reloaded)
        ]
    torch.testing.assert_close(chunks[0], chunks[1], rtol=0, atol=0)
    assert chunks[0].shape == (8, 3, action_dim)
    if source == "minari":  # actions come back in the environment's units, inside its box [-2, 2]
        assert chunks[0].abs().max() <= 2 and torch.equal(reloaded.action_high, torch.tensor([2.0]))


def test_one_dimensional_actions_without_chunks(tmp_path, minari_dir):
    """Pendulum's single action with k = 1: a 1-D flow (affine + spline coupling on the context alone)."""
    argv = ["--source", "minari", "--env-id", MINARI_ID, "--output-dir", str(tmp_path)] + QUICK
    run_dir, policy = run(argv + ["--action-horizon", "1", "--exec-horizon", "1"])
    assert policy.flow.dim == 1 and all(math.isfinite(float(r["score"])) for r in rows(run_dir))


def test_chunks_and_histories_stay_inside_their_episode():
    data = {
        "observations": np.arange(7, dtype=np.float32)[:, None],
        "actions": 10 + np.arange(7, dtype=np.float32)[:, None],
        "terminals": np.array([0, 0, 1, 0, 0, 0, 1], bool),
    }  # episodes 0-2 and 3-6
    dataset = nf_bc.ChunkDataset(data, obs_horizon=3, action_horizon=3, device=torch.device("cpu"))
    assert dataset.obs_index.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [3, 3, 3], [3, 3, 4], [3, 4, 5], [4, 5, 6]]
    assert dataset.action_index.tolist() == [
        [0, 1, 2],
        [1, 2, 2],
        [2, 2, 2],
        [3, 4, 5],
        [4, 5, 6],
        [5, 6, 6],
        [6, 6, 6],
    ]
    obs, actions = dataset.sample(5, torch.Generator().manual_seed(0))
    assert obs.shape == (5, 3, 1) and actions.shape == (5, 3, 1)


class CountingEnv(gymnasium.Env):
    """Ends after 5 steps and remembers the actions it was given."""

    observation_space = gymnasium.spaces.Box(-10, 10, (1,))
    action_space = gymnasium.spaces.Box(-10, 10, (1,))

    def reset(self, *, seed=None, options=None):
        self.t, self.actions = 0, []
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        self.actions.append(float(action[0]))
        return np.full(1, self.t, np.float32), 1.0, self.t == 5, False, {}


class ChunkOfIndices(torch.nn.Module):
    """A policy whose chunk is [call, call + 0.1, call + 0.2]: it shows which call and which position ran."""

    def __init__(self):
        super().__init__()
        self.calls, self.histories = 0, []

    def act(self, obs, randn):
        self.histories.append(obs[0, :, 0].tolist())
        chunk = self.calls + torch.tensor([0.0, 0.1, 0.2])
        self.calls += 1
        return chunk.view(1, 3, 1).expand(len(obs), 3, 1)


def test_evaluation_executes_the_first_m_actions_of_each_chunk():
    args = nf_bc.Args(obs_horizon=2, action_horizon=3, exec_horizon=2, eval_episodes=2)
    envs, policy = [CountingEnv(), CountingEnv()], ChunkOfIndices()
    pool = nf_bc.EnvPool(iter(envs).__next__, 2)
    stats = nf_bc.evaluate(policy, pool, envs[0].observation_space, None, args, torch.device("cpu"), 0, None, None)
    assert policy.calls == 3  # steps 0, 2 and 4 of a 5-step episode
    np.testing.assert_allclose(envs[0].actions, [0.0, 0.1, 1.0, 1.1, 2.0])
    assert policy.histories == [[0, 0], [1, 2], [3, 4]]  # the first observation repeated, then the last two
    assert stats["return"] == 5 and math.isnan(stats["success"]) and math.isnan(stats["score"])


@pytest.mark.parametrize("policy", ["flow", "gaussian", "diffusion", "flow-matching"])
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, npz_dir, pointmaze_dir, policy):
    base = source_args("npz", npz_dir, pointmaze_dir) + ["--policy", policy] + QUICK
    run_dir, _ = run(base + ["--output-dir", str(tmp_path / "a")])
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    run(["--resume", f"{copy}/checkpoints/step_3.pt"])
    for key, value in params(f"{run_dir}/checkpoints/step_6.pt").items():
        torch.testing.assert_close(params(f"{copy}/checkpoints/step_6.pt")[key], value, rtol=0, atol=0)
    assert [int(r["step"]) for r in rows(copy)] == [0, 3, 6]
    assert [r["return"] for r in rows(copy)] == [r["return"] for r in rows(run_dir)]
    again, _ = run(base + ["--output-dir", str(tmp_path / "b")])  # the same seed gives the same numbers
    for key, value in params(f"{run_dir}/checkpoints/step_6.pt").items():
        torch.testing.assert_close(params(f"{again}/checkpoints/step_6.pt")[key], value, rtol=0, atol=0)
    assert [r["return"] for r in rows(again)] == [r["return"] for r in rows(run_dir)]


def test_plain_npz_without_an_environment_reports_validation_nll(tmp_path):
    data = {
        "observations": np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32),
        "actions": np.random.default_rng(1).uniform(-1, 1, (60, 2)).astype(np.float32),
        "terminals": np.arange(60) % 20 == 19,
    }
    np.savez(tmp_path / "demos.npz", **data)
    np.savez(tmp_path / "demos-val.npz", **data)
    run_dir, _ = run(["--env-id", "demos", "--dataset-dir", str(tmp_path), "--output-dir", str(tmp_path)] + QUICK)
    for row in rows(run_dir):
        assert math.isfinite(float(row["val_nll"])) and math.isnan(float(row["return"]))


def test_clear_errors(tmp_path, npz_dir, pointmaze_dir, minari_dir):
    out = ["--output-dir", str(tmp_path)] + QUICK
    cases = [
        (
            ["--source", "ogbench", "--env-id", "pointmaze-medium-navigate-v0", "--dataset-dir", pointmaze_dir],
            "singletask-task1-v0",
        ),
        (
            [
                "--source",
                "ogbench",
                "--env-id",
                "pointmaze-medum-navigate-singletask-v0",
                "--dataset-dir",
                pointmaze_dir,
            ],
            "did you mean",
        ),
        (
            [
                "--source",
                "ogbench",
                "--env-id",
                "pointmaze-large-navigate-singletask-v0",
                "--dataset-dir",
                str(tmp_path / "none"),
            ],
            "python make_dataset.py pointmaze-large-navigate-v0",
        ),
        (
            ["--env-id", "pointmaze-medium-multigoal-v0", "--dataset-dir", str(tmp_path / "none")],
            "python make_dataset.py pointmaze-medium-multigoal-v0",
        ),
        (["--source", "minari", "--env-id", "mujoco/hopper/expert-v0"], "minari download mujoco/hopper/expert-v0"),
        (["--source", "minari", "--env-id", "test/pendulum/randm-v0"], "did you mean test/pendulum/random-v0"),
        (source_args("npz", npz_dir, pointmaze_dir) + ["--exec-horizon", "4"], "cannot exceed --action-horizon"),
        (source_args("npz", npz_dir, pointmaze_dir) + ["--eval-env", "Pendulm-v1"], "did you mean Pendulum-v1"),
        (
            source_args("npz", npz_dir, pointmaze_dir) + ["--eval-env", "Pendulum-v1"],
            "1-D actions|2-D actions|observations of size .* --eval-env Pendulum-v1 is not the environment",
        ),
        (
            source_args("minari", npz_dir, pointmaze_dir) + ["--eval-env", "Pendulum-v1"],
            "--eval-env is for --source npz",
        ),
        (source_args("npz", npz_dir, pointmaze_dir) + ["--learning-rate", "1e9"], "non-finite training loss at step"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            run(out + argv)  # the case's flags come last and win
    np.savez(
        tmp_path / "broken.npz", observations=np.zeros((5, 2)), actions=np.zeros((4, 2)), terminals=np.ones(5, bool)
    )
    with pytest.raises(SystemExit, match="must be"):
        run(["--env-id", "broken", "--dataset-dir", str(tmp_path)] + out)
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip file")
    with pytest.raises(SystemExit, match="could not read"):
        run(["--env-id", "corrupt", "--dataset-dir", str(tmp_path)] + out)


def test_mode_picture_is_written(tmp_path, npz_dir, pointmaze_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "plot_bc_modes", f"{nf_bc.__file__[: -len('nf_bc.py')]}scripts/plot_bc_modes.py"
    )
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    base = source_args("npz", npz_dir, pointmaze_dir) + ["--output-dir", str(tmp_path)] + QUICK
    flow_run, _ = run(base + ["--policy", "flow", "--exp-name", "flow"])
    gaussian_run, _ = run(base + ["--policy", "gaussian", "--exp-name", "gaussian"])
    diffusion_run, _ = run(base + ["--policy", "diffusion", "--exp-name", "diffusion"])
    out = tmp_path / "modes.png"
    plot.main(plot.Args(runs=(flow_run, gaussian_run, diffusion_run), out=str(out), samples=50, rollouts=2))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(nf_bc.time, "time", lambda: 1_000.0)
    args = nf_bc.Args(output_dir=str(tmp_path), env_id="mujoco/hopper/expert-v0")
    first, second = nf_bc.run_directory(args, None), nf_bc.run_directory(args, None)
    assert first.endswith("mujoco-hopper-expert-v0__nf_bc__1__1000") and second == first + "_2"


def test_dict_observations_flatten_the_same_for_a_step_and_an_episode():
    """Minari datasets such as Kitchen store dict observations; the env gives one step, the dataset a batch."""
    Box, Dict = gymnasium.spaces.Box, gymnasium.spaces.Dict
    space = Dict(
        {"observation": Box(-1, 1, (3,)), "desired_goal": Dict({"kettle": Box(-1, 1, (2,)), "light": Box(-1, 1, (1,))})}
    )
    episode = {
        "observation": np.arange(12.0).reshape(4, 3),
        "desired_goal": {"kettle": 100 + np.arange(8.0).reshape(4, 2), "light": 200 + np.arange(4.0)[:, None]},
    }
    flat = nf_bc.flatten_observation(space, episode)
    assert flat.shape == (4, 6) and flat.dtype == np.float32
    for t in range(4):
        step = {
            "observation": episode["observation"][t],
            "desired_goal": {k: v[t] for k, v in episode["desired_goal"].items()},
        }
        np.testing.assert_array_equal(nf_bc.flatten_observation(space, step), flat[t])
        np.testing.assert_array_equal(gymnasium.spaces.flatten(space, step), flat[t])  # gymnasium's order too


def explicit_loss(policy, histories, chunks, draws):
    """Each policy's loss written out from its definition (the likelihood policies without action noise)."""
    if isinstance(policy, (nf_bc.FlowPolicy, nf_bc.GaussianPolicy)):
        return -policy.log_prob(histories, chunks).mean()
    a, cond = chunks.flatten(1), policy.encoder(policy.features(histories))
    if not isinstance(policy, nf_bc.DiffusionPolicy):  # flow matching: the linear path's velocity
        z, t = draws
        target, x = a - z, (1 - t) * z + t * a
    else:  # diffusion: x_k = sqrt(abar_k) a + sqrt(1 - abar_k) noise, predict the noise
        noise, k = draws
        f = [math.cos((i / 100 + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(101)]  # squared cosine
        betas = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(100)], dtype=torch.float64)
        abar = torch.cumprod(1 - betas, 0).float()[k]
        target, x, t = noise, abar.sqrt() * a + (1 - abar).sqrt() * noise, k / 100
    return (policy.net(torch.cat([x, nf_bc.time_embedding(t), cond], -1)) - target).square().mean()


@pytest.mark.parametrize("name", ["flow", "gaussian", "diffusion", "flow-matching"])
def test_the_update_on_a_hand_built_batch(name):
    torch.manual_seed(0)
    args = nf_bc.Args(num_blocks=2, hidden_dim=16, rep_dim=8, obs_horizon=2, action_horizon=3, noise_std=0.0)
    policy = nf_bc.POLICIES[name](3, 2, args)
    histories, chunks = torch.randn(5, 2, 3), torch.rand(5, 3, 2) * 2 - 1
    draws = policy.draw(chunks, torch.Generator().manual_seed(1))
    expected = explicit_loss(policy, histories, chunks, draws)
    torch.manual_seed(1)  # the training loss draws from the global generator
    torch.testing.assert_close(nf_bc.bc_loss(policy, policy, histories, chunks), expected)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(1)
    logs = nf_bc.update(policy, policy, optimizer, (histories, chunks))
    torch.testing.assert_close(logs["loss"], expected.detach())
    assert explicit_loss(policy, histories, chunks, draws) < expected  # one step on the batch lowers its loss


def test_compiled_training_computes_what_eager_training_does(tmp_path, npz_dir, pointmaze_dir):
    """--compile (torch.compile of the policy's networks; on one GPU the whole step is also captured as a CUDA
    graph, which scripts/gpu_check.sh runs there) gives the eager run's weights within float tolerance. Compiled
    code draws its random numbers with its own generator unless told to fall back to eager's."""
    base = source_args("npz", npz_dir, pointmaze_dir) + QUICK
    eager, _ = run(base + ["--output-dir", str(tmp_path / "eager")])
    with torch._inductor.config.patch(fallback_random=True):
        compiled, _ = run(base + ["--output-dir", str(tmp_path / "compiled"), "--compile"])
    for key, value in params(f"{eager}/checkpoints/step_6.pt").items():
        torch.testing.assert_close(params(f"{compiled}/checkpoints/step_6.pt")[key], value, rtol=1e-4, atol=1e-5)
