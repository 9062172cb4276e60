"""The MLSys 2025 study's analyses on our model and kernels (Gao et al., "Rethinking Key-Value Cache Compression
Techniques for LLM Serving"): `python analyze.py`, one module per analysis."""
