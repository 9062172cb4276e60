import torch, time
from bench.decode import BENCH_MODEL, fill
from cache.base import LayerCache, ModelCache
from cache.policies import Full
from cache.storage import BufferStore
from cache.kernels.choose import decode_kernel
from cache.presets import PRESETS, build_cache
from toymodel.attention import get_backend
from toymodel.decode_layout import pack_for_decode
from toymodel.model import Transformer
torch.manual_seed(0)
cfg = BENCH_MODEL
model = Transformer(cfg).eval(); pack_for_decode(model)
kern = decode_kernel("sdpa", "cpu", torch.float32)
old = ModelCache([LayerCache(Full(), BufferStore(None, torch.float32), kern) for _ in range(cfg.n_layer)], 1, 2, 64, torch.device("cpu"))
new = build_cache(PRESETS["full"], cfg, 1, "cpu", torch.float32, max_tokens=9000)
ids = torch.randint(0, 4096, (1, 320))
for c in (old, new): fill(model, c, ids, 256)
be = get_backend("sdpa")
q = torch.randn(1, 6, 1, 64); k = torch.randn(1, 2, 1, 64)
def t(f, n=3000):
    s = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - s) / n * 1e6
with torch.inference_mode():
    for rep in range(3):
        for name, c in (("old", old), ("new", new)):
            c.positions(1)
            print(name, round(t(lambda: c.layers[0].attend(q, k, k, be)), 1), end="  ")
        print()
