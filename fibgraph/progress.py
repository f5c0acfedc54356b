"""Progress bars on stderr for long runs, and the hooks the library calls.

Two halves:

- the library marks its long stages with :func:`task` (the hypergraph
  importer's probe, the engine's levels, the writer's records, verification,
  tuning steps, ...)::

      with task("colouring", total=len(levels)) as advance:
          for lv in levels:
              ...
              advance(1, f"colouring {name}")

  Outside :func:`shown` this costs one context-variable read: ``advance`` is
  a no-op, and rich is not imported.
- the command line (or a notebook) wraps a run in :func:`shown`; every
  :func:`task` inside it becomes a rich.progress bar on **stderr** (stdout
  stays parseable) with elapsed time and, where the work is countable, an
  ETA.  Nothing appears unless the run lasts longer than ``delay`` seconds
  (``FIBGRAPH_PROGRESS_DELAY``, default 1), so short commands stay quiet.
  On a terminal the bars vanish when the run ends; when stderr is a file or a
  pipe rich does not animate, and the final state of the top-level stages is
  written once (with their times) when the run ends.

Stages nest (tuning -> colouring): the top level and one level below are
shown, finished nested stages are removed, deeper ones are not drawn.
"""
from __future__ import annotations

import contextvars
import os
import sys
import threading
from contextlib import contextmanager

__all__ = ["task", "shown", "active"]

_bar = contextvars.ContextVar("fibgraph_progress", default=None)
_depth = contextvars.ContextVar("fibgraph_progress_depth", default=0)
MAX_DEPTH = 2


def _noop(n=1, description=None, total=None):
    return None


def active() -> bool:
    """Whether a :func:`shown` display is collecting stages."""
    return _bar.get() is not None


class _Display:
    def __init__(self, delay, console):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.console = console or Console(stderr=True, highlight=False)
        both_tty = self.console.is_terminal and sys.stdout.isatty()
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=self.console,
                                 transient=self.console.is_terminal, redirect_stdout=both_tty,
                                 redirect_stderr=False)
        self.lock = threading.Lock()
        self.rows = {}          # top-level description -> its task id (a stage run again reuses its row)
        self.started = self.closed = False
        self.timer = None
        if delay <= 0:
            self.start()
        else:
            self.timer = threading.Timer(delay, self.start)
            self.timer.daemon = True
            self.timer.start()

    def start(self):
        with self.lock:
            if not self.started and not self.closed:
                self.progress.start()
                self.started = True

    def close(self):
        if self.timer is not None:
            self.timer.cancel()
        with self.lock:
            self.closed = True
            if self.started:
                self.progress.stop()


def _delay_default():
    try:
        return float(os.environ.get("FIBGRAPH_PROGRESS_DELAY", "1"))
    except ValueError:
        return 1.0


@contextmanager
def shown(quiet=False, delay=None, console=None):
    """Show the :func:`task` stages run inside as progress bars on stderr
    (``console``: another rich Console); ``quiet``: show nothing."""
    if quiet:
        token = _bar.set(None)
        try:
            yield
        finally:
            _bar.reset(token)
        return
    d = _Display(_delay_default() if delay is None else delay, console)
    token, dtoken = _bar.set(d), _depth.set(0)
    try:
        yield
    finally:
        _bar.reset(token)
        _depth.reset(dtoken)
        d.close()


@contextmanager
def task(description, total=None):
    """A stage of work; yields ``advance(n=1, description=None, total=None)``
    (``total``: set or change the amount of work, e.g. once it is known)."""
    d = _bar.get()
    depth = _depth.get()
    if d is None or depth >= MAX_DEPTH:
        token = _depth.set(depth + 1)
        try:
            yield _noop
        finally:
            _depth.reset(token)
        return
    p = d.progress
    tid = d.rows.get(description) if depth == 0 else None
    if tid is not None and p.tasks[[x.id for x in p.tasks].index(tid)].finished:
        p.reset(tid, total=total, start=True)     # the same stage again (compare: two models): one row
    else:
        tid = p.add_task(description, total=total)
        if depth == 0:
            d.rows[description] = tid

    def advance(n=1, description=None, total=None):
        kw = {}
        if description is not None:
            kw["description"] = description
        if total is not None:
            kw["total"] = total
        p.update(tid, advance=n, **kw)

    token = _depth.set(depth + 1)
    ok = False
    try:
        yield advance
        ok = True
    finally:
        _depth.reset(token)
        if depth > 0:
            p.remove_task(tid)
        else:
            t = p.tasks[[x.id for x in p.tasks].index(tid)]
            done = t.total if t.total is not None else max(t.completed, 1)
            p.update(tid, completed=done, total=done, description=description + ("" if ok else " (stopped)"))
            p.stop_task(tid)
