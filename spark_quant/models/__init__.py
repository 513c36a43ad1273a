"""The Spark-TTS model folder: locating and checking it, its tokenizer, the embedded proxies, generation
with transformers, and the Spark serving-profile transform."""
