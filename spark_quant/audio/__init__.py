"""Hearing the outputs: BiCodec decoding, WAV samples, streamed time to first audio.

Runs in the serving environment (the eval stage and its workers): imports torch, numpy,
scipy, matplotlib, ``spark_quant.spark`` and the base modules, never llm-compressor,
training code or a stage.

- ``codec``: BiCodec's decoder (global + semantic tokens -> 16 kHz mono audio), built from
  the ``spark-tts-lib`` package's modules; loads a real ``BiCodec/`` folder or builds an
  embedded one with Spark-TTS's architecture and configuration and seeded random weights.
- ``samples``: BF16 vs INT8 WAV pairs, spectrogram PNGs and a static HTML page.
- ``stream``: a TTS server's chunked streaming (first chunk after 50 semantic tokens, then
  growing chunks) and its metrics: time to first audio, RTF with the codec, underrun.
  Its one codec thread decodes the chunks that queued meanwhile in one batched call.
- ``stream_session``: that streaming measured on a vLLM engine plus the codec, a session process.
- ``stream_pool``: the measurement on ``eval.replicas`` such sessions (``serving.dispatch.Pool``),
  each level's requests split over them.

Importing this package is cheap: torch is imported inside functions.
"""
