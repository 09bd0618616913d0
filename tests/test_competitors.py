"""The competing policies of nf_gcbc.py and nf_bc.py: their samplers reproduce what they were trained on, their
sizes match the flow's, and the diffusion policy's EMA follows its definition."""

import pytest
import torch

import nf_bc
import nf_gcbc

MODES = torch.tensor([[-0.5, -0.5], [0.5, 0.5]])


def bimodal(n: int, generator) -> torch.Tensor:
    """Two tight modes with equal weight: a target that a single Gaussian cannot fit."""
    return MODES[torch.randint(2, (n,), generator=generator)] + 0.05 * torch.randn(n, 2, generator=generator)


def fit(policy, steps: int, loss_of):
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], 1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = loss_of(bimodal(64, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        policy.after_step() if hasattr(policy, "after_step") else None
    return policy.eval()


def assert_both_modes(samples: torch.Tensor):
    distance = torch.cdist(samples, MODES)
    share = distance.argmin(1).float().mean().item()
    assert 0.35 < share < 0.65, f"mode shares {1 - share:.2f} / {share:.2f}: a mode is lost"
    assert distance.min(1).values.mean() < 0.1, f"mean distance to the nearest mode {distance.min(1).values.mean():.3f}"


@pytest.mark.parametrize("name,steps", [("diffusion", 3000), ("flow-matching", 3000)])
def test_nf_bc_samplers_fit_a_bimodal_target(name, steps):
    torch.manual_seed(0)
    args = nf_bc.Args(obs_horizon=1, action_horizon=1, num_blocks=2, hidden_dim=64, rep_dim=16, diffusion_steps=10)
    policy = nf_bc.POLICIES[name](1, 2, args)
    obs = torch.zeros(64, 1, 1)
    fit(policy, steps, lambda a: policy.loss(obs, a[:, None], *policy.draw(a[:, None])).mean())
    for sampler_steps in (10, 100) if name == "diffusion" else (10,):  # DDIM and DDPM from the same network
        policy.steps = sampler_steps
        with torch.no_grad():
            generator = torch.Generator().manual_seed(1)
            randn = lambda *s: torch.randn(2000, *s, generator=generator)  # noqa: E731
            assert_both_modes(policy.act(torch.zeros(2000, 1, 1), randn)[:, 0])


def test_nf_gcbc_flow_matching_fits_a_bimodal_target():
    torch.manual_seed(0)
    policy = nf_gcbc.FlowMatchingPolicy(1, 2, nf_gcbc.Args(num_blocks=2, hidden_dim=64, rep_dim=16))
    obs = torch.zeros(64, 1)
    fit(policy, 1500, lambda a: policy.loss(obs, obs, a, *policy.draw(a)).mean())
    with torch.no_grad():
        zeros = torch.zeros(2000, 1)
        assert_both_modes(
            policy.act(zeros, zeros, lambda *s: torch.randn(2000, *s, generator=torch.Generator().manual_seed(1)))
        )


@pytest.mark.parametrize("script,names", [(nf_gcbc, ["flow-matching"]), (nf_bc, ["diffusion", "flow-matching"])])
def test_competitors_have_the_flows_size_at_the_default_settings(script, names):
    obs_dim, action_dim = (28, 5) if script is nf_gcbc else (2, 2)  # cube-single; the multigoal maze
    args = script.Args()
    flow = sum(p.numel() for p in script.FlowPolicy(obs_dim, action_dim, args).parameters())
    for name in names:
        policy = script.POLICIES[name](obs_dim, action_dim, args)
        trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        assert abs(trained / flow - 1) < 0.01, (name, trained, flow)


def test_building_a_competitor_leaves_the_random_stream_alone():
    """The flow that sizes a competitor is built aside: the competitor's layers get the numbers they would get
    without it, and the stream goes on from there."""
    args = nf_gcbc.Args(num_blocks=2, hidden_dim=16, rep_dim=8)
    torch.manual_seed(0)
    policy = nf_gcbc.FlowMatchingPolicy(3, 2, args)
    after_building = torch.rand(3)
    torch.manual_seed(0)
    encoder = nf_gcbc.mlp([6] + [512] * 4 + [8], torch.nn.SiLU, layer_norm=True)
    velocity = nf_gcbc.mlp([2 + 32 + 8] + [policy.velocity[0].out_features] * 4 + [2], torch.nn.GELU, False)
    torch.testing.assert_close(torch.rand(3), after_building, rtol=0, atol=0)
    for built, alone in ((policy.encoder, encoder), (policy.velocity, velocity)):
        for a, b in zip(built.parameters(), alone.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_diffusion_ema_follows_its_decay_schedule():
    torch.manual_seed(0)
    args = nf_bc.Args(obs_horizon=1, action_horizon=2, num_blocks=2, hidden_dim=16, rep_dim=8)
    policy = nf_bc.DiffusionPolicy(3, 2, args)
    live = lambda: [p.detach().clone() for p in [*policy.encoder.parameters(), *policy.net.parameters()]]  # noqa: E731
    ema = lambda: [p.detach().clone() for p in policy.ema.parameters()]  # noqa: E731
    expected = ema()
    for n in range(4):
        with torch.no_grad():
            for p in [*policy.encoder.parameters(), *policy.net.parameters()]:
                p.add_(torch.randn_like(p))
        decay = min(0.9999, 1 - (1 + n) ** -0.75)  # 0 at the first update: the EMA starts as a copy
        expected = [decay * e + (1 - decay) * p for e, p in zip(expected, live())]
        policy.after_step()
        for e, got in zip(expected, ema()):
            torch.testing.assert_close(got, e)
    assert not any(p.requires_grad for p in policy.ema.parameters())


@pytest.mark.parametrize("script", ["nf_gcbc", "nf_bc"])
def test_the_speed_benchmark_times_the_scripts_own_policies(script, capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(nf_bc.__file__).parent / "benchmarks" / "policy_speed.py"
    spec = importlib.util.spec_from_file_location("policy_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.Args(script=script, num_blocks=2, hidden_dim=16, rep_dim=8, batch_size=8, rounds=1, min_time=0)
    bench.main(args)
    rows = [line.split(" | ")[0][2:] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    expected = ["flow+denoise", "flow", "gaussian"] + (["ddim-10", "ddpm-100"] if script == "nf_bc" else []) + ["fm-10"]
    assert rows[1:] == expected  # after the header
