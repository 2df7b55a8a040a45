"""Data: the demo corpus (demo), clip records and shards (records, prepare), input pipelines (pipeline, in_memory)."""
