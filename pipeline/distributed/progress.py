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
        self._prog: Progress | None = None

    def info(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]{time.perf_counter() - self.t0:7.1f}s[/dim] {msg}")

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """Yields ``advance(n=1, note="", total=None)``; a bar on a terminal, a line per 10 % in logs."""
        if self.quiet:
            yield lambda n=1, note="", total=None: None
            return
        if self.console.is_terminal:
            # one Progress for nested tasks: rich allows a single live display at a time
            outer = self._prog is None
            if outer:
                cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn())
                self._prog = Progress(*cols, console=self.console, transient=False)
                self._prog.start()
            prog = self._prog
            tid = prog.add_task(description, total=total, note="")
            try:
                yield lambda n=1, note="", total=None: prog.update(tid, advance=n, note=note, total=total)
            finally:
                if outer:
                    prog.stop()
                    self._prog = None
            return
        state = {"done": 0, "last": -1, "total": total}

        def advance(n: int = 1, note: str = "", total: int | None = None) -> None:
            if total is not None:
                state["total"] = total
            total_now = state["total"]
            state["done"] += n
            pct = int(100 * state["done"] / max(total_now, 1)) // 10
            if n and (pct != state["last"] or state["done"] == total_now):
                state["last"] = pct
                self.info(f"{description}: {state['done']}/{total_now} {note}")
                sys.stderr.flush()

        yield advance
