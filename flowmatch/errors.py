"""Errors a user sees about their recipe, files or run, and the one "did you mean" helper every such message uses."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any, Optional


class UsageError(Exception):
    """Base of the errors that are the user's input, files or run rather than a bug (a checkpoint that cannot be
    used, encoders that do not match a cache, a launcher's bad environment, a run that cannot go on): the command
    line prints their message without a traceback."""


class RecipeError(ValueError, UsageError):
    """A recipe key, type or value that cannot be used; the message says which and what to do."""


def nearest(value: Any, allowed: Iterable[str]) -> Optional[str]:
    """The allowed spelling closest to ``value``, or None when nothing is close."""
    found = difflib.get_close_matches(str(value), list(allowed), n=1)
    return found[0] if found else None


def choice_error(key: str, value: Any, allowed: Iterable[str]) -> ValueError:
    """ValueError for ``key = value`` outside ``allowed``, naming the allowed values and the nearest spelling."""
    allowed = list(allowed)
    near = nearest(value, allowed)
    hint = f" (did you mean {near!r}?)" if near else ""
    return ValueError(f"{key} = {value!r} is not one of {', '.join(map(str, allowed))}{hint}")
