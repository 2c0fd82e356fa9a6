"""The one run folder under every stage: map_stage and failure isolation, the runner (fingerprint, chunks, rank shards, lock, resume, merge), output folders and parquet I/O."""
