"""Kernels that read a cache's stored codes: decode attention over int8/int4/int2/KIVI payloads (C on the CPU,
Triton on a GPU) and the C quantizer of new tokens. They follow the byte layout of cache/quant.py."""
