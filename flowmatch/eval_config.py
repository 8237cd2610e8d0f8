"""The recipe's `eval` section: what `flowmatch eval` measures.

It lives apart from :mod:`flowmatch.evaluate`, which opens runs (above the recipe tree), so that the recipe tree
(:mod:`flowmatch.config`) imports its sections only from floors below it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flowmatch.sampling.diffusion import check_sampler
from flowmatch.tasks import check_task_name

GENERIC = "generic"


@dataclass
class EvalConfig:
    """The recipe's `eval` section: what `flowmatch eval` measures."""

    task: str = GENERIC
    """A task (flowmatch.tasks) whose judge scores generated images, e.g. digits; generic = bits/dim only."""
    steps: list[int] = field(default_factory=lambda: [4, 8, 20, 50])
    """Step counts to evaluate."""
    solvers: list[str] = field(default_factory=lambda: ["euler"])
    """Solvers to evaluate."""
    samples_per_prompt: int = 50
    """Generated images per prompt of the task's judge."""
    likelihood_samples: int = 16
    """Held-out images whose bits per dimension are measured (0 = skip)."""
    likelihood_rtol: float = 1e-3
    """Relative tolerance of the likelihood ODE solve (dopri5); 1e-4 moved the digits bits/dim by under 0.01."""
    likelihood_atol: float = 1e-4
    """Absolute tolerance of the likelihood ODE solve."""

    def __post_init__(self) -> None:
        check_task_name(self.task, "eval.task", also=(GENERIC,))
        for solver in self.solvers:
            check_sampler(solver, "eval.solvers")
        if not self.steps or min(self.steps) < 1 or self.samples_per_prompt < 1 or self.likelihood_samples < 0:
            raise ValueError("steps must be >= 1, samples_per_prompt >= 1 and likelihood_samples >= 0")
