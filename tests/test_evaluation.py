"""Evaluation on a fixed pool of environments: every episode has its own seed and its own noise stream, so the same
episodes come out whatever the pool size (the memory setting), and memory does not grow with --eval-episodes. The
same up to float rounding: a matrix product may round a row differently in a batch of another size (~1e-7)."""

import functools
import os

import gymnasium
import numpy as np
import ogbench
import pytest
import torch

import nf_bc
import nf_gcbc
import nf_rlbc

CPU = torch.device("cpu")


class Recorder(gymnasium.Wrapper):
    """Keeps every episode's actions and observations in `log`, keyed by the episode's reset seed."""

    def __init__(self, env, log: dict):
        super().__init__(env)
        self.log = log

    def reset(self, *, seed=None, options=None):
        self.seed, self.log[seed] = seed, []
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        out = self.env.step(action)
        self.log[self.seed].append((np.array(action), out[0]))
        return out


def evaluate(script: str, envs):
    """One evaluation of an untrained policy of `script` (a stochastic one: its noise matters) on `envs`."""
    space = envs[0].observation_space
    envs = nf_gcbc.EnvPool(iter(envs).__next__, len(envs))
    torch.manual_seed(0)
    small = dict(num_blocks=2, hidden_dim=32, eval_episodes=5, eval_max_steps=12, seed=3)
    if script == "nf_gcbc":
        args = nf_gcbc.Args(**small)
        policy = nf_gcbc.FlowPolicy(2, 2, args)
        obs, actions = torch.randn(4, 2), torch.rand(4, 2) * 2 - 1
        return nf_gcbc.evaluate(policy, envs, 5, (obs, actions, obs, policy.draw(actions)), args, CPU, 7, None)
    if script == "nf_bc":  # DDPM draws fresh noise at every step of every chunk
        args = nf_bc.Args(**small, policy="diffusion", diffusion_steps=100, obs_horizon=2, exec_horizon=3)
        policy = nf_bc.DiffusionPolicy(2, 2, args)
        policy.set_units(torch.randn(10, 2), -np.ones(2), np.ones(2))
        return nf_bc.evaluate(policy, envs, space, None, args, CPU, 7, None, None)
    args = nf_rlbc.Args(**small, policy="fql")
    actor = nf_rlbc.FQLActor(2, 2, args)
    actor.set_box(-np.ones(2), np.ones(2))
    return nf_rlbc.evaluate(actor, envs, space, args, CPU, 7, None, None)


@pytest.mark.parametrize("script", ["nf_gcbc", "nf_bc", "nf_rlbc"])
def test_an_evaluation_gives_the_same_episodes_on_any_number_of_envs(script):
    env_id = "pointmaze-medium-navigate-v0" if script == "nf_gcbc" else "pointmaze-medium-navigate-singletask-v0"
    runs = []
    for pool in (1, 2, 5):
        log = {}
        envs = [Recorder(ogbench.make_env_and_datasets(env_id, env_only=True), log) for _ in range(pool)]
        runs.append((evaluate(script, envs), log))
    (stats, log), others = runs[0], runs[1:]
    assert len(log) == (25 if script == "nf_gcbc" else 5)  # 5 tasks x 5 episodes, or 5 episodes
    assert all(len(steps) == 12 for steps in log.values())
    for other_stats, other_log in others:
        assert other_stats == stats
        assert other_log.keys() == log.keys()
        for seed, steps in log.items():
            for (action, ob), (other_action, other_ob) in zip(steps, other_log[seed]):
                np.testing.assert_allclose(action, other_action, rtol=0, atol=1e-5)
                np.testing.assert_allclose(ob, other_ob, rtol=0, atol=1e-5)
    actions = [a for steps in log.values() for a, _ in steps]
    assert len({tuple(a) for a in actions}) > len(actions) // 2  # the policy's noise differs between episodes


def test_the_pool_starts_waiting_episodes_on_envs_that_finish():
    """Episodes of different lengths: each env takes the next waiting episode as soon as its own ends."""
    lengths = {0: 3, 1: 1, 2: 2, 3: 1}

    class Short(gymnasium.Env):
        observation_space = action_space = gymnasium.spaces.Box(-1, 1, (1,))

        def reset(self, *, seed=None, options=None):
            self.episode, self.t = options["episode"], 0
            return np.zeros(1, np.float32), {}

        def step(self, action):
            self.t += 1
            info = {"success": float(self.episode == 2)}
            return np.zeros(1, np.float32), 1.0, self.t == lengths[self.episode], False, info

    calls = []

    def act(episodes, obs):
        calls.append(episodes)
        return np.zeros((len(episodes), 1), np.float32)

    envs = nf_gcbc.EnvPool(Short, 2)
    returns, success, last = nf_gcbc.run_episodes(envs, 4, lambda reset, e: reset(e, episode=e)[0], act, None)
    assert calls == [[0, 1], [0, 2], [0, 2], [3]]
    np.testing.assert_array_equal(returns, [3, 1, 2, 1])
    np.testing.assert_array_equal(success, [0, 0, 1, 0])
    assert [info["success"] for info in last] == [0, 0, 1, 0]


def test_worker_processes_step_the_same_episodes_as_this_process():
    """--eval-workers: the envs live in other processes and step in parallel; the episodes are the same."""
    make_env = functools.partial(ogbench.make_env_and_datasets, "pointmaze-medium-navigate-v0", env_only=True)
    seen = []
    for workers in (0, 2):
        log, envs = {}, nf_gcbc.EnvPool(make_env, 3, workers)

        def start(reset, episode, log=log):
            ob, info = reset(100 + episode, task_id=1 + episode % 5)
            log[episode] = [ob, info["goal"]]
            return ob

        def act(episodes, obs, log=log):
            for e, ob in zip(episodes, obs):
                log[e].append(ob)
            return [np.random.default_rng([e, len(log[e])]).uniform(-1, 1, 2) for e in episodes]

        returns, _, _ = nf_gcbc.run_episodes(envs, 5, start, act, max_steps=15)
        seen.append((returns, log))
    np.testing.assert_array_equal(seen[0][0], seen[1][0])
    assert seen[0][1].keys() == seen[1][1].keys() == set(range(5))
    for e in range(5):
        np.testing.assert_array_equal(np.array(seen[0][1][e]), np.array(seen[1][1][e]))


@pytest.mark.parametrize(
    "make_env,says",
    [
        (functools.partial(ogbench.make_env_and_datasets, "nosuch-env-v0", env_only=True), "worker failed: "),
        (functools.partial(os._exit, 3), "worker died"),
    ],
)
def test_a_worker_that_fails_or_dies_stops_the_run_in_one_line(make_env, says):
    with pytest.raises(SystemExit, match=f"--eval-workers: an evaluation {says}") as stop:
        nf_rlbc.EnvPool(make_env, 2, workers=1)
    assert "\n" not in str(stop.value)
