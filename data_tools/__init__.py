"""Shard tools behind the `flowmatch-data` command: build WebDataset shards (folder, jsonl, digits), precompute
cached latents and text embeddings (encode), and look inside shards (inspect, verify)."""
