import torch, time, cProfile, pstats
from bench.decode import BENCH_MODEL, fill
from cache.base import LayerCache, ModelCache
from cache.policies import Full
from cache.storage import BufferStore
from cache.kernels.choose import decode_kernel
from cache.presets import PRESETS, build_cache
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
tok = torch.zeros(1, 1, dtype=torch.long)
with torch.inference_mode():
    for name, c in (("old", old), ("new", new)):
        pr = cProfile.Profile(); pr.enable()
        for _ in range(300): model(tok, c)
        pr.disable(); print(name); pstats.Stats(pr).sort_stats("tottime").print_stats(12)
