"""What runs in the serving environment: the vLLM worker, its plugins (the serving profile's model, the fused
INT8 path), the step profiler, long-lived engine sessions, the replica dispatcher, the paired speed method, and
the client that builds worker specs and runs workers. Imports only spark_quant.spark and the base modules (a
test holds this)."""
