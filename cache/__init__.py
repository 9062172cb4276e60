"""The KV cache: what to keep (policies), how to store it (codecs), and the per-layer caches that compose them."""
