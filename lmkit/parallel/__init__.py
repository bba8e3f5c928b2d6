"""Hybrid parallelism (data/ZeRO, tensor/sequence, pipeline) that wraps an unmodified GPT."""
