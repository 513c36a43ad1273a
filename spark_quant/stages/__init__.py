"""The pipeline stages, each: inputs -> outputs.begin_stage (skip / reuse / writable) -> work -> manifest."""
