"""Deliberately damaged copies of a model, for checking that the fidelity gates can fail.

``noised_copy`` adds Gaussian noise, std ``scale`` x the tensor's own std, to every 2-D body weight (the
embedding, and so the tied ``lm_head``, untouched). Quantized with the default W8A8 recipe and evaluated against
the clean model, it is the damaged variant that must FAIL: ``tests/test_metrics_can_fail.py`` on the tiny
trained proxy (CPU) and ``eval/gpu_measure.sh``'s ``fidelity-noised`` on the full one (GPU). The copy says
what it is in ``DAMAGED.txt``; never ship a model made from one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from spark_quant.errors import UserError

MARKER = "DAMAGED.txt"


def noised_copy(src: Path, dst: Path, scale: float = 1.0, seed: int = 0) -> Path:
    """``src`` (a Spark-TTS model folder) copied to ``dst`` with noise on its LLM's body weights. A ``dst`` this
    function made with the same noise is reused; any other existing ``dst`` is refused, never replaced."""
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    note = f"damaged copy of {src}: noise x{scale} (seed {seed}) on every body weight; never ship it\n"
    if dst.exists():
        if (dst / MARKER).is_file() and (dst / MARKER).read_text() == note:
            return dst
        raise UserError(f"{dst}: exists and is not this damaged copy ({MARKER} differs or is missing); "
                        "refusing to replace it: choose another folder")
    if not (src / "LLM/model.safetensors").is_file():
        raise UserError(f"{src}: no LLM/model.safetensors; give a Spark-TTS model folder")
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # only ever this function's own half-written copy
    shutil.copytree(src, tmp)
    path = tmp / "LLM/model.safetensors"
    state = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    for name, w in state.items():
        if w.dim() == 2 and "embed_tokens" not in name:
            w.add_((torch.randn(w.shape, generator=gen) * w.float().std() * scale).to(w.dtype))
    save_file(state, str(path), metadata={"format": "pt"})
    (tmp / MARKER).write_text(note)
    tmp.rename(dst)
    return dst


if __name__ == "__main__":  # python -m spark_quant.models.damage SRC DST [SCALE]
    import sys

    print(noised_copy(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 1.0))
