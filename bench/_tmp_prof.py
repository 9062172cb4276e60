import torch, time
from bench.decode import BENCH_MODEL, fill
from cache.presets import PRESETS, build_cache
from toymodel.decode_layout import pack_for_decode
from toymodel.model import Transformer
torch.manual_seed(0)
model = Transformer(BENCH_MODEL).eval(); pack_for_decode(model)
B, T = 1, 320
c = build_cache(PRESETS["full"], BENCH_MODEL, B, "cpu", torch.float32, max_tokens=T + 4000)
fill(model, c, torch.randint(0, 4096, (B, T)), 256)
lc = c.layers[0]; st = lc.store
q = torch.randn(B, 6, 1, 64); k = torch.randn(B, 2, 1, 64)
def t(f, n=2000):
    s = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - s) / n * 1e6
with torch.inference_mode():
    c.positions(1)
    print("add us", t(lambda: st.add(k, k), 300))
    print("kernel us", t(lambda: lc.kernel(q, st.pool.k, st.pool.v, st.tables, st.lengths), 300))
    print("positions us", t(lambda: c.positions(1)))
    from cache.kernels.cpu_decode import cpu_decode_segments
    K, V = st.read()
    print("segments kernel us", t(lambda: cpu_decode_segments(q, [(K, V)]), 300))
import cProfile, pstats
with torch.inference_mode():
    pr = cProfile.Profile(); pr.enable()
    for _ in range(2000): lc.kernel(q, st.pool.k, st.pool.v, st.tables, st.lengths)
    pr.disable(); pstats.Stats(pr).sort_stats("tottime").print_stats(12)
