"""User-facing errors: every one names the problem and the fix, and is raised before expensive work."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VlmqError(Exception):
    """An error caused by the user's input. The CLI prints it without a traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid spelling, for 'did you mean' hints."""
    hits = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return hits[0] if hits else None
