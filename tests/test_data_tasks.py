"""Task plug-ins: discovery without imports, recipe validation, the builder behind data.prepare, and the rule that
the library never imports data_tools."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from flowmatch import tasks
from flowmatch.config import RecipeError, load_recipe
from flowmatch.data import DataConfig, ensure_shards, expand_shards
from flowmatch.data.shardformat import TRAIN_PREFIX, VAL_PREFIX, ShardSink
from flowmatch.evaluate import EvalConfig
from flowmatch.tasks import Task, available_tasks, get_task, register_task, unregister_task

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(tree: ast.AST) -> list[str]:
    """Modules a file imports: import statements, and importlib.import_module / __import__ with a constant name."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.append(node.args[0].value)
    return names


def test_the_library_never_imports_data_tools():
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / "flowmatch").rglob("*.py"))
        for name in imported_modules(ast.parse(path.read_text(), str(path)))
        if name == "data_tools" or name.startswith("data_tools.")
    ]
    assert offenders == []
    # The check itself sees the forms an import can take.
    sample = "import data_tools.x\nfrom data_tools import y\ndef f():\n    importlib.import_module('data_tools.z')\n"
    assert imported_modules(ast.parse(sample)) == ["data_tools.x", "data_tools", "data_tools.z"]


def test_digits_comes_from_the_entry_point_and_matches_the_digits_recipe():
    assert "digits" in available_tasks()
    digits = get_task("digits")
    assert digits.name == "digits" and digits.build is not None and digits.judge is not None
    assert list(digits.prompts) == load_recipe(ROOT / "recipes" / "digits.yaml").sampling.prompts
    assert len(digits.prompts) == 10 and digits.prompts[7] == "a handwritten digit seven"


class Unloadable:
    """An entry point whose plug-in must not be imported."""

    name, value = "unloadable", "nowhere:TASK"

    def load(self):
        raise AssertionError("validating a recipe imported a task plug-in")


def test_recipe_validation_lists_tasks_without_importing_them(monkeypatch):
    monkeypatch.setattr(tasks, "entry_points", lambda group: [Unloadable()])
    assert available_tasks() == ["unloadable"]
    recipe = load_recipe(ROOT / "recipes" / "digits.yaml", ["data.prepare=unloadable", "eval.task=unloadable"])
    assert recipe.data.prepare == recipe.eval.task == "unloadable"


@pytest.mark.parametrize("override, message", [
    ("data.prepare=digit", "data.prepare='digit' is not a known task (did you mean 'digits'?); allowed: '', 'digits'"),
    ("eval.task=digts", "eval.task='digts' is not a known task (did you mean 'digits'?); allowed: 'generic'"),
    ("eval.task=", "eval.task='' is not a known task"),
])
def test_unknown_task_names_in_recipes_name_the_key_the_choices_and_the_nearest(override, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_recipe(ROOT / "recipes" / "digits.yaml", [override])


def test_get_task_and_register_task_errors():
    with pytest.raises(ValueError, match=r"task='digitss' is not a known task \(did you mean 'digits'\?\)"):
        get_task("digitss")
    for reserved in ("generic", ""):
        with pytest.raises(ValueError, match="cannot be named"):
            register_task(Task(reserved))
    with pytest.raises(ValueError, match="already registered"):
        register_task(Task("digits"))
    assert EvalConfig().task == "generic" and DataConfig().prepare == ""


def write_tiny_set(out: Path) -> None:
    for prefix, keys in ((TRAIN_PREFIX, ("a", "b", "c")), (VAL_PREFIX, ("d",))):
        with ShardSink(out, prefix=prefix) as sink:
            for key in keys:
                sink.write(key, {"txt": f"sample {key}"})


@pytest.fixture
def registered():
    names = []

    def register(task: Task) -> Task:
        register_task(task)
        names.append(task.name)
        return task

    yield register
    for name in names:
        unregister_task(name)


def test_data_prepare_runs_the_named_tasks_builder(tmp_path, registered):
    built = []
    registered(Task("tiny-set", build=lambda out: (built.append(out), write_tiny_set(out))))
    cfg = DataConfig(shards=str(tmp_path / "tiny"), prepare="tiny-set")
    urls = ensure_shards(cfg)
    assert [Path(u).name for u in urls] == ["train-000000.tar"] and len(built) == 1
    assert [Path(u).name for u in expand_shards(cfg.shards)] == ["train-000000.tar", "val-000000.tar"]
    assert ensure_shards(cfg) == urls and len(built) == 1  # built once
    assert not list(tmp_path.glob(".tiny.building-*"))


def test_prepare_with_a_task_that_builds_nothing_or_fails(tmp_path, registered):
    registered(Task("judge-only"))
    with pytest.raises(ValueError, match="builds no shards"):
        ensure_shards(DataConfig(shards=str(tmp_path / "x"), prepare="judge-only"))

    def broken(out: Path) -> None:
        write_tiny_set(out)
        raise RuntimeError("builder failed half way")

    registered(Task("broken", build=broken))
    with pytest.raises(RuntimeError, match="half way"):
        ensure_shards(DataConfig(shards=str(tmp_path / "y"), prepare="broken"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the target nor a half-built folder
