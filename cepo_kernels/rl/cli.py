"""`cepo-train` (also `python -m cepo_kernels.rl.cli`): RLVR training with CEPO / RLSD / GRPO.

With no arguments it trains the embedded tiny model on the embedded arithmetic task. Without a GPU the
operators run their native CPU kernels; CEPO_KERNELS_CPU=interpreter with TRITON_INTERPRET=1 (set before the
command starts) runs the Triton kernels through Triton's interpreter instead.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings


def _kernels(device) -> str:
    """Which kernels the operators run on `device` (checks CEPO_KERNELS_CPU on a CPU)."""
    if str(device).startswith("cuda"):
        return "GPU kernels"
    from cepo_kernels.ops._common import cpu_backend

    return "Triton interpreter" if cpu_backend() == "interpreter" else "native CPU kernels"


def _quiet_libraries():
    """--no-progress: no loading bars or advisory warnings from the model libraries either."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad input or an unusable run directory, 3 the training diverged (NaN),
    130 stopped by Ctrl-C / SIGTERM (resumable)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    from cepo_kernels.rl.errors import NaNLossError, RewardFunctionError
    from cepo_kernels.rl.options import parse_args
    from cepo_kernels.rl.vision_trainer import make_trainer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # numpy's "invalid value" notes from inside Triton's interpreter (masked lanes); the kernels handle NaN
    # explicitly and a NaN loss is reported by the trainer itself
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    trainer = None
    try:
        if "--print-config" in argv:  # the resolved options as JSON, nothing run (cepo-compare uses it)
            print(json.dumps(parse_args(argv).to_dict()))
            return 0
        cfg = parse_args(argv)
        if not cfg.progress:
            _quiet_libraries()
        trainer = make_trainer(cfg)
        cfg = trainer.cfg
        kernels = _kernels(trainer.device)
        kind = "Qwen3-VL" if cfg.data is None and cfg.task == "count" else "Qwen2"
        what = cfg.model or f"embedded tiny {kind} (random init + supervised warm-up)"
        task = "arithmetic" if cfg.task == "arith" else cfg.task
        data = cfg.data or f"embedded {task} task"
        print(
            f"cepo-train: algo={cfg.algo} model={what} data={data} device={trainer.device} "
            f"({kernels})"
        )
        print(
            f"cepo-train: {len(trainer.train_set)} training / {len(trainer.eval_set)} held-out problems, "
            f"{cfg.steps} steps of {cfg.prompts_per_step} prompts x {cfg.group_size} responses; "
            f"run dir {trainer.out}"
            + (f" (resuming at step {trainer.step_idx})" if cfg.resume else ""),
            flush=True,
        )
        summary = trainer.train()
    except (ValueError, TypeError, FileNotFoundError, RewardFunctionError) as e:
        print(f"cepo-train: error: {e}", file=sys.stderr)
        return 2
    except NaNLossError as e:
        print(f"cepo-train: aborted: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # a full disk, a directory that became read-only...
        print(f"cepo-train: error: {e}{_resume_hint(trainer)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ncepo-train: stopped{_resume_hint(trainer)}", file=sys.stderr)
        return 130
    finally:
        if trainer is not None:
            trainer.close()
    print("cepo-train: done: " + json.dumps(summary))
    if summary["interrupted"]:
        print(f"cepo-train: stopped after step {summary['steps_done']} of {summary['steps']}; "
              f"continue with: cepo-train --resume {trainer.out}", file=sys.stderr)
        return 130
    print(
        f"cepo-train: metrics in {trainer.metrics_path}; checkpoints in {trainer.out / 'checkpoints'}"
        + (f"; final model in {trainer.out / 'final_model'}" if trainer.step_idx >= cfg.steps else "")
    )
    return 0


def _resume_hint(trainer) -> str:
    if trainer is None:
        return " (before training started: nothing to resume)"
    from cepo_kernels.rl.checkpoint import list_checkpoints

    found = list_checkpoints(trainer.out / "checkpoints")
    if not found:
        return f"; no checkpoint was written yet in {trainer.out}"
    return f"; the last checkpoint is {found[-1].name}: continue with: cepo-train --resume {trainer.out}"


if __name__ == "__main__":
    sys.exit(main())
