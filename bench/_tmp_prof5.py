import torch, time
from cache.kernels.cpu_decode import cpu_decode_paged, cpu_decode_segments
def t(f, n=500):
    f(); s = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - s) / n * 1e6
for B, L in ((1, 2048), (8, 512)):
    H, Hkv, D = 6, 2, 64
    q = torch.randn(B, H, 1, D); K = torch.randn(B, Hkv, L, D); V = torch.randn(B, Hkv, L, D)
    print(B, L, "segments", round(t(lambda: cpu_decode_segments(q, [(K, V)])), 1), end=" ")
    for bt in (16, 32, 64, 256):
        nb = L // bt
        pk = K.reshape(B * Hkv * nb, 1, bt, D); pv = V.reshape(B * Hkv * nb, 1, bt, D)
        tables = torch.arange(B * Hkv * nb, dtype=torch.int32).view(B, Hkv, nb)
        lengths = torch.full((B, Hkv), L, dtype=torch.int32)
        print(f"paged{bt}", round(t(lambda: cpu_decode_paged(q, pk, pv, tables, lengths)), 1), end=" ")
    print()
