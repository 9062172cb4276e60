"""The model's kernels: FlashAttention in Triton (forward, backward, per-key mass), the C matrix-vector product of
a decode step, and the helper that compiles C kernels at first use."""
