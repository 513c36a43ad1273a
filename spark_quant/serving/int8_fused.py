"""W8A8 INT8 without separate activation-quantization kernels before the QKV and gate/up GEMMs.

Stock vLLM (0.26) serves a compressed-tensors W8A8 INT8 checkpoint with ``CutlassInt8ScaledMMLinearKernel``:
every linear layer first quantizes its input with ``scaled_int8_quant`` (a per-token abs-max reduction and
a rounding pass), and RMSNorm (with its residual add) runs before that as its own kernel; vLLM's compile
passes fuse norm + quantization for FP8 only. ``SparkInt8FusedQwen2ForCausalLM`` is vLLM's Qwen2 whose
decoder layers call ``ops.rms_norm_dynamic_per_token_quant(x, w, eps, torch.int8, None, residual)`` (one
kernel: residual add, RMSNorm, per-token INT8 quantization) and hand its INT8 output and per-token scales
straight to ``ops.cutlass_scaled_mm`` for ``qkv_proj`` and ``gate_up_proj``: two norm and two quantization
kernels per layer become two. ``o_proj`` and ``down_proj`` keep the stock path (their inputs come from
attention and SiLU-and-mul, not from a norm). Same weights, same scales, same rounding rule; the fused kernel
computes the norm in one pass, so outputs match the stock path within INT8 rounding (one step at most).

Serve it with ``eval.int8_fused: true`` (or a paired variant's ``"int8_fused": true``): the engine gets
``hf_overrides={"architectures": [ARCHITECTURE]}`` and this module's ``register`` as a vLLM plugin. Only
checkpoints with dynamic, symmetric, per-token INT8 activations on the Cutlass kernel are accepted.
"""

from __future__ import annotations

ARCHITECTURE = "SparkInt8FusedQwen2ForCausalLM"
PLUGIN = "spark_quant.serving.int8_fused:register"


def register() -> None:
    """vLLM general plugin: make ``SparkInt8FusedQwen2ForCausalLM`` servable (safe to call repeatedly)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:{ARCHITECTURE}")


def fusable(linear) -> str | None:
    """None if ``linear`` can take a pre-quantized input, else why not (one line)."""
    scheme = getattr(linear, "scheme", None)
    if type(scheme).__name__ != "CompressedTensorsW8A8Int8":
        return f"scheme {type(scheme).__name__} is not compressed-tensors W8A8 INT8"
    if scheme.is_static_input_scheme or not scheme.input_symmetric:
        return "activations must be dynamic, symmetric, per token"
    kernel = type(getattr(scheme, "kernel", None)).__name__
    if kernel != "CutlassInt8ScaledMMLinearKernel":
        return f"vLLM chose {kernel}, not CutlassInt8ScaledMMLinearKernel"
    return None


def _model_class():
    import torch
    from vllm import _custom_ops as ops
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

    def norm_quant(x, norm, residual):
        # residual (if given) becomes x + residual in place; the output is int8(RMSNorm(that)) with per-token scales
        return ops.rms_norm_dynamic_per_token_quant(x.contiguous(), norm.weight, norm.variance_epsilon, torch.int8,
                                                    None, residual)

    def int8_mm(xq, xs, linear, out_dtype):
        return ops.cutlass_scaled_mm(xq, linear.weight, scale_a=xs, scale_b=linear.weight_scale, out_dtype=out_dtype,
                                     bias=linear.bias if not linear.skip_bias_add else None)

    def fused_forward(self, positions, hidden_states, residual):
        dtype = hidden_states.dtype
        if residual is None:
            residual = hidden_states  # as vLLM's Qwen2 layer: the first layer's input is the residual
            xq, xs = norm_quant(hidden_states, self.input_layernorm, None)
        else:
            xq, xs = norm_quant(hidden_states, self.input_layernorm, residual)
        attn = self.self_attn
        qkv = int8_mm(xq, xs, attn.qkv_proj, dtype)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        hidden_states, _ = attn.o_proj(attn.attn(q, k, v))
        xq, xs = norm_quant(hidden_states, self.post_attention_layernorm, residual)
        mlp = self.mlp
        hidden_states, _ = mlp.down_proj(mlp.act_fn(int8_mm(xq, xs, mlp.gate_up_proj, dtype)))
        return hidden_states, residual

    class SparkInt8FusedQwen2ForCausalLM(Qwen2ForCausalLM):
        """Qwen2 with RMSNorm + residual add + INT8 quantization fused before the QKV and gate/up GEMMs."""

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            for i, layer in enumerate(self.model.layers):
                if not hasattr(layer, "self_attn"):  # a pipeline-parallel placeholder
                    continue
                if getattr(layer.self_attn, "qk_norm", False):
                    raise ValueError(f"{ARCHITECTURE}: layer {i} has QK norm, which this fused path does not apply")
                for name, lin in (("qkv_proj", layer.self_attn.qkv_proj), ("gate_up_proj", layer.mlp.gate_up_proj)):
                    why = fusable(lin)
                    if why:
                        raise ValueError(f"{ARCHITECTURE}: layer {i} {name}: {why}; serve this checkpoint "
                                         "without int8_fused")
                layer.__class__ = _fused_layer_class(type(layer), fused_forward)

    SparkInt8FusedQwen2ForCausalLM.__qualname__ = ARCHITECTURE
    SparkInt8FusedQwen2ForCausalLM.__module__ = __name__
    return SparkInt8FusedQwen2ForCausalLM


_LAYER_CLASSES: dict = {}


def _fused_layer_class(base, forward):
    if base not in _LAYER_CLASSES:
        _LAYER_CLASSES[base] = type(f"Int8Fused{base.__name__}", (base,), {"forward": forward})
    return _LAYER_CLASSES[base]


def __getattr__(name: str):
    # vLLM resolves "spark_quant.serving.int8_fused:SparkInt8FusedQwen2ForCausalLM" lazily; importing this
    # module stays free of vLLM and torch
    if name == ARCHITECTURE:
        cls = _model_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
