"""Ctrl-C while a command line tool is still importing its libraries: one line, not a traceback.

Imported first by `cepo_kernels/__init__.py`, before torch and triton (standard library only, and nothing
of the training loop, so `import cepo_kernels` stays light)."""

from __future__ import annotations

import os
import sys

COMMANDS = ("cepo-train", "cepo-viz", "cepo-compare")


def quiet_startup_interrupt():
    """In a cepo-train / cepo-viz / cepo-compare process: Ctrl-C before main() runs (while torch imports)
    prints one line instead of a KeyboardInterrupt traceback; Python then exits with the SIGINT status
    (130 in a shell). Called first thing by `import cepo_kernels`; a no-op in any other program
    (CEPO_CLI names the command in a process cepo-train re-executes with `python -m`)."""
    prog = os.environ.get("CEPO_CLI") or (os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "")
    if prog.removesuffix(".exe") not in COMMANDS:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            print(f"\n{prog}: stopped (Ctrl-C) while starting; nothing was written", file=sys.stderr)
            return
        previous(kind, value, tb)

    sys.excepthook = hook
