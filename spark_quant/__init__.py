"""spark-quant: INT8 Spark-TTS checkpoints, and measurements of what they cost and buy.

Importing the package is cheap: no torch, no CUDA, no vLLM, no llm-compressor.
Stages import their heavy dependencies inside the functions that need them.
"""

__version__ = "0.1.0"
