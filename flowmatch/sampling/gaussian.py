"""Gaussian data on flowmatch's path, in closed form: the exact velocity field, flow map and densities.

The reference problem for the solvers and the likelihood (tests and ``benchmarks/solvers.py``): data
x0 ~ N(mu, Sigma), noise ~ N(0, I), x_t = (1 - t) x0 + t noise. With a = 1 - t, x_t is Gaussian with mean a mu
and covariance V_t = a^2 Sigma + t^2 I, and the marginal velocity E[noise - x0 | x_t = x] is

    v(x, t) = -mu + (t I - a Sigma) V_t^{-1} (x - a mu)

(the covariance of x_t with noise - x0 is t I - a Sigma). The ODE dx/dt = v carries noise x1 at t = 1 to
x_t = a mu + V_t^{1/2} x1, so x_0 = mu + Sigma^{1/2} x1 (for a diagonal Sigma = sigma^2: mu + sigma * x1); the
time derivative of V_t^{1/2} x1 is (t I - a Sigma) V_t^{-1/2} x1, which is the formula above. Sigma and V_t
share eigenvectors, so everything is diagonal in Sigma's eigenbasis and div v = sum_i (t - a l_i) / (a^2 l_i + t^2)
for the eigenvalues l_i.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["GaussianFlow"]


class GaussianFlow:
    """Closed-form flow of N(mean, cov) data in D dimensions; inputs are (B, ...) with D elements per example."""

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"need mean (D,) and cov (D, D); got {tuple(mean.shape)} and {tuple(cov.shape)}")
        self.mean = mean
        self.cov = cov
        eigvals, self.basis = torch.linalg.eigh(cov)
        if not bool((eigvals > 0).all()):
            raise ValueError("cov must be symmetric positive definite")
        self.eigvals = eigvals
        # Diagonal covariances skip the rotation: tiny batched matmuls are slow to thread on a busy CPU.
        self._is_diagonal = bool(torch.equal(cov, torch.diag(torch.diagonal(cov))))
        if self._is_diagonal:
            self.eigvals, self.basis = torch.diagonal(cov).clone(), torch.eye(len(mean), dtype=cov.dtype)

    @classmethod
    def diagonal(cls, mean: Tensor, std: Tensor) -> GaussianFlow:
        """Independent coordinates: data N(mean_i, std_i^2) in each dimension."""
        return cls(mean, torch.diag(std**2))

    def _coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        a = (1 - t)[:, None]  # (B, 1)
        t = t[:, None]
        return a, a**2 * self.eigvals + t**2  # (B, 1), (B, D) eigenvalues of V_t

    def _apply(self, diag: Tensor, x: Tensor) -> Tensor:
        """Q diag(d_b) Q^T x_b for each example b: diag (B, D), x (B, D) -> (B, D)."""
        if self._is_diagonal:
            return x * diag
        return ((x @ self.basis) * diag) @ self.basis.T

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """The exact marginal velocity v(x, t): x (B, ...), t (B,) -> (B, ...)."""
        flat = x.reshape(x.shape[0], -1)
        a, var = self._coeffs(t.to(flat.dtype))
        t_col = t.to(flat.dtype)[:, None]
        gain = (t_col - a * self.eigvals) / var
        return (-self.mean + self._apply(gain, flat - a * self.mean)).reshape(x.shape)

    def divergence(self, x: Tensor, t: Tensor) -> Tensor:
        """div v at (x, t): (B,) (it does not depend on x)."""
        a, var = self._coeffs(t.to(self.eigvals.dtype))
        return ((t[:, None] - a * self.eigvals) / var).sum(dim=1)

    def flow_map(self, noise: Tensor, t: float = 0.0) -> Tensor:
        """Where the exact ODE carries ``noise`` (B, ...) from t = 1 to time ``t``: a mu + V_t^{1/2} noise."""
        flat = noise.reshape(noise.shape[0], -1)
        tt = torch.full((flat.shape[0],), t, dtype=flat.dtype, device=flat.device)
        a, var = self._coeffs(tt)
        return (a * self.mean + self._apply(var.sqrt(), flat)).reshape(noise.shape)

    def log_prob(self, x: Tensor) -> Tensor:
        """Data log-density log N(x; mean, cov) in nats: (B, ...) -> (B,)."""
        flat = x.reshape(x.shape[0], -1) - self.mean
        z = (flat if self._is_diagonal else flat @ self.basis) / self.eigvals.sqrt()
        dims = flat.shape[1]
        return -0.5 * z.pow(2).sum(1) - 0.5 * self.eigvals.log().sum() - 0.5 * dims * math.log(2 * math.pi)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n data samples (n, D), via the flow map of standard normal noise."""
        noise = torch.randn(n, self.mean.shape[0], generator=generator, dtype=self.mean.dtype)
        return self.flow_map(noise, 0.0)
