"""spark_quant.models.damage: the damaged copy the must-FAIL fidelity checks quantize."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from spark_quant.errors import UserError
from spark_quant.models.damage import MARKER, noised_copy


def _model(path):
    (path / "LLM").mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    state = {"model.embed_tokens.weight": torch.randn(50, 16, generator=gen),
             "model.layers.0.mlp.down_proj.weight": torch.randn(16, 32, generator=gen) * 0.02,
             "model.norm.weight": torch.ones(16)}
    save_file(state, str(path / "LLM/model.safetensors"))
    (path / "LLM/config.json").write_text("{}")
    return state


def test_noise_lands_on_body_weights_at_the_tensor_scale_and_nowhere_else(tmp_path):
    clean = _model(tmp_path / "m")
    out = noised_copy(tmp_path / "m", tmp_path / "d", scale=1.0, seed=3)
    got = load_file(str(out / "LLM/model.safetensors"))
    assert torch.equal(got["model.embed_tokens.weight"], clean["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], clean["model.norm.weight"])
    w = clean["model.layers.0.mlp.down_proj.weight"]
    delta = got["model.layers.0.mlp.down_proj.weight"] - w
    assert 0.7 < float(delta.std() / w.std()) < 1.3  # 512 draws of std = the tensor's own std
    assert "never ship" in (out / MARKER).read_text()
    # the source is untouched, and a second call reuses the same copy
    assert torch.equal(load_file(str(tmp_path / "m/LLM/model.safetensors"))["model.layers.0.mlp.down_proj.weight"], w)
    mtime = (out / "LLM/model.safetensors").stat().st_mtime_ns
    assert noised_copy(tmp_path / "m", tmp_path / "d", scale=1.0, seed=3) == out
    assert (out / "LLM/model.safetensors").stat().st_mtime_ns == mtime


def test_an_existing_folder_it_did_not_make_is_refused_and_left_alone(tmp_path):
    _model(tmp_path / "m")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to replace"):
        noised_copy(tmp_path / "m", theirs)
    assert (theirs / "notes.txt").read_text() == "mine"
    noised_copy(tmp_path / "m", tmp_path / "d", scale=1.0)
    with pytest.raises(UserError, match="refusing to replace"):  # another noise level is another copy
        noised_copy(tmp_path / "m", tmp_path / "d", scale=2.0)
    with pytest.raises(UserError, match="no LLM/model.safetensors"):
        noised_copy(theirs, tmp_path / "x")
