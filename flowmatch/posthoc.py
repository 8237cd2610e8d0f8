"""Post-hoc EMA of a run (Karras et al. 2024, section 3): snapshots of the power-function profiles the EMA tracks
(``train.ema_profiles``), and EMAs of any length reconstructed from them after training.

Layout, beside the checkpoints and written only here::

    RUN_DIR/ema/snapshots/<step>.safetensors   every profile's whole fp32 weights at that step (keys
                                               ``p<i>.<name>``); metadata: step, updates, the profiles' sigma_rel
    RUN_DIR/ema/snapshots/manifest.json        each snapshot's size and SHA-256: readers verify, and set a damaged
                                               one aside (:mod:`flowmatch.checkpoint.snapshots`)
    RUN_DIR/ema/<name>.safetensors             a reconstructed EMA (model keys, fp32) named e.g. ``sigma_rel-0.1``;
                                               metadata: sigma_rel, step, residual; loaded by
                                               ``load_pipeline(RUN_DIR, ema=name)``

Storage per run: ``snapshots x profiles x 4 bytes x parameters`` (the digits model, 2.3 M parameters, two profiles:
19 MB a snapshot). A snapshot is also taken at every checkpoint: resume restores the profiles from it. Each file is
written under a temporary name and renamed, so a snapshot is complete or absent.

The arithmetic (profiles, least squares) is :mod:`flowmatch.engine.power_ema`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowmatch.checkpoint.layout import CheckpointError
from flowmatch.checkpoint.snapshots import EMA_DIR, SNAPSHOTS_DIR, record_snapshot, set_aside_damaged, snapshot_files
from flowmatch.engine.power_ema import gamma_of, reconstruct
from flowmatch.engine.state import write_safetensors

if TYPE_CHECKING:
    from flowmatch.engine import Engine
    from flowmatch.engine.ema import Ema

_SUFFIX = ".safetensors"


def ema_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``RUN_DIR/ema``: the snapshots and the reconstructed EMAs of a run."""
    return Path(run_dir) / EMA_DIR


def ema_name(sigma_rel: float) -> str:
    """The name of a reconstructed EMA (``sigma_rel-0.1``), as ``load_pipeline(run, ema=...)`` takes it."""
    return f"sigma_rel-{sigma_rel:g}"


@dataclass
class Snapshot:
    """One snapshot file's record."""

    path: Path
    step: int
    """Optimizer steps of the run when it was taken."""
    updates: int
    """Updates blended into the profiles by then (equals ``step`` unless the profiles restarted on a resume)."""
    profiles: list[float]
    """sigma_rel of each profile it holds, in key order ``p0``, ``p1``, ..."""
    averaged: list[str]
    """Keys that are averaged weights; the others (buffers) are copies of the live model's."""

    @property
    def origin(self) -> int:
        """The step the profiles started at: snapshots of one origin make one history."""
        return self.step - self.updates


def _ema_of(engine: "Engine") -> "Ema":
    if engine.ema is None:
        raise RuntimeError("post-hoc EMA profiles need the engine's EMA: call engine.init_ema(...) first")
    return engine.ema


def write_snapshot(engine: "Engine", run_dir: str | os.PathLike[str], step: int, profiles: list[float]) -> None:
    """Collective: gather every tracked profile and write ``RUN_DIR/ema/snapshots/<step>.safetensors`` (rank 0)."""
    ema = _ema_of(engine)
    states = ema.profile_state_dicts()
    if not engine.is_main:
        return
    averaged = [name for name, p in engine.module.named_parameters() if p.requires_grad]
    tensors = {f"p{i}.{k}": v for i, state in enumerate(states) for k, v in state.items()}
    meta = {"step": str(step), "updates": str(ema.profile_updates), "profiles": json.dumps(profiles),
            "averaged": json.dumps(averaged)}
    out = ema_dir(run_dir) / SNAPSHOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{step}{_SUFFIX}"
    try:
        write_safetensors(tmp, tensors, meta)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        need = sum(t.numel() * t.element_size() for t in tensors.values())
        raise CheckpointError(
            f"no space left on the device of {out} while writing the EMA snapshot of step {step} ({err.strerror}). "
            f"A snapshot takes about {need / 2**20:.1f} MiB; {shutil.disk_usage(out).free / 2**20:.1f} MiB are free. "
            "Make room there (or set train.ema_profiles: [] to track no post-hoc EMA), then run the same command "
            "to resume from the last checkpoint.") from None
    os.replace(tmp, out / f"{step}{_SUFFIX}")
    record_snapshot(out / f"{step}{_SUFFIX}")  # listed with its hash, verified by readers (checkpoint.snapshots)


def read_snapshot_meta(path: Path) -> Snapshot:
    """The record of a snapshot file (its tensors stay on disk)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return Snapshot(path, int(meta["step"]), int(meta["updates"]), json.loads(meta["profiles"]),
                    json.loads(meta["averaged"]))


def list_snapshots(run_dir: str | os.PathLike[str]) -> list[Snapshot]:
    """The complete snapshots of a run, oldest first (damaged ones are set aside first by the callers that read
    them: :func:`~flowmatch.checkpoint.snapshots.set_aside_damaged`)."""
    return [read_snapshot_meta(p) for p in snapshot_files(run_dir)]


def snapshot_profiles(snapshot: Snapshot) -> list[dict[str, torch.Tensor]]:
    """The whole weights of each profile of a snapshot, in the order of ``snapshot.profiles``."""
    tensors = load_file(str(snapshot.path))
    out: list[dict[str, torch.Tensor]] = [{} for _ in snapshot.profiles]
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        out[int(index[1:])][name] = value
    return out


def restore_profiles(engine: "Engine", run_dir: str | os.PathLike[str], step: int, profiles: list[float]) -> str:
    """Collective, on resume at ``step``: load the profiles from that step's snapshot, or start them over when there
    is none (or it tracked other profiles). Snapshots after ``step`` belong to a run that was abandoned and are
    deleted (rank 0). Returns a line saying what happened."""
    if engine.is_main:  # the snapshot about to be read is hashed, the others' headers checked
        set_aside_damaged(run_dir, hashed={step})
    engine.barrier()  # before any rank lists them
    snapshots = list_snapshots(run_dir)
    engine.barrier()  # every rank has listed them before any is deleted
    if engine.is_main:
        for stale in (s for s in snapshots if s.step > step):
            stale.path.unlink()
    match = next((s for s in snapshots if s.step == step and s.profiles == profiles), None)
    if match is None:
        _ema_of(engine).restart_profiles()
        return (f"no EMA snapshot of profiles {profiles} at step {step}: the profiles start over, so post-hoc EMA "
                f"covers the run from step {step} on")
    _ema_of(engine).load_profiles(snapshot_profiles(match), match.updates)
    return f"EMA profiles restored from {match.path}"


@dataclass
class PosthocEma:
    """An EMA reconstructed by :func:`reconstruct_ema`."""

    name: str
    path: Path
    sigma_rel: float
    step: int
    """The step it is the EMA at (the target snapshot's)."""
    residual: float
    """L2 misfit of the reconstructed profile relative to the exact one (0 = exact; see power_ema)."""
    snapshots: int
    """Snapshots combined."""


def reconstruct_ema(run_dir: str | os.PathLike[str], sigma_rels: list[float], *,
                    step: int | None = None) -> list[PosthocEma]:
    """Reconstruct the EMA of each ``sigma_rel`` at the snapshot of ``step`` (default: the newest) from every
    snapshot of the same history up to it, and write each as ``RUN_DIR/ema/<name>.safetensors``.

    Sums are taken in float64: least-squares coefficients of close profiles can be large with opposite signs.
    Damaged snapshots are set aside first (each named in a warning), and the reconstruction goes on without them.
    """
    set_aside_damaged(run_dir, hashed=True)
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise FileNotFoundError(f"no EMA snapshots under {ema_dir(run_dir) / SNAPSHOTS_DIR}: train with "
                                "train.ema_profiles (e.g. [0.05, 0.10]) to take them")
    steps = [s.step for s in snapshots]
    if step is not None and step not in steps:
        raise ValueError(f"no EMA snapshot at step {step}; snapshots exist at steps {steps}")
    target = snapshots[-1] if step is None else snapshots[steps.index(step)]
    used = [s for s in snapshots if s.origin == target.origin and s.step <= target.step and s.updates > 0]
    sources = [(s.updates, gamma_of(sigma)) for s in used for sigma in s.profiles]
    fits = [reconstruct(sources, (target.updates, gamma_of(sigma))) for sigma in sigma_rels]
    sums: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    column = 0
    for snapshot in used:
        for weights in snapshot_profiles(snapshot):
            for fit, acc in zip(fits, sums):
                x = float(fit.coefficients[column])
                for name in snapshot.averaged:
                    acc[name] = acc[name] + x * weights[name].double() if name in acc else x * weights[name].double()
            column += 1
    buffers = {k: v for k, v in snapshot_profiles(target)[0].items() if k not in target.averaged}
    out = []
    for sigma, fit, acc in zip(sigma_rels, fits, sums):
        name = ema_name(sigma)
        path = ema_dir(run_dir) / f"{name}{_SUFFIX}"
        tensors = {**{k: v.float() for k, v in acc.items()}, **buffers}
        meta = {"sigma_rel": repr(sigma), "step": str(target.step), "residual": repr(fit.residual)}
        save_file(tensors, str(path.with_name(f".tmp-{path.name}")), metadata=meta)
        os.replace(path.with_name(f".tmp-{path.name}"), path)
        out.append(PosthocEma(name, path, sigma, target.step, fit.residual, len(used)))
    return out


def load_named_ema(ckpt_dir: str | os.PathLike[str], name: str) -> dict[str, torch.Tensor]:
    """The weights of the reconstructed EMA ``name`` of the run a checkpoint belongs to (RUN_DIR/checkpoints/<step>)."""
    folder = ema_dir(Path(ckpt_dir).parent.parent)
    path = folder / f"{name}{_SUFFIX}"
    if not path.is_file():
        names = sorted(p.name[:-len(_SUFFIX)] for p in folder.glob(f"*{_SUFFIX}")) if folder.is_dir() else []
        raise FileNotFoundError(f"no EMA named {name!r} in {folder} (there: {', '.join(names) or 'none'}); make it "
                                f"with `flowmatch ema RUN_DIR --sigma-rel ...`")
    return load_file(str(path))
