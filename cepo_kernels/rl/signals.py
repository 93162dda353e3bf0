"""Ctrl-C and SIGTERM during training: the first asks to stop after the current step (with a checkpoint),
a second one stops at once (KeyboardInterrupt); the run resumes from its last checkpoint."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

log = logging.getLogger("cepo_kernels.rl")


def graceful_stop(trainer):
    """While training: the first SIGINT/SIGTERM sets trainer.stop_requested, a second one raises
    KeyboardInterrupt at once. Only in the main thread (signal handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def handlers():
        def on_signal(signum, frame):
            if trainer.stop_requested:
                raise KeyboardInterrupt
            trainer.stop_requested = True
            log.warning("%s: stopping after step %d, with a checkpoint (again to stop at once)",
                        signal.Signals(signum).name, trainer.step_idx + 1)

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    return handlers()

