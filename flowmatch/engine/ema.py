"""Exponential moving average (EMA) of the trainable weights, kept in fp32, under any ZeRO stage.

``ema <- beta_n * ema + (1 - beta_n) * weight`` after the n-th applied optimizer step, with the warm-up
``beta_n = min(decay, (1 - 1/n)^(gamma + 1))`` (:func:`~flowmatch.engine.power_ema.warmup_decay`, the one place
it is written): the first update copies the weights, then the EMA is a power-function average of the whole run
so far of relative width ``warmup`` (Karras et al. 2024) until ``decay`` caps it. Without warm-up every update
uses ``decay`` and the EMA starts at the initial weights. The update count is part of the EMA's state: the
engine saves it in ``engine.json`` and restores it on resume, so the decay goes on where it was.

Beside it, the EMA can track power-function *profiles* (no cap), whose snapshots let any EMA length be
reconstructed after training (:mod:`flowmatch.posthoc`).

:class:`ShadowEma` is the arithmetic over a list of tensors. :class:`Ema` decides what those tensors are: the
whole parameters when every rank holds the whole model (ZeRO 0-2), or only each rank's own partition under
ZeRO-3, so that the average costs no communication per step and is gathered only for export and evaluation.
Every rank counts the same updates, so every partition uses the same decay. timm's ``ModelEmaV3`` (the usual
choice) keeps a deep copy of the whole module; under ZeRO-3 that copy would be partitioned as well and every
update would need a gather, hence the plain shadow tensors here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch

from flowmatch.engine.power_ema import gamma_of, power_decay, warmup_decay
from flowmatch.engine.zero import Zero

# Prefix of the EMA tensors among a rank's saved tensors.
_KEY_PREFIX = "ema."


def check_decay(decay: float) -> float:
    """Return ``decay`` as a float after checking it lies in [0, 1]; 1 freezes the average, 0 copies."""
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1] (typical: 0.999-0.9999), got {decay}")
    return decay


class ShadowEma:
    """fp32 shadow copies of a fixed list of working tensors, updated in place.

    Args:
        sources: the working tensors (any floating dtype, any shape); the shadow starts as an fp32 copy.
        decay: weight of the old average in each update, in [0, 1].
    """

    def __init__(self, sources: Sequence[torch.Tensor], decay: float) -> None:
        self.decay = check_decay(decay)
        self.shadow: list[torch.Tensor] = [s.detach().to(torch.float32, copy=True) for s in sources]

    @torch.no_grad()
    def update(self, sources: Sequence[torch.Tensor], decay: float | None = None) -> None:
        """Blend ``sources`` into the shadow: ``shadow <- d * shadow + (1 - d) * source``.

        Args:
            sources: the same tensors (same order, shapes) the shadow was built from, at their current values.
            decay: overrides the stored decay for this update (e.g. a warmup schedule of the decay).
        """
        d = self.decay if decay is None else check_decay(decay)
        if len(sources) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors, got {len(sources)}")
        if not self.shadow:
            return
        # lerp(shadow, src, w) = shadow + w * (src - shadow): one fused kernel per device over all tensors.
        src32 = [s.detach().to(torch.float32) for s in sources]
        torch._foreach_lerp_(self.shadow, src32, 1.0 - d)

    def load(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace the shadow values (shapes must match), e.g. when resuming from a checkpoint."""
        if len(tensors) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors, got {len(tensors)} to load")
        for dst, src in zip(self.shadow, tensors):
            if dst.shape != src.shape:
                raise ValueError(f"EMA tensor of shape {tuple(dst.shape)} cannot load one of shape {tuple(src.shape)}")
            dst.copy_(src)


class Ema:
    """The fp32 EMA of a wrapped model's weights, started at their current values, and its power-function profiles.

    The average is taken over the working weights, which are the fp32 masters in fp32 training and their
    bf16/fp16 copies otherwise (the accumulator itself is fp32 either way).

    Args:
        module: the wrapped model (its buffers go into :meth:`state_dict`).
        named_params: its parameters in a fixed order.
        zero: the ZeRO layout of those parameters.
        decay: the cap of each update's decay, in [0, 1].
        warmup: relative width sigma_rel of the power-function warm-up; 0 = none (every update uses ``decay``).
        profiles: sigma_rel of each power-function profile to track (for post-hoc EMA).
    """

    def __init__(self, module: torch.nn.Module, named_params: Sequence[tuple[str, torch.nn.Parameter]], zero: Zero,
                 decay: float, *, warmup: float = 0.0, profiles: Sequence[float] = ()) -> None:
        self._module = module
        self._named = list(named_params)
        self._zero = zero
        working = self._working()
        self._shadow = ShadowEma(working, decay)
        self.warmup = float(warmup)
        self._warmup_gamma = gamma_of(warmup) if warmup else None
        self.profiles = tuple(float(s) for s in profiles)
        """sigma_rel of the tracked profiles."""
        self._profile_gammas = [gamma_of(s) for s in self.profiles]
        self._profiles = [ShadowEma(working, 0.0) for _ in self.profiles]
        self.updates = 0
        """Updates blended into the EMA so far: the position of its warm-up."""
        self.profile_updates = 0
        """Updates blended into the profiles so far (they restart on their own when a resume finds no snapshot)."""
        self._backup: list[torch.Tensor] | None = None  # the training weights while the EMA is swapped in

    def _working(self) -> list[torch.Tensor]:
        return [self._zero.local(p) for _, p in self._named]

    @property
    def decay(self) -> float:
        """The cap of each update's decay (the decay of every update without warm-up)."""
        return self._shadow.decay

    @property
    def swapped(self) -> bool:
        """Whether the model holds the EMA weights (only evaluation is allowed then)."""
        return self._backup is not None

    def update(self, decay: float | None = None) -> None:
        """Blend the current weights into the average and the profiles (call after each applied update); ``decay``
        overrides the EMA's this once."""
        if self.swapped:
            raise RuntimeError("EMA weights are swapped in: call ema.swap() again (or leave ema.weights()) first")
        working = [t.detach().to(torch.float32) for t in self._working()]  # one widening for every shadow
        self.updates += 1
        if decay is None:
            decay = warmup_decay(self.updates, self.decay, self._warmup_gamma)
        self._shadow.update(working, decay)
        if self._profiles:
            self.profile_updates += 1
            for gamma, shadow in zip(self._profile_gammas, self._profiles):
                shadow.update(working, power_decay(self.profile_updates, gamma))

    def swap(self) -> None:
        """Collective: put the EMA weights into the model, or (second call) restore the training weights exactly.

        While swapped, only evaluation is allowed (the engine's ``backward``/``step``/``save`` and :meth:`update`
        raise). Every rank must run the same forward calls under ZeRO-3.
        """
        restore = self._backup is not None
        if not restore:
            self._backup = [t.detach().clone() for t in self._working()]
        sources = self._backup if restore else self._shadow.shadow
        assert sources is not None
        for (_, p), src in zip(self._named, sources):
            self._zero.write(p, self._zero.full(src, p))
        if restore:
            self._backup = None

    @contextlib.contextmanager
    def weights(self) -> Iterator[None]:
        """Collective context in which the model holds the EMA weights."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def _consolidate(self, shadow: ShadowEma) -> dict[str, torch.Tensor]:
        whole = ((name, self._zero.full(part, p)) for (name, p), part in zip(self._named, shadow.shadow))
        return self._zero.consolidate(self._module, whole)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the whole EMA model (fp32, CPU; buffers from the live model) on rank 0, ``{}`` elsewhere."""
        return self._consolidate(self._shadow)

    def profile_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Collective: each profile's whole weights as in :meth:`state_dict`, in the order of :attr:`profiles`."""
        return [self._consolidate(shadow) for shadow in self._profiles]

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's shadow tensors (its partitions under ZeRO-3) as CPU tensors, keyed for a rank's save file."""
        return {_KEY_PREFIX + name: t.detach().cpu().contiguous() for (name, _), t in zip(self._named,
                                                                                          self._shadow.shadow)}

    def load_local(self, tensors: Mapping[str, torch.Tensor], updates: int) -> None:
        """Restore from :meth:`local_tensors` as saved by a run of the same layout, after ``updates`` updates."""
        self._shadow.load([tensors[_KEY_PREFIX + name] for name, _ in self._named])
        self.updates = updates

    def _slices(self, weights: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return [self._zero.slice(weights[name], p).float() for name, p in self._named]

    def load_whole(self, weights: Mapping[str, torch.Tensor], updates: int) -> None:
        """Restore from whole weights (an EMA state dict of any layout) after ``updates`` updates."""
        self._shadow.load(self._slices(weights))
        self.updates = updates

    def load_profiles(self, profiles: Sequence[Mapping[str, torch.Tensor]], updates: int) -> None:
        """Restore the profiles from whole weights (in the order of :attr:`profiles`) after ``updates`` updates."""
        if len(profiles) != len(self._profiles):
            raise ValueError(f"the EMA tracks {len(self._profiles)} profiles, got {len(profiles)} to load")
        for shadow, weights in zip(self._profiles, profiles):
            shadow.load(self._slices(weights))
        self.profile_updates = updates

    def restart(self) -> None:
        """Start over from the current weights, warm-up included."""
        self._shadow.load([t.float() for t in self._working()])
        self.updates = 0

    def restart_profiles(self) -> None:
        """Start the profiles over from the current weights."""
        for shadow in self._profiles:
            shadow.load([t.float() for t in self._working()])
        self.profile_updates = 0
