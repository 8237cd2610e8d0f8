"""Where frozen encoder weights come from: `pkg:` folders inside installed packages, local folders, hub ids.

Hub ids stay hub ids: transformers and diffusers resolve them from the local cache (nothing is downloaded when
HF_HUB_OFFLINE=1 is set), and :func:`load_pretrained` turns a missing model into one clear message.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def resolve_model_path(name_or_path: str) -> str:
    """Turn `pkg:<package>/<subdir>` into the folder inside the installed package; anything else is returned as is."""
    if not name_or_path.startswith("pkg:"):
        return name_or_path
    package, _, sub = name_or_path[4:].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name_or_path!r}: python package {package!r} is not installed "
            f"(pip install {package.replace('_', '-')})"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not folder.is_dir():
        raise FileNotFoundError(f"model {name_or_path!r}: {folder} does not exist")
    return str(folder)


def load_pretrained(what: str, name_or_path: str, load: Callable[[str], T], *, key: str, hint: str = "") -> T:
    """``load(resolved path)`` with a missing or unreadable model turned into one FileNotFoundError that names
    the recipe key to change (``key``) and what to point it at."""
    path = resolve_model_path(name_or_path)
    try:
        return load(path)
    except OSError as err:  # transformers and diffusers raise OSError (EnvironmentError) for missing files
        raise FileNotFoundError(
            f"could not load the {what} {name_or_path!r} ({err.__class__.__name__}: {err}). Point {key} at a local "
            f"folder holding it, or at a hub id already in the local Hugging Face cache{hint}."
        ) from err
