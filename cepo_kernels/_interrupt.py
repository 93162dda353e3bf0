"""Ctrl-C while a command line tool is still importing its libraries: one line, not a traceback.

Imported first by `cepo_kernels/__init__.py`, before torch and triton (standard library only, and nothing
of the training loop, so `import cepo_kernels` stays light)."""

from __future__ import annotations

import os
import sys

COMMANDS = ("cepo-train", "cepo-viz", "cepo-compare")
MODULES = {"cepo_kernels.rl.cli": "cepo-train", "cepo_kernels.analysis.viz": "cepo-viz",
           "cepo_kernels.analysis.compare": "cepo-compare"}


def _command() -> str:
    """The tool this process runs: its console script's name, or the module of `python -m MODULE`."""
    argv = getattr(sys, "orig_argv", [])
    if "-m" in argv[:-1]:
        return MODULES.get(argv[argv.index("-m") + 1], "")
    return os.path.basename(sys.argv[0]).removesuffix(".exe") if sys.argv and sys.argv[0] else ""


def quiet_startup_interrupt():
    """In a cepo-train / cepo-viz / cepo-compare process: Ctrl-C before main() runs (while torch imports)
    prints one line instead of a KeyboardInterrupt traceback; Python then exits with the SIGINT status
    (130 in a shell). Called first thing by `import cepo_kernels`; a no-op in any other program
    (CEPO_CLI=name forces it, for tests)."""
    prog = os.environ.get("CEPO_CLI") or _command()
    if prog not in COMMANDS:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            print(f"\n{prog}: stopped (Ctrl-C) while starting; nothing was written", file=sys.stderr)
            return
        previous(kind, value, tb)

    sys.excepthook = hook
