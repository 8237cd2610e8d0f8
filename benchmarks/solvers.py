"""Compare ODE samplers at equal numbers of velocity evaluations (NFE), not equal steps.

Two problems with closed-form velocity fields on flowmatch's path (t = 0 data, t = 1 noise):
- Gaussian data N(mu, diag sigma^2) in 6 dimensions, whose exact flow map gives the reference sample;
- a 2-D mixture of three isotropic Gaussians (curved, multimodal trajectories), referenced by dopri8 at 1e-10.
The error is the mean Euclidean distance to the reference sample at t = 0.

    python benchmarks/solvers.py [--nfe 4 6 8 10 20 40] [--shift 1 3]
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from flowmatch.sampling import FIXED_STEP_SOLVERS, sample_ode, steps_for_nfe
from flowmatch.sampling.gaussian import GaussianFlow

REFERENCE_TOL = 1e-10


class MixtureFlow:
    """Data: sum_k w_k N(mean_k, std_k^2 I). Given component k, x_t ~ N(a mean_k, (a^2 std_k^2 + t^2) I) with
    a = 1 - t and velocity v_k (the Gaussian formula); the marginal velocity is the posterior-weighted mean."""

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor) -> None:
        self.means, self.stds, self.weights = means, stds, weights

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        a, tt = (1 - t)[:, None, None], t[:, None, None]  # (B, 1, 1)
        var = a**2 * self.stds[None, :, None] ** 2 + tt**2  # (B, K, 1)
        diff = x[:, None, :] - a * self.means[None]  # (B, K, D)
        log_resp = self.weights.log() - 0.5 * (diff**2).sum(-1) / var[..., 0] - 0.5 * x.shape[1] * var[..., 0].log()
        resp = log_resp.softmax(dim=1)[..., None]  # (B, K, 1)
        v_k = -self.means[None] + (tt - a * self.stds[None, :, None] ** 2) / var * diff
        return (resp * v_k).sum(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 6, 8, 10, 20, 40])
    parser.add_argument("--shift", type=float, nargs="+", default=[1.0, 3.0])
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    gen = torch.Generator().manual_seed(0)

    gauss = GaussianFlow.diagonal(
        torch.tensor([-1.0, 0.5, 2.0, 0.0, 1.0, -0.3]), torch.tensor([0.5, 1.5, 0.8, 2.0, 0.3, 1.0])
    )
    mixture = MixtureFlow(
        means=torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]),
        stds=torch.tensor([0.3, 0.5, 0.2]),
        weights=torch.tensor([0.3, 0.5, 0.2]),
    )
    g_noise, m_noise = torch.randn(512, 6, generator=gen), torch.randn(512, 2, generator=gen)
    # The exact solution does not depend on the grid's shift, so one reference serves every shift.
    m_ref = sample_ode(mixture.velocity, m_noise, steps=1, solver="dopri8", rtol=REFERENCE_TOL, atol=REFERENCE_TOL).x
    problems = {
        "gaussian": (gauss.velocity, g_noise, gauss.flow_map(g_noise)),
        "mixture": (mixture.velocity, m_noise, m_ref),
    }
    for name, (velocity, noise, ref) in problems.items():
        for shift in args.shift:
            print(f"\n{name}, shift {shift}: mean |x - x_ref| at equal NFE")
            print(f"{'solver':>10} " + " ".join(f"{n:>9d}" for n in args.nfe))
            for solver in FIXED_STEP_SOLVERS:
                cells = []
                for nfe in args.nfe:
                    try:
                        steps = steps_for_nfe(solver, nfe)
                    except ValueError:
                        cells.append(f"{'-':>9}")
                        continue
                    x = sample_ode(velocity, noise, steps=steps, solver=solver, shift=shift).x
                    cells.append(f"{(x - ref).norm(dim=1).mean().item():9.2e}")
                print(f"{solver:>10} " + " ".join(cells))
            sol = sample_ode(velocity, noise, steps=1, solver="dopri5")
            print(f"{'dopri5':>10} error {(sol.x - ref).norm(dim=1).mean().item():.2e} at {sol.nfe} NFE (rtol 1e-5)")


if __name__ == "__main__":
    main()
