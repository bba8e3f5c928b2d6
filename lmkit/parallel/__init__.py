"""Hybrid parallelism (data/ZeRO, tensor/sequence, pipeline, context, experts) wrapping an unmodified GPT."""
