"""What runs in the serving environment: the vLLM worker, its plugin, the step profiler, and the client that
builds worker specs and runs workers. Imports only spark_quant.spark and the base modules (a test holds this)."""
