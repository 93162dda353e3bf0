"""The policy model of cepo-train: device and dtype, loading (embedded or a local Hugging Face directory),
LoRA, gradient checkpointing, export."""

from __future__ import annotations

import random
import re
import resource
from pathlib import Path

import numpy as np
import torch

from cepo_kernels.rl.task import build_tiny_model, build_tokenizer
from cepo_kernels.step.forward import base_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {name!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                "use --device cpu (or auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device: {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model_and_tokenizer(cfg, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer): the embedded tiny model when cfg.model is None, else AutoModelForCausalLM and
    AutoTokenizer from the local directory cfg.model (no downloads)."""
    if cfg.model is None:
        tokenizer = build_tokenizer()
        model = build_tiny_model(tokenizer, seed=cfg.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(cfg.model).resolve()  # absolute: the saved LoRA adapter points to its base by this path
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model: {str(path)!r} is not a local Hugging Face model directory "
                f"(no config.json there; hub downloads are not used)"
            )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return prepare_model(model, cfg, device, dtype), tokenizer


def prepare_model(model, cfg, device, dtype):
    """The loaded model on its device and dtype, with LoRA and gradient checkpointing as configured."""
    model.to(device=device, dtype=dtype)
    if cfg.lora_rank > 0:
        model = apply_lora(model, cfg)
    if cfg.gradient_checkpointing:
        base = base_model(model)
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    return model


# a vision-language model's vision tower stays frozen, as in the authors' runs (Qwen2.5-VL's vision MLP has
# gate_proj / up_proj / down_proj too); text models have no such module, and get no exclusion (peft warns
# about an exclusion that matches nothing)
VISION_TOWER = r".*visual.*"


def apply_lora(model, cfg):
    from peft import LoraConfig, get_peft_model

    modules = [n for n, _ in model.named_modules()]
    names = {n.split(".")[-1] for n in modules}
    tower = any(re.fullmatch(VISION_TOWER, n) for n in modules)
    targets = [t for t in cfg.lora_targets if t in names]
    if not targets:
        raise ValueError(
            f"lora_target_modules: none of {cfg.lora_targets} is a module of this model "
            f"(linear modules: {sorted(n for n in names if n.endswith('proj'))})"
        )
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        exclude_modules=VISION_TOWER if tower else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def export_model(model, tokenizer, out: Path):
    """save_pretrained of the model (a peft adapter under LoRA) and the tokenizer, for later loading."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA), else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
