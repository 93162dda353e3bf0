"""Ctrl-C while a command line tool is still importing its libraries: one line, not a traceback.

Imported first by `cepo_kernels/__init__.py`, before torch and triton (standard library only, and nothing
of the front ends, so `import cepo_kernels` stays light). Which tools there are is not written here: they
are the package's console scripts (setup.py's entry points, each naming its front end's `main`), read
from the installed distribution's metadata."""

from __future__ import annotations

import os
import sys

PACKAGE = __name__.split(".")[0]


def console_scripts() -> dict[str, str]:
    """The installed package's console scripts: {name: "module:function"} ({} when not installed)."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        eps = distribution(PACKAGE).entry_points
    except (ImportError, PackageNotFoundError, OSError):
        return {}
    return {ep.name: ep.value for ep in eps if ep.group == "console_scripts"}


def _command() -> str:
    """The tool this process runs: its console script's name (launched as the script, or as `python -m` of
    the script's module); "" for any other program."""
    argv = getattr(sys, "orig_argv", [])
    if "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1]
        if not module.startswith(PACKAGE + "."):
            return ""
        return next((n for n, v in console_scripts().items() if v.split(":")[0] == module), "")
    name = os.path.basename(sys.argv[0]).removesuffix(".exe") if sys.argv and sys.argv[0] else ""
    if not name or name.endswith(".py") or name == "-c":
        return ""
    return name if name in console_scripts() else ""


def quiet_startup_interrupt():
    """In a process running one of the package's console scripts: Ctrl-C before main() runs (while torch
    imports) prints one line instead of a KeyboardInterrupt traceback; Python then exits with the SIGINT
    status (130 in a shell). Called first thing by `import cepo_kernels`; a no-op in any other program
    (CEPO_CLI=name forces it, for tests)."""
    prog = os.environ.get("CEPO_CLI") or _command()
    if not prog:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            print(f"\n{prog}: stopped (Ctrl-C) while starting; nothing was written", file=sys.stderr)
            return
        previous(kind, value, tb)

    sys.excepthook = hook
