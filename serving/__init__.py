"""Inference: generation through a cache, the inference config and its report."""
