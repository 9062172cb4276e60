import torch, time
from cache.kernels.cpu_decode import cpu_decode_paged, cpu_decode_segments
def t(f, n=3000):
    f(); s = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - s) / n * 1e6
B, H, Hkv, D, L, bt = 1, 6, 2, 64, 16, 16
q = torch.randn(B, H, 1, D); K = torch.randn(B, Hkv, L, D); V = torch.randn(B, Hkv, L, D)
pk = K.reshape(2, 1, bt, D); pv = V.reshape(2, 1, bt, D)
tables = torch.arange(2, dtype=torch.int32).view(1, 2, 1); lengths = torch.full((1, 2), L, dtype=torch.int32)
print("seg", t(lambda: cpu_decode_segments(q, [(K, V)])), "paged", t(lambda: cpu_decode_paged(q, pk, pv, tables, lengths)))
