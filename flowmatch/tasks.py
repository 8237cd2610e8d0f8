"""Tasks: named plug-ins that bring a data set's shard builder, its evaluation judge and its prompts.

The library knows no task by name. A package registers tasks in the `flowmatch.tasks` entry-point group, each
naming a `Task` object::

    [project.entry-points."flowmatch.tasks"]
    digits = "data_tools.digits_task:TASK"

or calls `register_task` (tests, notebooks). Recipes name a task in `data.prepare` (build the shards when
`data.shards` holds none), `autoencoder.prepare` (train the autoencoder when its folder holds none) and
`eval.task` (score generated images in `flowmatch eval`). The judge's contract (:class:`EvalPlan` in,
:class:`TaskScores` of :class:`EvalRow` out, a :class:`Judged` pipeline) lives here, on the bottom floor beside
errors and dtypes: data/ and encoders/ import this module, so it names nothing above them. `available_tasks()`
lists the names without importing any plug-in, so validating a recipe stays cheap; `get_task(name)` imports the one
asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from flowmatch.errors import nearest

ENTRY_POINT_GROUP = "flowmatch.tasks"
RESERVED_NAMES = ("", "generic")  # data.prepare '' = never build; eval.task generic = no task-specific judge


@dataclass
class EvalPlan:
    """What a task's judge is asked to measure."""

    steps: dict[str, list[int]]
    """Solver -> step counts, one report row each (from eval.steps, or the steps that fit each --nfe budget)."""
    samples_per_prompt: int
    """Images to generate per prompt."""
    guidance_scale: float
    """Classifier-free guidance scale to generate with."""


@dataclass
class EvalRow:
    """One solver at one step count: the velocity evaluations it took and the task's metrics."""

    solver: str
    steps: int
    nfe: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TaskScores:
    """What a task's judge returns."""

    rows: list[EvalRow] = field(default_factory=list)
    reference: dict[str, float] = field(default_factory=dict)
    """Values to read the rows against, e.g. the Frechet distance of real data to itself at the same sample size."""
    note: str = ""
    """One line for the printed report (what was generated and how it was judged)."""


class Judged(Protocol):
    """What a judge may use of the pipeline it scores (:class:`flowmatch.sampling.Pipeline` is one): generate,
    reconstruct, the velocity evaluations of the last call, and the run's recipe (its data and sampling sections).
    Named here as a protocol so this bottom floor names nothing above it."""

    recipe: Any
    last_nfe: int

    def generate(self, prompts: list[str], **kwargs: Any) -> Any: ...

    def reconstruct(self, pixels: Any) -> Any: ...


Judge = Callable[[Judged, EvalPlan], TaskScores]
"""Score a model: generate through the pipeline's public API as the plan says."""
Autoencoder = Callable[[Any, Path], Any]
"""Train the task's autoencoder on a data section (:class:`flowmatch.data.DataConfig`) into a new directory."""


@dataclass(frozen=True)
class Task:
    """A task plug-in; every part but the name is optional."""

    name: str
    """What recipes write in data.prepare and eval.task."""
    description: str = ""
    """One line for listings and errors."""
    build: Optional[Callable[[Path], Any]] = None
    """Write the task's shards (train-* and val-*, flowmatch.data.shardformat) into a new directory."""
    autoencoder: Optional[Autoencoder] = None
    """Train the task's autoencoder on the data section's shards (at its resolution and channels) and write it with
    save_pretrained into a new directory (autoencoder.prepare)."""
    judge: Optional[Judge] = None
    """Score a model: generate through the Pipeline's public API (generate, reconstruct, last_nfe, recipe: the
    :class:`Judged` protocol) as the plan says."""
    prompts: tuple[str, ...] = ()
    """Prompts that suit the task, e.g. for validation grids (one row each)."""


_registered: dict[str, Task] = {}
_loaded: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> None:
    """Make `task` available under `task.name` in this process (beside the entry-point tasks, which it may shadow
    with replace=True)."""
    if task.name in RESERVED_NAMES or not task.name.strip():
        raise ValueError(f"a task cannot be named {task.name!r} (reserved: {', '.join(map(repr, RESERVED_NAMES))})")
    if not replace and task.name in available_tasks():
        raise ValueError(f"task {task.name!r} is already registered; pass replace=True to replace it")
    _registered[task.name] = task


def unregister_task(name: str) -> None:
    """Forget a task given to `register_task` (entry-point tasks stay)."""
    _registered.pop(name, None)


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_tasks() -> list[str]:
    """Names of every task, sorted; imports no plug-in."""
    return sorted(set(_entry_points()) | set(_registered))


def unknown_task_message(name: str, key: str, allowed: list[str]) -> str:
    """"KEY=NAME is not a task (did you mean ...?); allowed: ..." with the installed tasks' origin explained."""
    near = nearest(name, allowed)
    hint = f" (did you mean {near!r}?)" if near else ""
    return (
        f"{key}={name!r} is not a known task{hint}; allowed: {', '.join(map(repr, allowed)) or 'none'}. Tasks come "
        f"from installed packages' {ENTRY_POINT_GROUP!r} entry points (after editing them, reinstall: "
        "pip install -e .) or register_task()"
    )


def check_task_name(name: str, key: str, *, also: tuple[str, ...] = ()) -> None:
    """ValueError unless `name` is one of `also` or a task; the message names `key`, the allowed values and the
    nearest spelling."""
    if name in also:
        return
    tasks = available_tasks()
    if name not in tasks:
        raise ValueError(unknown_task_message(name, key, [*also, *tasks]))


def get_task(name: str, key: str = "task") -> Task:
    """The task `name`, importing its plug-in on first use; ValueError for an unknown name."""
    if name in _registered:
        return _registered[name]
    if name in _loaded:
        return _loaded[name]
    found = _entry_points().get(name)
    if found is None:
        raise ValueError(unknown_task_message(name, key, available_tasks()))
    try:
        task = found.load()
    except ImportError as err:
        raise ImportError(f"task {name!r} ({found.value}) could not be imported: {err}") from err
    if not isinstance(task, Task):
        raise TypeError(f"entry point {name!r} ({found.value}) is a {type(task).__name__}, not a flowmatch Task")
    if task.name != name:
        raise ValueError(f"entry point {name!r} ({found.value}) holds a task named {task.name!r}; make them equal")
    _loaded[name] = task
    return task
