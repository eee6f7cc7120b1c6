"""The live view of a job: one line per event, progress bars for long stages (terminal and log)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class JobView:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def info(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]{time.perf_counter() - self.t0:7.1f}s[/dim] {msg}")

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """Yields ``advance(n=1, note="")``; draws a bar on a terminal, a line per 10 % in logs."""
        if self.quiet:
            yield lambda n=1, note="": None
            return
        if self.console.is_terminal:
            cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
            with Progress(*cols, console=self.console, transient=False) as prog:
                tid = prog.add_task(description, total=total, note="")
                yield lambda n=1, note="": prog.update(tid, advance=n, note=note)
            return
        state = {"done": 0, "last": -1}

        def advance(n: int = 1, note: str = "") -> None:
            state["done"] += n
            pct = int(100 * state["done"] / max(total, 1)) // 10
            if pct != state["last"] or state["done"] == total:
                state["last"] = pct
                self.info(f"{description}: {state['done']}/{total} {note}")
                sys.stderr.flush()

        yield advance
