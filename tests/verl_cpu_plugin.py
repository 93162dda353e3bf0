"""Test-only plugin: verl 0.9.1's trainer stages on a CPU (gloo), for tests/test_verl_real.py and verl's own
CPU tests.

verl 0.9.1 has no CPU platform (its platform manager knows nvidia, npu and rocm and falls back to nvidia), its
FSDP engines are registered for cuda and npu only, and its hybrid worker builds a rollout engine (vLLM, SGLang
or TRT-LLM). Loaded in every process (`VERL_USE_EXTERNAL_MODULES=verl_cpu_plugin`, read by `import verl`, or
`pytest -p verl_cpu_plugin`), this module registers, through verl's own registries:

- platform `cpu` (`VERL_PLATFORM=cpu` selects it; never auto-detected): device "cpu", gloo, no-op device
  calls. Ray schedules verl's workers on its logical `GPU` slots (`ray.init(num_gpus=N)`, nothing behind
  them), since verl's resource pool counts `GPU` resources;
- verl's own FSDP engine (`FSDPEngineWithLMHead`, fsdp / fsdp2) for device "cpu";
- the worker's process group on gloo alone (verl asks for "cpu:gloo,<device>:<backend>", which on a CPU
  platform is "cpu:gloo,cpu:gloo" and torch refuses);
- verl's FSDP2 CPU-offload policy (the reference model's) without pinned memory (pinning needs an
  accelerator);
- rollout `cpu_stub`: a rollout engine that is never asked to generate (the harness writes the rollouts to
  TransferQueue itself), so the worker builds without vLLM;
- the processor of a Qwen2.5-VL / Qwen3-VL checkpoint where torchvision does not import (CPU torch 2.13):
  verl's `hf_processor` builds it with `AutoProcessor`, whose Qwen-VL processor classes need torchvision, and
  returns None (verl would then train the checkpoint as a text model). There, and only there, the package's
  `load_processor` (`VisionProcessor`: the checkpoint's tokenizer and PIL image processor) stands in, with
  the model's `get_rope_index` bound to it as verl's `hf_processor` binds it to a Qwen-VL processor.

Importing it also registers the project's `cepo` / `rlsd` estimators (`cepo_kernels.integrations.verl`).
"""

from __future__ import annotations

import contextlib
import os
import types

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

__all__ = ["PlatformCPU", "StubRollout", "ENV"]

# the environment every process of the harness needs (Ray's runtime_env env_vars)
ENV = {"VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": "verl_cpu_plugin"}


class _CPUDeviceModule:
    """`torch.cpu` plus the memory queries verl makes of a device module (no device memory: 0)."""

    def __getattr__(self, name):
        if name.startswith(("memory_", "max_memory_")):
            return lambda *args, **kwargs: 0
        if name in ("empty_cache", "reset_peak_memory_stats", "ipc_collect"):
            return lambda *args, **kwargs: None
        if name == "get_device_name":
            return lambda *args, **kwargs: "cpu"
        if name == "mem_get_info":
            return lambda *args, **kwargs: (0, 0)
        return getattr(torch.cpu, name)


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """verl's platform interface on the CPU: gloo, every device call a no-op."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self):
        return _CPUDeviceModule()

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        return os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"

    def current_device(self):
        return torch.device("cpu")  # verl passes it to .to() / device=: an index would mean an accelerator

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index=None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return (None, None)

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"  # what Ray sets for its (logical) GPU slots

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


# verl's engine modules resolve the platform when imported: they come after the platform's registration
from verl.utils import distributed as verl_distributed  # noqa: E402
from verl.workers import engine_workers  # noqa: E402
from verl.workers.config import model as verl_model_config  # noqa: E402
from verl.workers.engine.base import EngineRegistry  # noqa: E402
from verl.workers.engine.fsdp import transformer_impl  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402
from verl.workers.rollout import base as rollout_base  # noqa: E402

import cepo_kernels.integrations.verl  # noqa: E402, F401  (the cepo / rlsd estimators)


def _register_engine() -> None:
    registry = EngineRegistry._engines.get("language_model", {})
    if "cpu" not in registry.get("fsdp2", {}):
        EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu")(
            FSDPEngineWithLMHead)


class StubRollout(rollout_base.BaseRollout):
    """The hybrid worker's rollout engine, never asked to generate: the harness writes the rollouts to
    TransferQueue itself (as verl's agent loop does) and weight syncs are stubbed in the driver."""

    async def resume(self, tags):
        return None

    async def update_weights(self, weights, wire_format="named_tensors", **kwargs):
        for _ in weights:  # consume the generator, as a real engine does
            pass

    async def release(self):
        return None


def _gloo_process_group(timeout_second=None, backend=None):
    return verl_distributed.initialize_global_process_group_ray(timeout_second=timeout_second,
                                                                backend=backend or "gloo")


def _unpinned_offload_policy(pin_memory: bool = True):
    return _CPUOffloadPolicy(pin_memory=False)


def _vl_model_class(model_type: str):
    from transformers.models.qwen2_5_vl import Qwen2_5_VLModel
    from transformers.models.qwen3_vl import Qwen3VLModel

    return {"qwen2_5_vl": Qwen2_5_VLModel, "qwen3_vl": Qwen3VLModel}.get(model_type)


def _processor_without_torchvision(name_or_path, **kwargs):
    """verl's `hf_processor`; where it returns None for a Qwen-VL checkpoint because torchvision does not
    import, the package's `VisionProcessor` with the model's `get_rope_index` (and `get_vision_position_ids`)
    bound to it, as verl binds them to the Qwen-VL processor it would have built."""
    from transformers import AutoConfig
    from transformers.utils import is_torchvision_available

    from cepo_kernels.rl.vision_model import load_processor

    processor = _hf_processor(name_or_path, **kwargs)
    if processor is not None or is_torchvision_available():
        return processor
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    model_class = _vl_model_class(config.model_type)
    if model_class is None:
        return None
    processor = load_processor(name_or_path)
    processor.config = config
    processor.get_rope_index = types.MethodType(model_class.get_rope_index, processor)
    if hasattr(model_class, "get_vision_position_ids"):
        processor.get_vision_position_ids = types.MethodType(model_class.get_vision_position_ids, processor)
    return processor


_hf_processor = verl_model_config.hf_processor
verl_model_config.hf_processor = _processor_without_torchvision
_CPUOffloadPolicy = transformer_impl.CPUOffloadPolicy
_register_engine()
transformer_impl.CPUOffloadPolicy = _unpinned_offload_policy
engine_workers.initialize_global_process_group_ray = _gloo_process_group
rollout_base._ROLLOUT_REGISTRY[("cpu_stub", "async")] = f"{__name__}.StubRollout"
