"""Progress bars for long commands: drawn on stderr on a terminal, otherwise nothing at all.

`progress(label)` is a context manager that yields the callback the core takes as
`on_progress(done, total)`, or None when no bar is wanted: then the core does not even count.
A bar is wanted only when stderr is a terminal (and TERM is not "dumb": such a terminal
cannot redraw a line) and the command is not printing for a program (--json, --csv,
--format json/csv). stdout is never touched, so what scripts parse stays the same, and
click's own habit of printing the label once when the file is not a terminal never applies.

The bar is drawn at most every UPDATE_SECONDS (and once more at the end), whatever the
rate of the calls, and its line is ended when the block ends, also on an error, so that
the next line (the result, or the one-line error) starts on a line of its own.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import click

UPDATE_SECONDS = 0.1
# The parameters through which a command prints for programs (see `machine_output`).
_MACHINE_FLAGS = ("as_json", "as_json_", "as_csv")
_MACHINE_FORMATS = ("json", "csv")


def machine_output(ctx: click.Context | None = None) -> bool:
    """Whether the running command (or `ctx`) was asked for JSON or CSV."""
    ctx = ctx or click.get_current_context(silent=True)
    while ctx is not None:
        params = ctx.params
        if any(params.get(flag) for flag in _MACHINE_FLAGS):
            return True
        if params.get("fmt") in _MACHINE_FORMATS:
            return True
        ctx = ctx.parent
    return False


def wanted(stream: TextIO | None = None, *, machine: bool | None = None) -> bool:
    """Whether to draw a bar on `stream` (default: stderr)."""
    stream = sys.stderr if stream is None else stream
    if machine is None:
        machine = machine_output()
    if machine or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such stream, or closed
        return False


class Bar:
    """The callback behind one bar: starts the bar on its first call (when the total is
    known), moves it at most every UPDATE_SECONDS. Drawn by click's progress bar, through
    its public interface (the context manager `click.progressbar` returns, `update`)."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self.label = label
        self.stream = stream
        self.item = ""  # shown beside the label (`note`)
        self.bar: Any = None  # click's ProgressBar, entered
        self.pos = 0  # what the bar shows
        self.done = 0  # what was reported
        self.length = 0
        self.shown = 0.0

    def note(self, text: str) -> None:
        """Show `text` beside the label (e.g. what is being done now), from the next draw."""
        self.item = text
        if self.bar is not None:
            self.bar.update(0, text)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if total <= 0:
                return
            self.length = total
            self.bar = click.progressbar(
                length=total,
                label=self.label,
                file=self.stream,
                show_pos=True,
                show_percent=True,
                width=30,
                item_show_func=lambda item: item or None,
                update_min_steps=0,  # every update drawn: `__call__` paces them itself
            ).__enter__()
        # The bar's length is fixed when it starts: a total that grows later ends it early.
        self.done = min(done, self.length)
        now = time.monotonic()
        if self.done < self.length and now - self.shown < UPDATE_SECONDS:
            return  # drawn with a later call, or at the end
        self.shown = now
        self._draw()

    def _draw(self) -> None:
        self.bar.update(self.done - self.pos, self.item)
        self.pos = self.done

    def end(self) -> None:
        if self.bar is not None:
            if self.done != self.pos:
                self._draw()  # where it stopped, if a call was not drawn
            self.bar.__exit__(None, None, None)


@contextmanager
def progress(
    label: str,
    *,
    machine: bool | None = None,
    stream: TextIO | None = None,
) -> Iterator[Bar | None]:
    """The core's `on_progress(done, total)` for a bar labelled `label`, or None when no
    bar is wanted (see the module docstring; `machine`: whether output is for programs, by
    default read from the running command's options)."""
    stream = sys.stderr if stream is None else stream
    if not wanted(stream, machine=machine):
        yield None
        return
    bar = Bar(label, stream)
    try:
        yield bar
    finally:
        bar.end()
