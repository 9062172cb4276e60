"""What the tiered KV store (memhier/) costs and buys, in one run: budgets, disk bandwidth, retrieval, prefix reuse.

    python bench/tiers.py                          # random weights of the tiny model's shape
    python bench/tiers.py --ckpt runs/tiny-mha     # perplexity of held-out plays needs a trained checkpoint

Every run uses cache=quant4 (4-bit blocks move as 4-bit bytes) and blocks of --block-tokens tokens. Sections,
each printed with PASS / MISS against the issue's target where it has one:

    budgets    exact-mode decode tokens/s with the device tier holding 100%, 50%, 25%, 10% of the final cache's
               sealed bytes; half of the rest fits the host tier, the remainder spills to disk. memhier=off is
               the reference (ratio 1.00). Decode tokens/s = B * (new tokens - 1) / decode seconds, prefill
               excluded (toymodel.generate times the two phases). Every step reads every block, so a small
               device tier cycles blocks through host and disk (LRU on a cyclic scan: the worst case).
    disk       the disk tier's read bandwidth inside the 10% run: bytes read from spill files / seconds inside
               DiskTier.read (open, read, sha256 check), against a raw sequential read (1 MiB reads, no check)
               of a file of the same number of bytes written in this run, both cold (written, fsynced, dropped
               from the page cache with posix_fadvise DONTNEED) and warm (read again). Target: >= 70% of the
               cold read. Caution: spill files read during decoding were written moments before, so most of
               those reads hit the page cache; the cold raw read is the disk the tier stands for.
    retrieval  memhier.mode=retrieval (sinks + local window + top-k blocks) against exact: perplexity of
               held-out text fed one token at a time through the cache (random weights: random ids), and decode
               tokens/s at the same budgets as above.
    prefix     time to first token (prefill + first sample) of a --prefix-len prompt: a warm persistent prefix
               store (written by the cold run just before, same prompt) against a cold prefill into an empty
               store, alternating, median of --repeats. Target: warm >= 3x faster.

A figure of where the blocks live (device / host / disk) at every step of one generation goes to
docs/figures/memhier_tiers.png. Numbers go to bench/results/memhier.json. Timings are medians of --repeats runs
that alternate between the sides compared, so a machine that slows down mid-run slows both alike.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cache.presets import PRESETS
from memhier.cache import MemhierSpec, make_cache
from memhier.persist import weights_digest
from memhier.tiers import DiskTier
from toymodel.checkpoint import read_meta, resolve_checkpoint
from toymodel.config import ModelConfig
from toymodel.export_hf import load_kvlab_model
from toymodel.generate import Sampling, generate, perplexity_through_cache
from toymodel.model import Transformer
from toymodel.tokenizer import HELD_OUT_PLAYS, get_tokenizer
from training.config import DataConfig
from training.corpus import load_splits
from rounds import alternate  # bench/rounds.py: bench/ is on sys.path when a script runs

GREEDY = Sampling(temperature=0.0)
PRESET = PRESETS["quant4"]
FRACTIONS = (1.0, 0.5, 0.25, 0.1)
CPU = torch.device("cpu")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def load_model(ckpt: str | None) -> tuple[Transformer, np.ndarray | None]:
    """The packed model, and held-out tokens with a checkpoint (None with random weights)."""
    if ckpt is None:
        torch.manual_seed(0)
        return Transformer(ModelConfig()).eval().pack_for_decode(), None
    run = read_meta(resolve_checkpoint(ckpt)).get("run", {})
    data = DataConfig(**run["data"]) if "data" in run else DataConfig(val_docs=list(HELD_OUT_PLAYS))
    return load_kvlab_model(ckpt).pack_for_decode(), load_splits(data, get_tokenizer())[1]  # validation split


def budgets(cache_bytes: int, fraction: float, args) -> MemhierSpec:
    """Device tier = fraction of the cache, host = half of the rest, disk = everything else (the spill dir)."""
    device = int(fraction * cache_bytes)
    return MemhierSpec(enabled=True, block_tokens=args.block_tokens, device_bytes=device,
                       host_bytes=(cache_bytes - device) // 2, spill_dir=args.spill_dir)


def decode_run(model: Transformer, prompt: torch.Tensor, spec: MemhierSpec, new_tokens: int,
               on_token=None) -> dict:
    """One generation through a fresh cache -> decode tokens/s and the cache's figures (its spill dir removed)."""
    cache = make_cache(PRESET, spec, model.config, prompt.shape[0], CPU, torch.float32)
    g = generate(model, prompt, cache, new_tokens, GREEDY, on_token=None if on_token is None else
                 (lambda tok: on_token(cache)))
    figures = {"decode_tok_s": g.decode_tokens_per_s, **cache.figures()}
    if spec.enabled:
        disk = next(t for t in cache.store.tiers if isinstance(t, DiskTier))
        figures["disk_read_seconds"] = disk.read_seconds
        cache.close()
    return figures


def section_budgets(model, prompt, args, mode: str, cache_bytes: int) -> dict:
    """Decode tokens/s per device budget (and memhier=off), medians over alternating repeats."""
    sides = {"off": lambda: decode_run(model, prompt, MemhierSpec(), args.new_tokens)}
    for f in FRACTIONS:
        spec = dataclasses.replace(budgets(cache_bytes, f, args), mode=mode, topk_blocks=args.topk_blocks)
        sides[f"{f:.0%}"] = lambda spec=spec: decode_run(model, prompt, spec, args.new_tokens)
    runs = alternate(args.repeats, sides)
    off = statistics.median(r["decode_tok_s"] for r in runs["off"])
    rows = {}
    for name, rs in runs.items():
        tok_s = statistics.median(r["decode_tok_s"] for r in rs)
        rows[name] = {"decode_tok_s": tok_s, "ratio_to_off": tok_s / off, "figures": rs[-1]}
        print(f"[{mode}] device tier {name:>4}: {tok_s:7.1f} decode tok/s ({tok_s / off:.2f}x memhier=off)", flush=True)
    return rows


def raw_read_seconds(path: Path, nbytes: int, cold: bool) -> float:
    """Seconds to read `nbytes` of `path` sequentially in 1 MiB reads; cold: dropped from the page cache first."""
    with open(path, "rb") as f:
        if cold:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(1 << 20)
        start, done = time.perf_counter(), 0
        while done < nbytes:
            done += f.readinto(buf) or nbytes  # a short file ends the loop
        return time.perf_counter() - start


def section_disk(run: dict, args) -> dict:
    nbytes, seconds = run["memhier_disk_bytes_read"], run["disk_read_seconds"]
    if nbytes == 0:
        print("[disk] the 10% run read nothing from disk: raise --new-tokens or lower the budgets")
        return {}
    with tempfile.NamedTemporaryFile(dir=args.spill_dir) as f:  # on the spill tier's file system
        f.write(os.urandom(nbytes))
        f.flush()
        os.fsync(f.fileno())
        cold = raw_read_seconds(Path(f.name), nbytes, cold=True)
        warm = raw_read_seconds(Path(f.name), nbytes, cold=False)
    tier, raw_cold, raw_warm = nbytes / seconds, nbytes / cold, nbytes / warm
    ratio = tier / raw_cold
    print(f"[disk] {nbytes / 2**20:.1f} MiB read by the disk tier while decoding at {tier / 1e9:.2f} GB/s; raw "
          f"sequential read {raw_cold / 1e9:.2f} GB/s cold, {raw_warm / 1e9:.2f} GB/s warm: {ratio:.0%} of cold "
          f"(target 70%: {verdict(ratio >= 0.7)}), {tier / raw_warm:.0%} of warm", flush=True)
    return {"bytes": nbytes, "tier_gb_s": tier / 1e9, "raw_cold_gb_s": raw_cold / 1e9, "raw_warm_gb_s": raw_warm / 1e9,
            "ratio_cold": ratio, "ratio_warm": tier / raw_warm, "target": 0.7, "pass": ratio >= 0.7}


def section_perplexity(model, val: np.ndarray | None, args) -> dict:
    n, W = args.ppl_length, args.ppl_windows
    if val is None:
        ids = torch.randint(0, model.config.vocab_size, (W, n + 1), generator=torch.Generator().manual_seed(1))
    else:
        starts = np.linspace(0, len(val) - n - 1, W).round().astype(np.int64)
        ids = torch.from_numpy(np.stack([val[s : s + n + 1] for s in starts]).astype(np.int64))  # (W, n + 1)
    out = {}
    for mode in ("exact", "retrieval"):
        spec = MemhierSpec(enabled=True, block_tokens=args.block_tokens, device_bytes=2**40, mode=mode,
                           topk_blocks=args.topk_blocks, spill_dir=args.spill_dir)
        cache = make_cache(PRESET, spec, model.config, W, CPU, torch.float32)
        out[mode] = perplexity_through_cache(model, ids, cache, progress=False)
        cache.close()
    print(f"[retrieval] perplexity over {W} windows of {n} {'held-out' if val is not None else 'random'} tokens: "
          f"exact {out['exact']:.3f}, retrieval {out['retrieval']:.3f} "
          f"({out['retrieval'] / out['exact'] - 1:+.1%})", flush=True)
    return out


def section_prefix(model, args) -> dict:
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prefix_len), generator=torch.Generator().manual_seed(2))
    model_id = weights_digest(model)
    root = Path(tempfile.mkdtemp(prefix="kvlab-bench-prefix-", dir=args.spill_dir))
    ttft = {"cold": [], "warm": []}
    for r in range(args.repeats):
        spec = MemhierSpec(enabled=True, block_tokens=args.block_tokens, device_bytes=2**40, persist=True,
                           persist_dir=str(root / f"round-{r}"), spill_dir=args.spill_dir)
        for side in ("cold", "warm"):  # cold fills the empty store the warm run then reuses
            cache = make_cache(PRESET, spec, model.config, 1, CPU, torch.float32, model_id)
            g = generate(model, prompt, cache, 2, GREEDY, prefill=cache.prefill)
            ttft[side].append(g.prefill_seconds)
            reused = cache.reused_blocks
            cache.close()
    cold, warm = statistics.median(ttft["cold"]), statistics.median(ttft["warm"])
    print(f"[prefix] {args.prefix_len}-token prompt: time to first token {1e3 * cold:.0f} ms cold, {1e3 * warm:.0f} ms "
          f"with a warm store ({reused} blocks reused) = {cold / warm:.1f}x (target 3x: {verdict(cold / warm >= 3)})",
          flush=True)
    return {"ttft_cold_s": cold, "ttft_warm_s": warm, "speedup": cold / warm, "reused_blocks": reused,
            "ttft_all": ttft, "target": 3.0, "pass": cold / warm >= 3}


def figure(model, args, cache_bytes_per_token: float, out: Path) -> None:
    """Tier of every block at every step of one generation (device 25%, host 25% of the final cache)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T, N = args.figure_prompt, args.figure_new_tokens
    prompt = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(3))
    final = int(cache_bytes_per_token * (T + N))
    spec = MemhierSpec(enabled=True, block_tokens=args.block_tokens, device_bytes=final // 4, host_bytes=final // 4,
                       spill_dir=args.spill_dir)
    snapshots = []  # per step: {key: tier level}

    def snapshot(cache) -> None:
        snapshots.append({key: level for level, tier in enumerate(cache.store.tiers)
                          for key in tier.blocks})

    decode_run(model, prompt, spec, N, on_token=snapshot)
    keys = sorted({k for s in snapshots for k in s})  # (layer, block), layer-major
    grid = np.full((len(keys), len(snapshots)), np.nan)
    for step, s in enumerate(snapshots):
        for row, key in enumerate(keys):
            grid[row, step] = s.get(key, np.nan)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), height_ratios=[3, 1.2], sharex=True)
    cmap = matplotlib.colors.ListedColormap(["#2b8cbe", "#fdae61", "#d7191c"])
    top.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=2.5)
    top.set_ylabel("block (layer-major: layer 0's blocks first)")
    top.set_title(f"where each quant4 block lives: {T}-token prompt, {N} new tokens, device and host tiers "
                  f"25% of the final cache each", fontsize=10)
    counts = np.stack([(grid == level).sum(axis=0) for level in range(3)])  # (3, steps)
    bottom.stackplot(np.arange(len(snapshots)), counts, colors=cmap.colors, labels=["device", "host", "disk"])
    bottom.set_xlabel("decode step")
    bottom.set_ylabel("blocks")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"[figure] wrote {out}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help="run or checkpoint folder; default: random weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per comparison (median)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--block-tokens", type=int, default=32)
    parser.add_argument("--topk-blocks", type=int, default=8)
    parser.add_argument("--ppl-length", type=int, default=768)
    parser.add_argument("--ppl-windows", type=int, default=2)
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--figure-prompt", type=int, default=256)
    parser.add_argument("--figure-new-tokens", type=int, default=256)
    parser.add_argument("--spill-dir", default=tempfile.gettempdir(), help="where spill and prefix files go")
    parser.add_argument("--figure", default="docs/figures/memhier_tiers.png")
    parser.add_argument("--out", default="bench/results/memhier.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, val = load_model(args.ckpt)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(0))  # (B, T)
    probe = decode_run(model, prompt, MemhierSpec(), 4)  # warm-up (one-time setup unbilled), and bytes per token
    per_token = probe["kv_bytes"] / probe["tokens_seen"]
    cache_bytes = int(per_token * (args.prompt_len + args.new_tokens))
    decode_run(model, prompt, budgets(cache_bytes, 0.1, args), 4)  # warm-up of the tiered path
    print(f"model {model.config.to_dict()}, {'checkpoint ' + args.ckpt if args.ckpt else 'random weights'}; "
          f"quant4 cache of B={args.batch} x {args.prompt_len + args.new_tokens} tokens = {cache_bytes:,} bytes",
          flush=True)
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads},
              "model": model.config.to_dict(), "args": vars(args), "cache_bytes": cache_bytes}
    report["exact"] = section_budgets(model, prompt, args, "exact", cache_bytes)
    report["disk"] = section_disk(report["exact"]["10%"]["figures"], args)
    report["retrieval"] = section_budgets(model, prompt, args, "retrieval", cache_bytes)
    report["perplexity"] = section_perplexity(model, val, args)
    report["prefix"] = section_prefix(model, args)
    figure(model, args, per_token / args.batch, Path(args.figure))

    print(f"\n{'device tier':<12} {'exact tok/s':>11} {'vs off':>7} {'retrieval tok/s':>15} {'vs exact':>8}")
    for name in ["off", *(f"{f:.0%}" for f in FRACTIONS)]:
        e, r = report["exact"][name], report["retrieval"][name]
        print(f"{name:<12} {e['decode_tok_s']:>11.1f} {e['ratio_to_off']:>6.2f}x {r['decode_tok_s']:>15.1f} "
              f"{r['decode_tok_s'] / e['decode_tok_s']:>7.2f}x")
    ppl, disk, prefix = report["perplexity"], report["disk"], report["prefix"]
    print(f"perplexity   exact {ppl['exact']:.3f}   retrieval {ppl['retrieval']:.3f}")
    if disk:
        print(f"disk read    {disk['tier_gb_s']:.2f} GB/s in decoding = {disk['ratio_cold']:.0%} of a cold raw read "
              f"(target 70%: {verdict(disk['pass'])})")
    print(f"prefix       TTFT {prefix['ttft_cold_s']:.3f} s cold / {prefix['ttft_warm_s']:.3f} s warm = "
          f"{prefix['speedup']:.1f}x (target 3x: {verdict(prefix['pass'])})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
