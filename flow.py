"""A conditional normalizing flow: invertible LU-linear maps and affine couplings with LayerNorm MLPs.

The model of "Normalizing Flows are Capable Models for RL" (Ghugare & Eysenbach, 2025). One network gives
exact log-likelihoods, one-pass sampling and reparameterised samples. Shapes: data x and latents z are
[B, D], the context (an embedding of state, goal, ...) is [B, C]. Data -> latent is called `forward`.

Each of the T blocks applies, in the data -> latent direction,
  1. x <- x W with W = P L (U + diag(s)): P a fixed permutation, L unit-lower, U strictly upper;
  2. an affine coupling: x1 = x[:, :ceil(D/2)] is kept, x2 <- (x2 - t) * exp(-s) with s, t = net([x1, cond]).
At D = 1 there is nothing to condition on, and affine maps of a Gaussian stay Gaussian, so the coupling
there reads the context alone and follows the affine map with a monotone rational-quadratic spline
(Durkan et al., 2019), which makes the 1-D flow multimodal. `num_bins` turns the spline on at any D.

On GPUs keep float32 matrix products in full precision (PyTorch's default; do not set
torch.backends.cuda.matmul.allow_tf32): TF32's 10-bit mantissa makes inverse(forward(x)) drift from x and
biases the log-determinants, which are sums over every block.
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dim: [B, D] -> [B]."""
    return -0.5 * (z.square().sum(-1) + z.shape[-1] * LOG_2PI)


class LULinear(nn.Module):
    """The invertible linear maps of all T blocks, W_k = P_k L_k (U_k + diag(s_k)), built in one batched op.

    Initialised from the LU factors of a random orthogonal matrix per block. |s| is learned as log|s| with a
    fixed sign (the paper's code learns s itself), so W can never become singular.
    """

    def __init__(self, dim: int, num: int):
        super().__init__()
        perms, lowers, uppers = zip(*(torch.linalg.lu(torch.linalg.qr(torch.randn(dim, dim))[0]) for _ in range(num)))
        upper = torch.stack(uppers)
        s = torch.diagonal(upper, dim1=-2, dim2=-1)
        self.register_buffer("perm", torch.stack(perms))  # [T, D, D] permutation matrices
        self.register_buffer("sign_s", s.sign())
        self.register_buffer("lower_mask", torch.tril(torch.ones(dim, dim), -1))
        self.register_buffer("eye", torch.eye(dim))
        self.lower = nn.Parameter(torch.stack(lowers))  # only the strictly lower part is used
        self.upper = nn.Parameter(upper)  # only the strictly upper part is used
        self.log_abs_s = nn.Parameter(s.abs().log())  # [T, D]
        self._cache = {}  # inverse (bool) -> (parameter versions, matrices)

    def log_det(self) -> Tensor:
        """log|det W| summed over all blocks (a scalar: it does not depend on x)."""
        return self.log_abs_s.sum()

    def train(self, mode: bool = True):
        self._cache = {}  # every switch between train and eval mode drops the cached matrices
        return super().train(mode)

    def matrices(self, inverse: bool) -> Tuple[Tensor, ...]:
        """W (or W^-1 when `inverse`) of every block, T tensors [D, D]. Cached in eval mode with gradients off
        while the parameters are unchanged, so evaluation never rebuilds or re-inverts them. Only in eval mode:
        fused optimisers update parameters without bumping their version counters, so the cache is dropped
        at train()/eval() too. torch.compile, which would recompile on the cache, bypasses it."""
        use_cache = not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if use_cache:
            key = tuple((p._version, p.data_ptr()) for p in (self.lower, self.upper, self.log_abs_s))
            if inverse in self._cache and self._cache[inverse][0] == key:
                return self._cache[inverse][1]
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.mT + torch.diag_embed(self.sign_s * self.log_abs_s.exp())
        if inverse:  # W^-1 = (U + diag s)^-1 L^-1 P^T by two triangular solves
            m = torch.linalg.solve_triangular(lower, self.perm.mT, upper=False, unitriangular=True)
            m = torch.linalg.solve_triangular(upper, m, upper=True)
        else:
            m = self.perm @ lower @ upper
        m = m.unbind(0)
        if use_cache:
            self._cache[inverse] = (key, m)
        return m


def rq_spline(x: Tensor, params: Tensor, inverse: bool, bound: float = 4.0) -> Tuple[Tensor, Tensor]:
    """Monotone rational-quadratic spline on [-bound, bound], identity outside.

    x: [B, D]; params: [B, D, 3K-1] unnormalised bin widths, heights and inner knot derivatives. Returns the
    output and the data -> latent log|derivative| elementwise, [B, D]. Zero params give the identity.
    """
    num_bins = (params.shape[-1] + 1) // 3
    min_size, min_deriv = 1e-3, 1e-3
    w, h, d = params.split([num_bins, num_bins, num_bins - 1], dim=-1)
    knots_x, knots_y = [  # [B, D, K+1], from -bound to bound
        F.pad(torch.cumsum(min_size + (1 - min_size * num_bins) * torch.softmax(v, -1), -1), (1, 0)) * 2 * bound - bound
        for v in (w, h)
    ]
    d = min_deriv + F.softplus(d + math.log(math.expm1(1 - min_deriv)))  # 1 at zero params
    d = F.pad(d, (1, 1), value=1.0)  # slope 1 at both ends matches the identity tails
    inside = x.abs() < bound
    x_in = x.clamp(-bound, bound).unsqueeze(-1)
    k = torch.searchsorted((knots_y if inverse else knots_x)[..., 1:-1].contiguous(), x_in.contiguous())
    x0, x1, y0, y1, d0, d1 = (
        t.gather(-1, k).squeeze(-1) for t in (knots_x, knots_x[..., 1:], knots_y, knots_y[..., 1:], d, d[..., 1:])
    )
    width, height, x_in = x1 - x0, y1 - y0, x_in.squeeze(-1)
    slope = height / width
    if inverse:  # solve the quadratic for the position xi in the bin
        dy, c = x_in - y0, d0 + d1 - 2 * slope
        qa, qb, qc = height * (slope - d0) + dy * c, height * d0 - dy * c, -slope * dy
        xi = 2 * qc / (-qb - (qb.square() - 4 * qa * qc).clamp_min(0).sqrt())
        out = x0 + xi * width
    else:
        xi = (x_in - x0) / width
    xi1 = xi * (1 - xi)
    denom = slope + (d0 + d1 - 2 * slope) * xi1
    if not inverse:
        out = y0 + height * (slope * xi.square() + d0 * xi1) / denom
    log_deriv = 2 * slope.log() + (d1 * xi.square() + 2 * slope * xi1 + d0 * (1 - xi).square()).log() - 2 * denom.log()
    return torch.where(inside, out, x), torch.where(inside, log_deriv, torch.zeros_like(log_deriv))


class AffineCoupling(nn.Module):
    """x2 <- (x2 - t) * exp(-s) with [s, t] = net([x1, cond]); x1 is kept. Optional spline after the affine map.

    net: Linear -> LeakyReLU -> LayerNorm -> Linear -> LeakyReLU -> LayerNorm -> Linear (zero-initialised, so
    every block starts as the identity); one net gives both s and t. Its layers are called functionally:
    at batch 1 the module-call overhead is a sixth of the sampling time.
    """

    def __init__(self, dim: int, cond_dim: int, hidden_dim: int, num_bins: int = 0):
        super().__init__()
        self.split = (dim + 1) // 2 if dim > 1 else 0  # x1 = x[:, :split], x2 = the rest
        self.num_bins = num_bins
        self.per_dim = 2 + (3 * num_bins - 1 if num_bins else 0)  # s, t and the spline's parameters
        self.hidden = nn.ModuleList([nn.Linear(self.split + cond_dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim)])
        self.norms = nn.ModuleList([nn.LayerNorm(hidden_dim), nn.LayerNorm(hidden_dim)])
        self.out = nn.Linear(hidden_dim, (dim - self.split) * self.per_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _params(self, x1: Tensor, cond: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        h = torch.cat([x1, cond], -1)
        for linear, norm in zip(self.hidden, self.norms):
            h = F.leaky_relu(F.linear(h, linear.weight, linear.bias))
            h = F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        out = F.linear(h, self.out.weight, self.out.bias)
        if not self.num_bins:
            half = out.shape[-1] // 2
            return out[:, :half], out[:, half:], None  # two slices: cheaper than chunk at batch 1
        out = out.unflatten(-1, (-1, self.per_dim))
        return out[..., 0], out[..., 1], out[..., 2:]

    def forward(self, x: Tensor, cond: Tensor) -> Tuple[Tensor, Tensor]:
        """Data -> latent: returns z [B, D] and the log|det| terms [B, *] (their sum is the log|det|)."""
        x1, x2 = x[:, : self.split], x[:, self.split :]
        s, t, spline = self._params(x1, cond)
        x2 = (x2 - t) * torch.exp(-s)
        log_det = -s
        if spline is not None:
            x2, log_deriv = rq_spline(x2, spline, inverse=False)
            log_det = torch.cat([log_det, log_deriv], -1)
        return torch.cat([x1, x2], -1), log_det

    def inverse(self, z: Tensor, cond: Tensor) -> Tuple[Tensor, Tensor]:
        """Latent -> data: returns x [B, D] and the log|det| terms of the data -> latent direction [B, *]."""
        z1, z2 = z[:, : self.split], z[:, self.split :]
        s, t, spline = self._params(z1, cond)
        log_det = -s
        if spline is not None:
            z2, log_deriv = rq_spline(z2, spline, inverse=True)
            log_det = torch.cat([log_det, log_deriv], -1)
        return torch.cat([z1, torch.addcmul(t, z2, torch.exp(s))], -1), log_det


class ConditionalFlow(nn.Module):
    """p(x | cond) for x in R^dim: T blocks of (LU-linear map, affine coupling) over a standard-normal prior.

    num_bins: bins of the monotone spline in every coupling; None means 8 at dim = 1 (where an affine flow
    would be Gaussian) and none otherwise, the paper's architecture.
    """

    def __init__(
        self, dim: int, cond_dim: int, num_blocks: int = 6, hidden_dim: int = 256, num_bins: Optional[int] = None
    ):
        super().__init__()
        if dim < 1 or cond_dim < 0 or num_blocks < 1:
            raise ValueError(
                f"ConditionalFlow needs dim >= 1, cond_dim >= 0, num_blocks >= 1; got {dim}, {cond_dim}, {num_blocks}"
            )
        if num_bins is None:
            num_bins = 8 if dim == 1 else 0
        self.dim = dim
        self.linear = LULinear(dim, num_blocks)
        self.couplings = nn.ModuleList(AffineCoupling(dim, cond_dim, hidden_dim, num_bins) for _ in range(num_blocks))

    def compile(self, **kwargs):
        """torch.compile this flow in place: forward, inverse, log_prob, sample and sample_with_log_prob become
        one graph each (the blocks unrolled). Parameters and state_dict keys are unchanged."""
        for name in ("forward", "inverse", "log_prob", "sample", "sample_with_log_prob"):
            setattr(self, name, torch.compile(getattr(self, name), **kwargs))

    def forward(self, x: Tensor, cond: Tensor) -> Tuple[Tensor, Tensor]:
        """Data -> latent: x [B, D], cond [B, C] -> (z [B, D], log|det dz/dx| [B])."""
        terms = []
        for w, coupling in zip(self.linear.matrices(inverse=False), self.couplings):
            x, log_det = coupling(x @ w, cond)
            terms.append(log_det)
        return x, torch.cat(terms, -1).sum(-1) + self.linear.log_det()

    def _inverse(self, z: Tensor, cond: Tensor) -> Tuple[Tensor, List[Tensor]]:
        terms = []  # summed only by the callers that need the log-det
        for w, coupling in zip(reversed(self.linear.matrices(inverse=True)), reversed(self.couplings)):
            z, log_det = coupling.inverse(z, cond)
            z = z @ w
            terms.append(log_det)
        return z, terms

    def inverse(self, z: Tensor, cond: Tensor) -> Tensor:
        """Latent -> data: z [B, D], cond [B, C] -> x [B, D]. Differentiable in z, cond and the parameters."""
        return self._inverse(z, cond)[0]

    def log_prob(self, x: Tensor, cond: Tensor) -> Tensor:
        """Exact log p(x | cond), [B]."""
        z, log_det = self(x, cond)
        return standard_normal_log_prob(z) + log_det

    def sample(self, cond: Tensor, z: Optional[Tensor] = None) -> Tensor:
        """x = f^-1(z; cond) with z ~ N(0, I) unless given (e.g. zeros); reparameterised. [B, C] -> [B, D]."""
        if z is None:
            z = torch.randn(cond.shape[0], self.dim, device=cond.device, dtype=cond.dtype)
        return self.inverse(z, cond)

    def sample_with_log_prob(self, cond: Tensor) -> Tuple[Tensor, Tensor]:
        """A reparameterised sample and its exact log p(x | cond) from one inverse pass: ([B, D], [B])."""
        z = torch.randn(cond.shape[0], self.dim, device=cond.device, dtype=cond.dtype)
        x, terms = self._inverse(z, cond)
        return x, standard_normal_log_prob(z) + torch.cat(terms, -1).sum(-1) + self.linear.log_det()


def denoise(flow: ConditionalFlow, x: Tensor, cond: Tensor, sigma: float) -> Tensor:
    """Tweedie's one-step denoising x + sigma^2 * grad_x log p(x | cond), for a flow trained on data plus
    N(0, sigma^2) noise. No gradient reaches the parameters; call it under no_grad, not inference_mode."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (score,) = torch.autograd.grad(flow.log_prob(x, cond.detach()).sum(), x)
    return (x + sigma**2 * score).detach()
