"""How much a proxy's outputs move when its decoder weights are rounded to few bits.

A proxy stands in for Spark-TTS-0.5B in the fidelity evals, and a pass there means something only if
the proxy is about as sensitive to quantization noise as a real LM: on 2026-12-03's H200 run (gpu6) the
trained full proxy lost 5.4e-04 nats/token to 4-bit round-to-nearest weights, 37x under the 0.02 gate,
so even the deliberately damaged recipe passed. ``rtn_sensitivity`` measures that in seconds, at build
time (``PROXY.json`` ``rtn4_sensitivity``), before any GPU minute goes into quantizing and serving.

The rounding is compressed-tensors' own (``calculate_qparams`` + ``fake_quantize``, symmetric INT, one
scale per output channel): the weights of ``tests/fixtures/damaged_w4a16_rtn_channel.yaml``, without
llm-compressor's calibration pipeline around it. ``lm_head`` (tied to the embedding) is left alone, as
in every recipe.
"""

from __future__ import annotations

import copy
from typing import Any

from spark_quant.models.spark_language import Language, evaluation_sequences


def rtn_copy(model, bits: int = 4):
    """A copy of ``model`` with every Linear but ``lm_head`` rounded to ``bits``-bit symmetric INT weights,
    one scale per output channel (fake-quantized: still floating point, the values a served checkpoint has)."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel")
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in out.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                w = mod.weight
                scale, zero = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), args)
                mod.weight.copy_(fake_quantize(w, scale, zero, args))
    return out


def rtn_sensitivity(model, tok, texts: list[str], lang: Language, bits: int = 4, n: int = 32,
                    seed: int = 99) -> dict[str, Any]:
    """KL(model || rounded model) per output position and the share of positions whose top-1 token stays,
    teacher-forced on ``n`` synthetic Spark sequences built from ``texts`` (both prompt modes)."""
    import torch

    seqs = evaluation_sequences(lang, tok, texts, n, seed)
    rounded = rtn_copy(model, bits)
    dev = next(model.parameters()).device
    kl = 0.0
    same = total = 0
    with torch.no_grad():
        for s, plen in seqs:
            ids = torch.tensor([s], device=dev)
            a = model(input_ids=ids).logits[0, plen - 1 : len(s) - 1].float().log_softmax(-1)
            b = rounded(input_ids=ids).logits[0, plen - 1 : len(s) - 1].float().log_softmax(-1)
            kl += float((a.exp() * (a - b)).sum())
            same += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
    return {"bits": bits, "kl_nats_per_token": round(kl / total, 6), "top1_kept": round(same / total, 4),
            "positions": total, "sequences": n}
