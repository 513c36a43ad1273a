"""Spark-TTS facts: ids, prompt formats, output parsing (pure Python, no model)."""

import pytest

from spark_quant import spark


def test_added_token_ids_match_the_published_checkpoints():
    toks = spark.spark_added_tokens()
    assert len(toks) == 13_493
    assert spark.SPARK_LAST_ID == 165_157
    for tok, want in spark.CHECKPOINTS.items():
        assert spark.token_id(tok) == want, tok
    assert spark.token_id("<|pitch_value_0|>") == 163_953
    assert spark.token_id("<|gender_2|>") == 165_034
    assert spark.token_id("<|emotion_100|>") == 165_135
    assert spark.token_id("<|task_vc|>") == 165_136
    assert spark.token_id("<|task_edit|>") == 165_145


def test_controllable_prompt_format():
    p = spark.controllable_prompt("Hello.", "male", "high", "very_low")
    assert p == ("<|task_controllable_tts|><|start_content|>Hello.<|end_content|><|start_style_label|>"
                 "<|gender_1|><|pitch_label_3|><|speed_label_0|><|end_style_label|>")
    with pytest.raises(ValueError, match="pitch must be one of"):
        spark.controllable_prompt("x", "male", "loud", "low")


def test_clone_prompts_with_and_without_transcript():
    g = list(range(32))
    p = spark.clone_prompt("Hi", g)
    assert p.startswith("<|task_tts|><|start_content|>Hi<|end_content|><|start_global_token|><|bicodec_global_0|>")
    assert p.endswith("<|bicodec_global_31|><|end_global_token|>")
    p2 = spark.clone_prompt("Hi", g, prompt_text="Ref. ", semantic_tokens=[5, 6])
    assert "<|start_content|>Ref. Hi<|end_content|>" in p2
    assert p2.endswith("<|start_semantic_token|><|bicodec_semantic_5|><|bicodec_semantic_6|>")
    with pytest.raises(ValueError, match="exactly 32"):
        spark.clone_prompt("x", g[:30])
    with pytest.raises(ValueError, match="semantic tokens"):
        spark.clone_prompt("x", g, prompt_text="ref")


def test_parse_ids_counts_globals_semantics_and_eos():
    gen = ([spark.token_id("<|start_acoustic_token|>")] + [spark.global_id(i) for i in range(32)]
           + [spark.token_id("<|start_semantic_token|>")] + [spark.semantic_id(i) for i in range(100)] + [spark.EOS_ID])
    out = spark.parse_ids(gen, "controllable")
    assert out.global_tokens == list(range(32)) and len(out.semantic_tokens) == 100
    assert out.audio_seconds == 2.0 and out.valid
    runaway = spark.parse_ids(gen[:-1], "controllable")
    assert not runaway.valid and "runaway" in runaway.problems[0]
    short = spark.parse_ids([spark.global_id(1)] * 30 + [spark.semantic_id(1), spark.EOS_ID], "controllable")
    assert short.problems == ["30 global tokens (need 32)"]
    assert spark.parse_ids([spark.EOS_ID], "clone").problems == ["no semantic tokens"]


def test_parse_text_matches_parse_ids():
    text = "<|bicodec_global_7|>" * 32 + "<|bicodec_semantic_3|><|bicodec_semantic_8191|>"
    out = spark.parse_text(text, "controllable")
    assert out.global_tokens == [7] * 32 and out.semantic_tokens == [3, 8191]


def test_tokenizer_problems_reports_a_shifted_vocab():
    vocab = {t: spark.SPARK_FIRST_ID + i for i, t in enumerate(spark.spark_added_tokens())}
    vocab.update({"<|endoftext|>": 151643, "<|im_end|>": 151645})
    assert spark.tokenizer_problems(vocab) == []
    vocab["<|bicodec_semantic_9|>"] += 1
    assert "<|bicodec_semantic_9|>" in spark.tokenizer_problems(vocab)[0]
    assert spark.tokenizer_problems({"hello": 1})[0].startswith("<|endoftext|> is missing")


def test_emittable_ids_cover_audio_labels_markers_and_eos():
    ids = spark.emittable_ids()
    assert ids[0] == spark.EOS_ID and len(ids) == 13_494
    assert spark.semantic_id(8191) in ids and spark.token_id("<|end_semantic_token|>") in ids
