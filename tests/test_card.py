"""The model card's precision words, tags and vLLM snippet come from the checkpoint, not from a fixed text."""

from __future__ import annotations

import re

import pytest

from spark_quant import spark
from spark_quant.reporting.card import card_context, render_card, scheme

INT8 = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                    "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}}
W4A16 = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group"},
                     "input_activations": None}}
FP8 = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                   "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}


@pytest.mark.parametrize("groups,short,tags", [
    (INT8, "W8A8 INT8", ["w8a8", "int8"]),
    (W4A16, "W4A16", ["w4a16", "int4"]),
    (FP8, "W8A8 FP8", ["w8a8", "fp8"]),
])
def test_scheme_words_and_tags_follow_the_quantization_config(groups, short, tags):
    s = scheme({"config_groups": groups})
    assert s["short"] == short and s["tags"] == tags


def _context(groups) -> dict:
    qman = {"check": {"config_groups": groups, "format": "pack-quantized", "ignore": ["lm_head"],
                      "weights": {"total_bytes": 1}}, "config": {"name": "x"},
            "inputs": {"recipe": "quant_stage:\n  quant_modifiers:\n    GPTQModifier: {scheme: W4A16}\n",
                       "recipe_path": "recipes/w4a16_int4_gptq.yaml"}}
    checked = {"ckpt_manifest": qman, "results": None, "problems": []}
    return card_context(checked, {"num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 166000},
                        "me/Spark-TTS-0.5B-W4A16", "apache-2.0", {"note": "tiny proxy", "weights": "random"}, None,
                        [{"path": "LLM/", "what": "the LLM"}], "spark-quant/experiment.yaml", "x")


def test_a_w4a16_card_says_w4a16_and_is_tagged_so():
    pytest.importorskip("huggingface_hub")
    card = render_card(_context(W4A16))
    assert "weights INT4, activations 16-bit (W4A16)" in card.text
    assert "W8A8" not in card.text and "INT8" not in card.text
    assert "w4a16" in card.data.tags and "int4" in card.data.tags and "w8a8" not in card.data.tags


def test_the_snippet_prompt_is_spark_quant_s_own_prompt_builder():
    pytest.importorskip("huggingface_hub")
    card = render_card(_context(INT8))
    m = re.search(r'text = "(.*)"\n.*\n    prompt = "(.*)"\.format\(text=text\)', card.text)
    assert m, card.text
    assert m.group(2).format(text=m.group(1)) == spark.controllable_prompt(m.group(1), "female", "moderate", "moderate")
