"""nf_rlbc.py end to end through its CLI on tiny OGBench and Minari data, and its TD target by hand."""

import csv
import importlib.util
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch._inductor.config
import tyro
from conftest import MINARI_ID

import nf_rlbc

QUICK = ["--total-steps", "6", "--batch-size", "16", "--log-interval", "2", "--eval-interval", "3",
         "--save-interval", "3", "--eval-episodes", "2", "--eval-max-steps", "5",
         "--num-blocks", "2", "--hidden-dim", "32", "--rep-dim", "16", "--no-cuda"]  # fmt: skip
OGBENCH = "pointmaze-medium-navigate-singletask-task1-v0"


def run(argv):
    return nf_rlbc.main(tyro.cli(nf_rlbc.Args, args=argv))


def source_args(source, pointmaze_dir):
    if source == "ogbench":
        return ["--env-id", OGBENCH, "--dataset-dir", pointmaze_dir]
    return ["--source", "minari", "--env-id", MINARI_ID]


def rows(run_dir):
    with open(f"{run_dir}/eval.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("policy", ["flow", "gaussian", "fql"])
@pytest.mark.parametrize("source", ["ogbench", "minari"])
def test_offline_training_evaluates_and_reloads(tmp_path, pointmaze_dir, minari_dir, source, policy):
    run_dir, actor = run(
        source_args(source, pointmaze_dir) + ["--output-dir", str(tmp_path), "--policy", policy] + QUICK
    )
    evaluations = rows(run_dir)
    assert [int(r["step"]) for r in evaluations] == [0, 3, 6]
    defined = ["success", "return"] if source == "ogbench" else ["return", "score"]
    for row in evaluations:
        for key in ("success", "return", "score"):
            assert math.isfinite(float(row[key])) == (key in defined), (key, row)
    checkpoint = torch.load(f"{run_dir}/checkpoints/step_6.pt", weights_only=True)
    assert set(checkpoint) >= {"actor", "critic", "target_critic", "actor_optimizer", "critic_optimizer", "step"}
    obs_dim, action_dim = (2, 2) if source == "ogbench" else (3, 1)
    args = nf_rlbc.Args(**checkpoint["args"])
    reloaded = nf_rlbc.ACTORS[policy](obs_dim, action_dim, args)
    reloaded.load_state_dict(checkpoint["actor"])
    obs = torch.randn(8, obs_dim)
    with torch.no_grad():
        acts = [
            a.act(obs, lambda *s: torch.randn(8, *s, generator=torch.Generator().manual_seed(0)))
            for a in (actor, reloaded)
        ]
    torch.testing.assert_close(acts[0], acts[1], rtol=0, atol=0)
    bound = 1.0 if source == "ogbench" else 2.0
    assert acts[0].abs().max() <= bound
    # the target critic trails the critic (Polyak averaging), it is not a copy
    critic, target = checkpoint["critic"], checkpoint["target_critic"]
    assert any(not torch.equal(critic[k], target[k]) for k in critic)


class FixedActor(torch.nn.Module):
    def __init__(self, actions):
        super().__init__()
        self.actions = actions

    def sample(self, obs):
        return self.actions, torch.zeros(len(obs))


class TableCritic(torch.nn.Module):
    """Q_i(s, a) = s_0 * (i + 1) + a_0: easy to compute by hand."""

    def forward(self, obs, actions):
        return torch.stack([obs[:, 0] * (i + 1) + actions[:, 0] for i in range(2)])


@pytest.mark.parametrize("q_agg", ["min", "mean"])
def test_td_target_on_a_hand_built_batch(q_agg):
    batch = {
        "next_observations": torch.tensor([[1.0], [-2.0], [3.0]]),
        "rewards": torch.tensor([-1.0, 0.0, -1.0]),
        "masks": torch.tensor([1.0, 0.0, 1.0]),
    }
    actor = FixedActor(torch.tensor([[0.5], [3.0], [-7.0]]))  # sampled next actions are clipped to [-1, 1]
    # Q_1 = s + clip(a), Q_2 = 2 s + clip(a): s' = (1, -2, 3), clipped a' = (0.5, 1, -1)
    q1, q2 = np.array([1.5, -1.0, 2.0]), np.array([2.5, -3.0, 5.0])
    next_q = np.minimum(q1, q2) if q_agg == "min" else (q1 + q2) / 2
    expected = np.array([-1.0, 0.0, -1.0]) + 0.9 * np.array([1.0, 0.0, 1.0]) * next_q
    target = nf_rlbc.td_target(actor, TableCritic(), batch, discount=0.9, q_agg=q_agg)
    np.testing.assert_allclose(target.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("policy", ["flow", "gaussian", "fql"])
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, pointmaze_dir, policy):
    base = source_args("ogbench", pointmaze_dir) + ["--policy", policy] + QUICK
    run_dir, _ = run(base + ["--output-dir", str(tmp_path / "a")])
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    run(["--resume", f"{copy}/checkpoints/step_3.pt"])
    for part in ("actor", "critic", "target_critic"):
        expected = torch.load(f"{run_dir}/checkpoints/step_6.pt", weights_only=True)[part]
        resumed = torch.load(f"{copy}/checkpoints/step_6.pt", weights_only=True)[part]
        for key, value in expected.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_time"} for r in rs]  # noqa: E731
    assert strip(rows(copy)) == strip(rows(run_dir))
    again, _ = run(base + ["--output-dir", str(tmp_path / "b")])  # the same seed gives the same numbers
    assert strip(rows(again)) == strip(rows(run_dir))


def test_clear_errors(tmp_path, pointmaze_dir, minari_dir):
    out = ["--output-dir", str(tmp_path)] + QUICK
    cases = [
        (["--env-id", "pointmaze-medium-navigate-v0", "--dataset-dir", pointmaze_dir], "singletask-task1-v0"),
        (
            ["--env-id", "pointmaze-large-navigate-singletask-v0", "--dataset-dir", str(tmp_path / "none")],
            "python make_dataset.py pointmaze-large-navigate-v0",
        ),
        (["--source", "minari", "--env-id", "mujoco/hopper/expert-v0"], "minari download mujoco/hopper/expert-v0"),
        (source_args("ogbench", pointmaze_dir) + ["--discount", "1.0"], "--discount"),
        (
            source_args("ogbench", pointmaze_dir) + ["--learning-rate", "1e12"],
            "non-finite training loss at offline step",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            run(out + argv)


@pytest.mark.parametrize("policy", ["flow", "gaussian", "fql"])
def test_online_fine_tuning_grows_the_buffer_and_tunes_the_temperature(tmp_path, pointmaze_dir, policy):
    argv = source_args("ogbench", pointmaze_dir) + [
        "--output-dir",
        str(tmp_path),
        "--policy",
        policy,
        "--online-steps",
        "6",
    ]
    run_dir, _ = run(argv + QUICK)
    evaluations = rows(run_dir)
    assert [(int(r["step"]), int(r["env_steps"])) for r in evaluations] == [
        (0, 0),
        (3, 0),
        (6, 0),
        (9, 3),
        (12, 6),
    ]  # one step axis
    assert all(math.isfinite(float(r["success"])) for r in evaluations)
    checkpoint = torch.load(f"{run_dir}/checkpoints/step_12.pt", weights_only=True)
    online = checkpoint["online_transitions"]
    assert checkpoint["env_steps"] == 6 and all(len(v) == 6 for v in online.values())
    assert (online["rewards"] <= 0).all() and online["actions"].abs().max() <= 1  # singletask rewards, scaled actions
    np.testing.assert_allclose(online["observations"][1:], online["next_observations"][:-1])  # one episode, in order
    tuned = checkpoint["log_temperature"].item() != torch.tensor(math.log(0.01)).item()  # float32's start
    assert tuned == (policy != "fql")  # the MaxEnt phase for the actors with a log-density; FQL keeps its losses
    # resuming inside the online phase restores the buffer and goes on (with a fresh episode)
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    run(["--resume", f"{copy}/checkpoints/step_9.pt"])
    resumed = torch.load(f"{copy}/checkpoints/step_12.pt", weights_only=True)["online_transitions"]
    torch.testing.assert_close(resumed["observations"][:3], online["observations"][:3], rtol=0, atol=0)
    assert [(int(r["step"]), int(r["env_steps"])) for r in rows(copy)] == [
        (0, 0),
        (3, 0),
        (6, 0),
        (9, 3),
        (12, 6),
    ]  # one step axis


def test_online_bc_weight_flags(tmp_path, pointmaze_dir):
    for mode in ("keep", "off"):
        argv = source_args("ogbench", pointmaze_dir) + [
            "--output-dir",
            str(tmp_path / mode),
            "--online-steps",
            "2",
            "--online-bc",
            mode,
        ]
        run_dir, _ = run(argv + QUICK)
        assert int(rows(run_dir)[-1]["env_steps"]) == 2


def test_online_batches_mix_offline_and_online_transitions_at_the_ratio():
    offline = {k: np.zeros((100, 1), np.float32) for k in nf_rlbc.ReplayBuffer.KEYS}
    replay = nf_rlbc.ReplayBuffer(offline, torch.device("cpu"), capacity=10)
    rng = torch.Generator().manual_seed(0)
    assert replay.sample(64, rng, online_ratio=0.5)["rewards"].shape == (64, 1)  # no online data yet: all offline
    for _ in range(3):
        replay.add(**{k: np.ones(1, np.float32) for k in nf_rlbc.ReplayBuffer.KEYS})
    batch = replay.sample(64, rng, online_ratio=0.25)
    assert batch["rewards"].sum() == 16 and batch["offline"].sum() == 48  # a quarter from the 3 online rows
    assert replay.sample(64, rng, online_ratio=1.0)["rewards"].sum() == 64
    assert replay.sample(1000, rng)["rewards"].sum() < 100  # ratio 0: uniform over 103 rows


def test_finetune_from_starts_online_from_an_offline_run(tmp_path, pointmaze_dir):
    data = source_args("ogbench", pointmaze_dir)
    offline_dir, _ = run(data + ["--output-dir", str(tmp_path / "offline")] + QUICK)
    offline = torch.load(f"{offline_dir}/checkpoints/step_6.pt", weights_only=True)
    online = ["--finetune-from", offline_dir, "--online-steps", "4", "--online-bc", "keep", "--learning-rate", "3e-4"]
    run_dir, actor = run(data + ["--output-dir", str(tmp_path / "online")] + QUICK + online + ["--eval-interval", "2"])
    # the offline phase is skipped; its end is evaluated again as the online phase's start
    assert [(int(r["step"]), int(r["env_steps"])) for r in rows(run_dir)] == [(6, 0), (8, 2), (10, 4)]
    checkpoint = torch.load(f"{run_dir}/checkpoints/step_10.pt", weights_only=True)
    assert checkpoint["env_steps"] == 4 and checkpoint["args"]["total_steps"] == 6
    assert checkpoint["actor_optimizer"]["param_groups"][0]["lr"] == 3e-4  # this command's, not the offline run's
    assert checkpoint["actor_optimizer"]["state"][0]["step"] == offline["actor_optimizer"]["state"][0]["step"] + 4
    # it resumes like any run
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    run(["--resume", f"{copy}/checkpoints/step_9.pt"])
    assert [(int(r["step"]), int(r["env_steps"])) for r in rows(copy)] == [(6, 0), (8, 2), (10, 4)]
    for argv, message in [
        (online + ["--encoder-dim", "64"], "was trained with --encoder-dim 512; pass the same"),
        (["--finetune-from", offline_dir], "give it --online-steps"),
        (["--finetune-from", str(tmp_path / "nowhere"), "--online-steps", "2"], "--finetune-from .*no such run"),
        (["--finetune-from", run_dir, "--online-steps", "2"], "already online; continue it with --resume"),
        (["--finetune-from", offline_dir, "--resume", run_dir, "--online-steps", "2"], "give one"),
        (["--online-steps", "2", "--online-ratio", "1.5"], "--online-ratio must lie in"),
    ]:
        with pytest.raises(SystemExit, match=message):
            run(data + ["--output-dir", str(tmp_path / "bad")] + QUICK + argv)


def test_the_value_picture_and_the_action_check_read_a_run(tmp_path, pointmaze_dir, capsys):
    run_dir, _ = run(source_args("ogbench", pointmaze_dir) + ["--output-dir", str(tmp_path)] + QUICK)
    path = f"{nf_rlbc.__file__[: -len('nf_rlbc.py')]}scripts/plot_rlbc_values.py"
    spec = importlib.util.spec_from_file_location("plot_rlbc_values", path)
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    out = str(tmp_path / "values.png")
    plot.main(plot.Args(runs=[run_dir], out=out, samples=4, resolution=1.0, points=["6.7,14.8"]))
    printed = capsys.readouterr().out
    assert "V(start)" in printed and "V(6.7,14.8)" in printed and os.path.getsize(out) > 0
    with pytest.raises(SystemExit, match="expected x,y"):
        plot.main(plot.Args(runs=[run_dir], out=out, samples=4, resolution=1.0, points=["6.7"]))
    # scripts/rlbc_actions.py on the same run: one line for the data, one per checkpoint
    spec = importlib.util.spec_from_file_location("rlbc_actions", path.replace("plot_rlbc_values", "rlbc_actions"))
    actions = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(actions)
    actions.main(actions.Args(runs=[run_dir, f"{run_dir}/checkpoints/step_6.pt"], dataset_dir=pointmaze_dir))
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and "the data's actions at the edge" in printed[0]
    assert all("outside the box" in line and "Q(data)" in line for line in printed[1:])
    # scripts/rlbc_eval_noise.py: noise x 1 is the run's own last evaluation, on the same episodes and noise
    spec = importlib.util.spec_from_file_location(
        "rlbc_eval_noise", path.replace("plot_rlbc_values", "rlbc_eval_noise")
    )
    noise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(noise)
    noise.main(noise.Args(runs=[run_dir], scales=[1.0, 0.0], dataset_dir=pointmaze_dir))
    printed = [line for line in capsys.readouterr().out.splitlines() if "noise x" in line]
    with open(f"{run_dir}/eval.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert len(printed) == 2 and "step 6, noise x 1: " in printed[0] and "noise x 0: " in printed[1]
    assert f"success {float(last['success']):.2f}, return {float(last['return']):.1f}" in printed[0]


@pytest.mark.parametrize("online", [False, True])
def test_the_update_on_a_hand_built_batch(online):
    """Offline: the temperature stays; online: it moves. Either way the target critic moves tau of the way to
    the critic, and the BC term reads the dataset's rows only."""
    torch.manual_seed(0)
    args = nf_rlbc.Args(num_blocks=2, hidden_dim=16, rep_dim=8, encoder_dim=16, critic_dim=16)
    actor, critic, target_critic = nf_rlbc.FlowActor(2, 2, args), nf_rlbc.Critic(2, 2, 16), nf_rlbc.Critic(2, 2, 16)
    target_critic.requires_grad_(False)
    log_temperature = torch.tensor(math.log(0.1), requires_grad=True)
    start = log_temperature.item()
    optimizers = {
        "actor": torch.optim.Adam(actor.parameters(), lr=1e-3),
        "critic": torch.optim.Adam(critic.parameters()),
    }
    optimizers["temperature"] = torch.optim.Adam([log_temperature], lr=1e-2)
    batch = {
        "observations": torch.randn(4, 2),
        "actions": torch.rand(4, 2) * 2 - 1,
        "rewards": -torch.ones(4),
        "masks": torch.ones(4),
        "next_observations": torch.randn(4, 2),
        "offline": torch.tensor([1.0, 1, 0, 0]),
    }
    with torch.no_grad():
        data_nll = -actor.flow.log_prob(batch["actions"][:2], actor.encoder(batch["observations"][:2])).mean()
    critic_before, target_before = ([p.detach().clone() for p in c.parameters()] for c in (critic, target_critic))
    logs = nf_rlbc.update(
        batch,
        actor=actor,
        critic=critic,
        target_critic=target_critic,
        optimizers=optimizers,
        log_temperature=log_temperature,
        online=online,
        bc_weight=1.0,
        entropy_weight=0.0,
        target_entropy=-2.0,
        discount=0.9,
        tau=0.25,
        q_agg="min",
    )
    torch.testing.assert_close(logs["bc_nll"], data_nll)  # the two online rows are not cloned
    assert (log_temperature.item() != start) == online
    for before, old_target, new_critic, new_target in zip(
        critic_before, target_before, critic.parameters(), target_critic.parameters()
    ):
        assert not torch.equal(before, new_critic)
        torch.testing.assert_close(new_target, old_target + 0.25 * (new_critic.detach() - old_target))


def test_the_actors_log_the_share_of_their_actions_outside_the_box():
    """train/outside_box: the share of action components that the clip to [-1, 1] cuts (the critic's gradient does
    not reach them): here a Gaussian whose mean is 3 in one of two dimensions, with a tiny std."""
    actor = nf_rlbc.GaussianActor(3, 2, nf_rlbc.Args(policy="gaussian", encoder_dim=16))
    with torch.no_grad():
        actor.head.weight.zero_()
        actor.head.bias.copy_(torch.tensor([3.0, 0.0, -5.0, -5.0]))  # mean (3, 0), log-std -5
    batch = {"observations": torch.randn(8, 3), "actions": torch.zeros(8, 2), "offline": torch.ones(8)}
    _, logs = actor.loss(batch, TableCritic(), bc_weight=1.0, entropy_weight=0.0)
    assert logs["outside_box"].item() == 0.5


def test_fql_losses_on_a_hand_built_batch():
    """The distillation target is the BC flow's explicit Euler loop; the loss is flow matching + alpha *
    distillation - the critics' mean Q (divided by mean |Q| with --normalize-q-loss); samples have no density."""
    torch.manual_seed(0)
    actor = nf_rlbc.FQLActor(3, 2, nf_rlbc.Args(policy="fql", encoder_dim=16, flow_steps=5))
    obs, actions = torch.randn(4, 3), torch.rand(4, 2) * 2 - 1
    batch = {"observations": obs, "actions": actions, "offline": torch.ones(4)}
    with torch.no_grad():
        z = torch.randn(4, 2)
        x = z.clone()
        for i in range(5):
            x = x + actor.velocity(torch.cat([obs, x, torch.full((4, 1), i / 5)], -1)) / 5
        torch.testing.assert_close(actor.bc_flow_actions(obs, z), x.clamp(-1, 1))
    for normalize in (False, True):
        actor.normalize_q_loss = normalize
        torch.manual_seed(1)
        loss, logs = actor.loss(batch, TableCritic(), bc_weight=3.0)
        torch.manual_seed(1)  # the same draws, in the loss's order: x0, t, z
        x0, t, z = torch.randn(4, 2), torch.rand(4, 1), torch.randn(4, 2)
        velocity = actor.velocity(torch.cat([obs, (1 - t) * x0 + t * actions, t], -1))
        bc_flow = (velocity - (actions - x0)).square().mean()
        pi = actor.one_step(torch.cat([obs, z], -1))
        distill = (pi - actor.bc_flow_actions(obs, z)).square().mean()
        q = TableCritic()(obs, pi.clamp(-1, 1)).mean(0)
        q_loss = -q.mean() / (q.abs().mean() if normalize else 1.0)
        torch.testing.assert_close(loss, bc_flow + 3.0 * distill + q_loss)
        torch.testing.assert_close(logs["distill_loss"], distill)
        torch.testing.assert_close(logs["outside_box"], (pi.abs() > 1).float().mean())
    # the distillation target carries no gradient: the velocity field learns from flow matching alone
    actor.zero_grad()
    torch.manual_seed(1)
    actor.loss(batch, TableCritic(), bc_weight=3.0)[0].backward()
    only_bc = [p.grad.clone() for p in actor.velocity.parameters()]
    actor.zero_grad()
    torch.manual_seed(1)
    x0, t = torch.randn(4, 2), torch.rand(4, 1)
    velocity = actor.velocity(torch.cat([obs, (1 - t) * x0 + t * actions, t], -1))
    (velocity - (actions - x0)).square().mean().backward()
    for got, want in zip(only_bc, (p.grad for p in actor.velocity.parameters())):
        torch.testing.assert_close(got, want)
    samples, log_prob = actor.sample(obs)
    assert samples.abs().max() <= 1 and (log_prob == 0).all()


def test_fql_refuses_the_maxent_terms(tmp_path, pointmaze_dir):
    base = source_args("ogbench", pointmaze_dir) + ["--output-dir", str(tmp_path), "--policy", "fql"] + QUICK
    for extra in (["--entropy-weight", "0.1"], ["--online-steps", "4", "--target-entropy", "-1"]):
        with pytest.raises(SystemExit, match="--policy fql has no log-density"):
            run(base + extra)


def test_the_two_critics_are_one_batched_network(tmp_path, pointmaze_dir):
    """Initialised as two separate MLPs would be (the same random draws) and computing what they compute, with
    both members' weights stacked; a checkpoint with two separate critics is refused in one line."""
    torch.manual_seed(0)
    critic = nf_rlbc.Critic(7, 3, 64)
    torch.manual_seed(0)
    members = [nf_rlbc.mlp([10] + [64] * 4 + [1], torch.nn.GELU, layer_norm=True) for _ in range(2)]
    obs, actions = torch.randn(32, 7), torch.randn(32, 3, requires_grad=True)
    separate = torch.stack([m(torch.cat([obs, actions], -1)).squeeze(-1) for m in members])
    batched = critic(obs, actions)
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(*(torch.autograd.grad(q.sum(), actions)[0] for q in (batched, separate)))
    assert len(list(critic.parameters())) == 18  # 5 linear and 4 LayerNorm layers, (weight, bias) each
    run_dir, _ = run(source_args("ogbench", pointmaze_dir) + ["--output-dir", str(tmp_path)] + QUICK)
    path = f"{run_dir}/checkpoints/step_6.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["critic"] = {f"nets.{i}.0.weight": torch.zeros(1) for i in range(2)}  # an older version's critics
    torch.save(checkpoint, path)
    with pytest.raises(SystemExit, match="not this version's one batched network"):
        run(["--resume", path])


def test_fql_one_step_policy_reproduces_the_bc_flow_when_alpha_is_large():
    """With a large alpha the critic barely pulls: the one-step policy becomes the BC flow's Euler map, which
    itself reproduces the data (two modes here: a = +-0.5 in the first action dimension)."""
    torch.manual_seed(0)
    actor = nf_rlbc.FQLActor(2, 2, nf_rlbc.Args(policy="fql", encoder_dim=64, flow_steps=10))
    optimizer = torch.optim.Adam(actor.parameters(), lr=1e-3)
    for _ in range(1200):
        obs = torch.randn(128, 2)
        modes = torch.randint(2, (128, 1)) * 1.0 - 0.5
        actions = torch.cat([modes, 0.1 * torch.randn(128, 1)], -1)
        batch = {"observations": obs, "actions": actions, "offline": torch.ones(128)}
        loss, _ = actor.loss(batch, TableCritic(), bc_weight=1000.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        obs, z = torch.randn(512, 2), torch.randn(512, 2)
        one_step, flow = actor.one_step(torch.cat([obs, z], -1)).clamp(-1, 1), actor.bc_flow_actions(obs, z)
    assert (one_step - flow).abs().mean() < 0.08  # the modes are 1.0 apart
    near_a_mode = ((flow[:, 0].abs() - 0.5).abs() < 0.15).float().mean()
    assert near_a_mode > 0.9 and 0.35 < (flow[:, 0] > 0).float().mean() < 0.65  # both modes kept


def test_compiled_training_computes_what_eager_training_does(tmp_path, pointmaze_dir):
    """--compile (torch.compile of the critics and the actor's networks; on a GPU the offline step is also captured
    as a CUDA graph, which scripts/gpu_check.sh runs there) gives the eager run's weights within float tolerance.
    Compiled code draws its random numbers with its own generator unless told to fall back to eager's."""
    base = source_args("ogbench", pointmaze_dir) + QUICK
    eager, _ = run(base + ["--output-dir", str(tmp_path / "eager")])
    with torch._inductor.config.patch(fallback_random=True):
        compiled, _ = run(base + ["--output-dir", str(tmp_path / "compiled"), "--compile"])
    for part in ("actor", "critic", "target_critic"):
        expected = torch.load(f"{eager}/checkpoints/step_6.pt", weights_only=True)[part]
        got = torch.load(f"{compiled}/checkpoints/step_6.pt", weights_only=True)[part]
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=f"{part}.{key}")
