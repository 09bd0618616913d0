"""The maths of flow.py: inversion, log-determinants, normalisation, sampling, fitting, gradients.

Figures the issue asks for are printed (run with -s to see them).
"""

import math

import pytest
import torch

from flow import ConditionalFlow, denoise, standard_normal_log_prob

DIMS = [1, 2, 3, 5, 8]


def perturbed_flow(dim, cond_dim=4, scale=0.3, seed=0, dtype=torch.float64, **kwargs):
    """A flow whose parameters are all moved away from the (identity-coupling) initialisation."""
    torch.manual_seed(seed)
    flow = ConditionalFlow(dim, cond_dim, num_blocks=3, hidden_dim=32, **kwargs).to(dtype)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow


@pytest.mark.filterwarnings("ignore:torch.searchsorted")  # vmap hands searchsorted a strided view
@pytest.mark.parametrize("dim", DIMS)
def test_inverse_and_log_det_match_autograd_jacobian(dim):
    flow = perturbed_flow(dim)
    x, cond = 1.5 * torch.randn(64, dim, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
    z, log_det = flow(x, cond)
    inv_err = (flow.inverse(z, cond) - x).abs().max().item()
    jac = torch.func.vmap(torch.func.jacrev(lambda xi, ci: flow(xi[None], ci[None])[0][0]))(x, cond)
    ld_err = (torch.linalg.slogdet(jac)[1] - log_det).abs().max().item()
    print(f"dim {dim}: inversion error {inv_err:.2e}, log-det error {ld_err:.2e}")
    assert inv_err < 1e-7 and ld_err < 1e-9  # the spline's steep bins amplify rounding in the inverse
    # the inverse pass reports the same log-det (used by sample_with_log_prob)
    _, terms = flow._inverse(z, cond)
    assert torch.allclose(torch.cat(terms, -1).sum(-1) + flow.linear.log_det(), log_det, atol=1e-9)


@pytest.mark.parametrize("dim", DIMS)
def test_float32_batch_one_and_no_context(dim):
    flow = perturbed_flow(dim, cond_dim=0, scale=0.1, dtype=torch.float32)
    x, cond = torch.randn(1, dim), torch.zeros(1, 0)
    z, log_det = flow(x, cond)
    assert z.shape == (1, dim) and log_det.shape == (1,) and z.dtype == torch.float32
    assert torch.allclose(flow.inverse(z, cond), x, atol=1e-4)


@pytest.mark.parametrize("dim", DIMS)
def test_identity_couplings_at_init(dim):
    """At initialisation every coupling is the identity and the flow is a rotation (the LU maps start
    orthogonal), so log p(x) is exactly the standard normal's."""
    torch.manual_seed(dim)
    flow = ConditionalFlow(dim, 3).double()
    x, cond = torch.randn(16, dim, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    for coupling in flow.couplings:
        y, ld = coupling(x, cond)
        assert torch.allclose(y, x, atol=1e-12) and ld.abs().max() < 1e-12
    z, log_det = flow(x, cond)  # the orthogonal init was computed in float32: exact up to ~D * 1e-7 per block
    tol = 1e-6 * dim
    assert torch.allclose(log_det, torch.zeros(16, dtype=torch.float64), atol=tol)
    assert torch.allclose(z.norm(dim=-1), x.norm(dim=-1), atol=tol)
    assert torch.allclose(flow.log_prob(x, cond), standard_normal_log_prob(x), atol=tol)


def grid(dim, half_width, n):
    axis = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    cell = (axis[1] - axis[0]).item() ** dim
    points = torch.stack(torch.meshgrid(*[axis] * dim, indexing="ij"), -1).reshape(-1, dim)
    return points, cell


@pytest.mark.parametrize("dim", [1, 2])
def test_density_integrates_to_one(dim):
    flow = perturbed_flow(dim, scale=0.05)  # larger perturbations give tails beyond any affordable grid
    points, cell = grid(dim, 9.0, 4001 if dim == 1 else 601)
    cond = torch.randn(1, 4, dtype=torch.float64).expand(len(points), 4)
    with torch.no_grad():
        integral = (flow.log_prob(points, cond).exp().sum() * cell).item()
    print(f"dim {dim}: integral of exp(log_prob) on the grid = {integral:.5f}")
    assert abs(integral - 1) < 5e-3


def test_samples_follow_log_prob():
    """Histogram of 200k samples against the density integrated over the same bins (2-D)."""
    flow = perturbed_flow(2, scale=0.15, seed=1)
    cond = torch.randn(1, 4, dtype=torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        samples, sample_log_prob = flow.sample_with_log_prob(cond.expand(200_000, 4))
        assert torch.allclose(sample_log_prob, flow.log_prob(samples, cond.expand(200_000, 4)), atol=1e-9)
        points, cell = grid(2, 6.0, 481)  # 480 x 480 cells of width 0.025, grouped into 20 x 20 bins
        dens = flow.log_prob(points, cond.expand(len(points), 4)).exp().reshape(481, 481)[:-1, :-1]
    bins = 20
    expected = dens.reshape(bins, 24, bins, 24).sum((1, 3)) * cell
    edges = torch.linspace(-6.0, 6.0, bins + 1, dtype=torch.float64)
    counts = torch.histogramdd(samples, bins=[edges, edges]).hist / len(samples)
    tv = 0.5 * (counts - expected).abs().sum().item()
    print(f"total variation between sample histogram and integrated density: {tv:.4f}")
    assert tv < 0.02


def fit(model_log_prob, params, target_sampler, steps, lr=3e-3, batch=512):
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = -model_log_prob(target_sampler(batch)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def mixture(means, std):
    means = torch.as_tensor(means, dtype=torch.float32)

    def sample(n):
        return means[torch.randint(len(means), (n,))] + std * torch.randn(n, means.shape[1])

    def log_prob(x):
        comp = standard_normal_log_prob((x[:, None, :] - means) / std) - means.shape[1] * math.log(std)
        return torch.logsumexp(comp, 1) - math.log(len(means))

    return sample, log_prob


@pytest.mark.parametrize(
    "dim, means, std, steps",
    [(2, [[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]], 0.4, 1500), (1, [[-2.0], [2.0]], 0.3, 1000)],
)
def test_fit_multimodal_target(dim, means, std, steps):
    """The flow's NLL reaches the target's entropy; the best Gaussian (moment-matched) cannot."""
    torch.manual_seed(0)
    sample, true_log_prob = mixture(means, std)
    entropy = -true_log_prob(sample(200_000)).mean().item()
    data = sample(200_000)
    gaussian_nll = 0.5 * torch.logdet(2 * math.pi * math.e * torch.cov(data.T).reshape(dim, dim)).item()
    flow = ConditionalFlow(dim, 1, num_blocks=4, hidden_dim=64)
    cond = torch.zeros(512, 1)
    fit(lambda x: flow.log_prob(x, cond[: len(x)]), flow.parameters(), sample, steps)
    with torch.no_grad():
        test = sample(20_000)
        nll = -flow.log_prob(test, torch.zeros(len(test), 1)).mean().item()
    print(f"dim {dim}: flow NLL {nll:.3f}, true entropy {entropy:.3f}, best Gaussian NLL {gaussian_nll:.3f}")
    assert nll < entropy + 0.1
    assert gaussian_nll > entropy + 0.5  # the target really is out of a Gaussian's reach
    if dim == 1:  # bimodal: little density between the modes, samples on both sides
        with torch.no_grad():
            density = flow.log_prob(torch.tensor([[-2.0], [0.0], [2.0]]), torch.zeros(3, 1)).exp()
            samples = flow.sample(torch.zeros(10_000, 1))
        assert density[1] < 0.1 * density[0] and density[1] < 0.1 * density[2]
        assert 0.4 < (samples > 0).float().mean().item() < 0.6


def test_affine_only_flow_is_gaussian_at_dim_one():
    """Without the spline a 1-D flow is an affine map of N(0, 1): why dim 1 gets one by default."""
    torch.manual_seed(0)
    flow = ConditionalFlow(1, 1, num_blocks=4, hidden_dim=64, num_bins=0)
    sample, _ = mixture([[-2.0], [2.0]], 0.3)
    cond = torch.zeros(512, 1)
    fit(lambda x: flow.log_prob(x, cond), flow.parameters(), sample, 300)
    with torch.no_grad():
        x = torch.linspace(-3, 3, 7)[:, None]
        log_p = flow.log_prob(x, torch.zeros(7, 1))
    second_diff = log_p[2:] - 2 * log_p[1:-1] + log_p[:-2]  # a Gaussian's log-density is an exact parabola
    assert torch.allclose(second_diff, second_diff[0].expand(5), atol=1e-4)


@pytest.mark.parametrize("dim", [1, 5])
def test_gradients_reach_parameters_and_context_through_sample(dim):
    flow = perturbed_flow(dim, scale=0.1, dtype=torch.float32)
    cond = torch.randn(8, 4, requires_grad=True)
    flow.sample(cond).square().sum().backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    for name, p in flow.named_parameters():
        if dim == 1 and name in ("linear.lower", "linear.upper"):
            continue  # a 1 x 1 map has no off-diagonal entries
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    flow.zero_grad()
    x, log_prob = flow.sample_with_log_prob(cond)
    log_prob.sum().backward()
    assert all(p.grad is not None for p in flow.parameters())


def test_given_latent_makes_sampling_deterministic():
    flow = perturbed_flow(3)
    cond = torch.randn(5, 4, dtype=torch.float64)
    z = torch.zeros(5, 3, dtype=torch.float64)
    assert torch.equal(flow.sample(cond, z=z), flow.sample(cond, z=z))
    assert torch.allclose(flow(flow.sample(cond, z=z), cond)[0], z, atol=1e-9)


def test_cached_matrices_follow_parameter_updates():
    """Evaluation caches W^-1; an optimiser step or a state_dict load must invalidate it."""
    flow = perturbed_flow(4, scale=0.05)
    cond, z = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    opt = torch.optim.SGD(flow.parameters(), lr=1e-2)
    for _ in range(3):
        with torch.no_grad():
            x = flow.inverse(z, cond)
            assert torch.allclose(flow(x, cond)[0], z, atol=1e-9)
        opt.zero_grad()
        (-flow.log_prob(torch.randn(6, 4, dtype=torch.float64), cond).mean()).backward()
        opt.step()
    other = perturbed_flow(4, seed=5)
    flow.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.allclose(flow.inverse(z, cond), other.inverse(z, cond), atol=1e-12)


def test_cached_matrices_follow_fused_optimiser_steps_between_evaluations():
    """The scripts' pattern: evaluate in eval mode, train in train mode with a fused AdamW (which updates the
    parameters without bumping their version counters). Each evaluation must see the current parameters."""
    flow = perturbed_flow(4, scale=0.05).float()
    reference = perturbed_flow(4, scale=0.05).float()
    cond, z = torch.randn(6, 4), torch.randn(6, 4)
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-2, fused=True)
    for _ in range(3):
        flow.eval()
        with torch.no_grad():
            x = flow.inverse(z, cond)
            reference.load_state_dict(flow.state_dict())
            torch.testing.assert_close(x, reference.inverse(z, cond), rtol=0, atol=0)
        flow.train()
        opt.zero_grad()
        (-flow.log_prob(torch.randn(6, 4), cond).mean()).backward()
        opt.step()


def test_denoise_is_the_tweedie_step():
    """At initialisation p(x) = N(0, I), so grad log p = -x and the step is x (1 - sigma^2)."""
    flow = ConditionalFlow(3, 2).double()
    x, cond = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    with torch.no_grad():
        out = denoise(flow, x, cond, sigma=0.1)
    assert torch.allclose(out, x * (1 - 0.01), atol=1e-12)
    assert not out.requires_grad and all(p.grad is None for p in flow.parameters())


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="dim >= 1"):
        ConditionalFlow(0, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    flow = perturbed_flow(5, dtype=torch.float32)
    x, cond = torch.randn(32, 5), torch.randn(32, 4)
    expected = flow.log_prob(x, cond)
    got = flow.cuda().log_prob(x.cuda(), cond.cuda()).cpu()
    assert torch.allclose(got, expected, atol=1e-4)
    with torch.no_grad():
        assert flow.sample(cond.cuda()).device.type == "cuda"


def test_compiled_flow_computes_what_the_eager_flow_does():
    """flow.compile() (used by every script's --compile) changes speed, not maths or state_dict keys."""
    torch.manual_seed(0)
    eager = ConditionalFlow(3, 4, num_blocks=2, hidden_dim=16)
    with torch.no_grad():
        for p in eager.parameters():  # away from the identity initialisation
            p.add_(0.1 * torch.randn_like(p))
    compiled = ConditionalFlow(3, 4, num_blocks=2, hidden_dim=16)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x, z, cond = torch.randn(32, 3), torch.randn(32, 3), torch.randn(32, 4)
    torch.testing.assert_close(compiled.log_prob(x, cond), eager.log_prob(x, cond), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.sample(cond, z), eager.sample(cond, z), rtol=1e-5, atol=1e-5)
    samples, log_prob = compiled.sample_with_log_prob(cond)  # its own random draws: check self-consistency
    torch.testing.assert_close(log_prob, eager.log_prob(samples, cond), rtol=1e-4, atol=1e-4)
    (-compiled.log_prob(x, cond).mean()).backward()
    assert all(p.grad is not None for p in compiled.parameters())
