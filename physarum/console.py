"""The driver's console: one `rich` Console on stderr that log lines and progress bars share.

`setup_logging` installs a `ConsoleHandler` on the root logger. In a terminal, log lines are
printed above the live progress bars (physarum.progress) and warnings are coloured; when
stderr is not a terminal (CI, a log file) nothing carries a colour code. Results (the demo's
table, `physarum status`) go to stdout. Without --verbose
the console shows INFO only from the loggers named in `show` and WARNING+ from all others
(the services' own logs go to run_dir/logs/, see physarum.logs).
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from typing import IO

from rich.console import Console
from rich.text import Text

FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STYLES = {logging.WARNING: "yellow", logging.ERROR: "bold red", logging.CRITICAL: "bold red"}


def make_console(stream: IO[str] | None = None) -> Console:
    """A console on `stream` (stderr by default, where logging always went) that is a terminal
    only if the stream is a TTY: no colour codes in a pipe or a file, whatever FORCE_COLOR
    says."""
    stream = stream or sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return Console(
        file=stream,
        force_terminal=tty,
        no_color=not tty,
        color_system="auto" if tty else None,
        highlight=False,
        soft_wrap=not tty,  # a log file gets whole lines, never wrapped at 80 columns
        width=None if tty else 120,
    )


class ConsoleHandler(logging.Handler):
    """A logging handler that prints through a rich Console (so lines land above a live
    progress bar instead of through it)."""

    def __init__(self, console: Console, show: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.console = console
        self.show = show  # None: every record passes; else INFO only from these loggers
        self.setFormatter(logging.Formatter(FORMAT, DATEFMT))

    def filter(self, record: logging.LogRecord) -> bool:
        if self.show is not None and record.levelno < logging.WARNING:
            if not any(record.name == n or record.name.startswith(n + ".") for n in self.show):
                return False
        return super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = Text(self.format(record), style=STYLES.get(record.levelno, ""))
            self.console.print(text, soft_wrap=True)
        except Exception:  # a logging handler never raises into the caller
            self.handleError(record)


def setup_logging(
    *,
    verbose: bool = False,
    show: tuple[str, ...] = ("physarum",),
    stream: IO[str] | None = None,
) -> Console:
    """Route the driver's logging to a console on stderr; returns that console.

    verbose: DEBUG from every logger (and physarum.cluster then forwards the actors' output).
    show: the loggers whose INFO lines reach the console when not verbose.
    Like logging.basicConfig, it leaves a root logger that someone else (pytest) already
    equipped alone (handlers and level), apart from replacing a ConsoleHandler of ours."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(handler)
    console = make_console(stream)
    if root.handlers:  # configured elsewhere (pytest's capture): neither print twice nor
        return console  # change its level, as basicConfig would not
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(ConsoleHandler(console, None if verbose else show))
    return console


def find_console() -> Console | None:
    """The console that setup_logging installed, if any (progress bars draw on it)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ConsoleHandler):
            return handler.console
    return None


def is_verbose() -> bool:
    """True when the driver logs DEBUG (physarum --verbose): actors' output is then also
    forwarded to this console."""
    return logging.getLogger().getEffectiveLevel() <= logging.DEBUG


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def print_traceback(exc: BaseException, stream: IO[str] | None = None) -> None:
    """The traceback of an error that ends the program; Ray colours parts of an actor's
    traceback even in a pipe, so the codes are stripped there."""
    stream = stream or sys.stderr
    text = "".join(traceback.format_exception(exc))
    tty = bool(getattr(stream, "isatty", lambda: False)())
    print(text if tty else strip_ansi(text), file=stream, end="", flush=True)
