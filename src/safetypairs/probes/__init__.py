"""Embeddings, linear probes and the sample-efficiency sweep."""
