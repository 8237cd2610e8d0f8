"""The time derivative of a model along the flow, d/dt u(x_t, r, t), behind one function with two backends.

MeanFlow's target needs the total derivative of the average velocity u(x, t, r) as t moves along the path with r
fixed: the Jacobian-vector product of u with the tangent (dx/dt, dt/dt, dr/dt) = (v, 1, 0).

- ``exact``: forward-mode AD with :func:`torch.func.jvp`. Attention runs on PyTorch's math SDPA kernel inside
  it, since the fused (flash, memory-efficient) kernels have no forward-mode derivative (pytorch#128971; on CPU
  the default pick, ``_scaled_dot_product_flash_attention_for_cpu``, raises NotImplementedError too). The
  callable must be a plain function of its inputs: under ZeRO-3 the parameters are gathered by module hooks
  that functorch transforms break (DeepSpeed #7323), so use the other backend there.
- ``finite_difference``: the central difference (u(x + e v, t + e) - u(x - e v, t - e)) / 2e, two ordinary
  forwards, which any kernel and any sharding runs; error O(e^2) plus rounding of order eps_float / e.

Both return a detached tensor: the derivative enters the loss only inside a stop-gradient target, so nothing
here needs gradients for the parameters, and the loss's own forward goes through the engine as usual (its
gradient hooks, e.g. ZeRO-2 reduction, see every gradient).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flowmatch.conditioning import Conditioning
from flowmatch.errors import choice_error

__all__ = ["JVP_BACKENDS", "fp32_call", "time_derivative"]

JVP_BACKENDS = ("exact", "finite_difference")

AverageVelocity = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``u(x (B, ...), t (B,), r (B,)) -> (B, ...)``: a model's average velocity over [r, t], conditioning bound."""


def _wide(x: Tensor) -> Tensor:
    """float64 stays, anything narrower becomes float32: bf16 tangents and differences lose the derivative."""
    return x if x.dtype == torch.float64 else x.float()


def time_derivative(u: AverageVelocity, x: Tensor, t: Tensor, r: Tensor, v: Tensor, *, backend: str,
                    step: float = 1e-4) -> Tensor:
    """d/dt u(x_t, t, r) along dx/dt = ``v``, r held fixed: (B, ...) detached, float32 (float64 for float64 x).

    x, v: (B, ...); t, r: (B,). ``backend`` is one of :data:`JVP_BACKENDS`; ``step`` is the finite-difference e.
    """
    x, v, t, r = _wide(x), _wide(v), _wide(t), _wide(r)
    if backend == "exact":
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            _, du_dt = torch.func.jvp(u, (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
        return _wide(du_dt.detach())
    if backend == "finite_difference":
        if not step > 0:
            raise ValueError(f"the finite-difference step must be > 0; got {step}")
        with torch.no_grad():
            dx = step * v
            ahead = _wide(u(x + dx, t + step, r))
            behind = _wide(u(x - dx, t - step, r))
        return (ahead - behind) / (2 * step)
    raise choice_error("flow.meanflow.jvp", backend, JVP_BACKENDS)


def fp32_call(module: nn.Module, x: Tensor, t: Tensor, cond: Conditioning, r: Optional[Tensor] = None
              ) -> Tensor:
    """``module``'s average velocity on detached fp32 copies of its weights (a plain function of its inputs, as
    :func:`torch.func.jvp` needs): (B, ...) float32."""
    params = {name: p.detach().float() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x.float(), t.float(), cond.to(dtype=torch.float32)),
                                      {"r": r.float() if r is not None else None}).float()
