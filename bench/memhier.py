"""What the tiered KV store (memhier/) costs and buys, in one run: budgets, disk bandwidth, retrieval, prefix reuse.

    python -m bench.memhier                          # random weights of the tiny model's shape
    python -m bench.memhier --ckpt toymodel/pretrained/tiny-mha     # perplexity of held-out plays: a trained model
    python -m bench.memhier --sections disk     # one section (or several) alone

Every run uses cache=quant4 (4-bit blocks move as 4-bit bytes) in blocks of --block-tokens tokens (memhier=off too),
which exact mode moves in groups of at most --group-bytes (blocks a layer allocated together). Sections,
each printed with PASS / MISS against its target where it has one:

    budgets    exact-mode decode tokens/s with the device tier holding 100%, 50%, 25%, 10% of the final cache's
               bytes; half of the rest fits the host tier, the remainder spills to disk. memhier=off is
               the reference (ratio 1.00). Decode tokens/s = B * (new tokens - 1) / decode seconds, prefill
               excluded (serving.generate times the two phases). Every step reads every block, so a small
               device tier cycles blocks through host and disk (LRU on a cyclic scan: the worst case).
    disk       the disk tier's read bandwidth inside the 10% run: bytes read from spill files / wall seconds
               inside DiskTier.read (open, read, close, checksum, and any wait for the CPU or the GIL), with the
               reads on the decoding thread (memhier.prefetch=false) and on the prefetch thread (the default),
               against a raw sequential read (1 MiB reads, no check) of the same number of bytes, cold (written,
               fsynced, dropped from the page cache with posix_fadvise DONTNEED) and warm (read again). Target:
               the decoding-thread reads >= 70% of the cold read: both sides then run alone, while prefetch
               reads share two cores with the model's threads. Each side also reports the bytes it made the
               kernel fetch from the device (/proc/self/io, Linux): spill files are read moments after they are
               written, so the tier's reads are page-cache hits; the cold raw read is the disk it stands for.
               Measured again at the other --disk-group-bytes: a read's fixed cost (a file to open and close,
               Python) against its bytes (copy, checksum).
    retrieval  memhier.mode=retrieval (sinks + local window + top-k blocks) against exact: perplexity of
               held-out text fed one token at a time through the cache (random weights: random ids), and decode
               tokens/s at the same budgets as above.
    prefix     time to first token (prefill + first sample) of a --prefix-len prompt: a warm persistent prefix
               store (written by the cold run just before, same prompt) against a cold prefill into an empty
               store, alternating, median of --repeats. Target: warm >= 3x faster.
    figure     where the blocks live (device / host / disk) at every step of one generation, drawn to
               docs/figures/memhier_tiers.png.

--sections picks some (default: all). Numbers go to bench/results/memhier.json; a run of some sections replaces
only theirs, and "runs" records the machine and arguments behind each section. Timings are medians of --repeats
runs that alternate between the sides compared, so a machine that slows down mid-run slows both alike.
"""

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import alternate, load_model, machine, medians, verdict, write_json
from cache.presets import PRESETS, CacheSpec
from corpus.windows import evenly_spaced_windows
from memhier.cache import MemhierSpec, make_cache
from memhier.persist import weights_digest
from memhier.tiers import DiskTier
from toymodel.config import ModelConfig
from toymodel.decode_layout import pack_for_decode
from serving.generate import Sampling, generate, perplexity_through_cache
from toymodel.model import Transformer

GREEDY = Sampling(temperature=0.0)
FRACTIONS = (1.0, 0.5, 0.25, 0.1)
SECTIONS = ("budgets", "disk", "retrieval", "prefix", "figure")
CPU = torch.device("cpu")


def budgets(cache_bytes: int, fraction: float, args) -> MemhierSpec:
    """Device tier = fraction of the cache, host = half of the rest, disk = everything else (the spill dir)."""
    device = int(fraction * cache_bytes)
    return MemhierSpec(enabled=True, group_bytes=args.group_bytes, device_bytes=device,
                       host_bytes=(cache_bytes - device) // 2, spill_dir=args.spill_dir)


def preset(args) -> CacheSpec:
    """quant4 in blocks of --block-tokens, memhier=off too (the pool's blocks are the tiers')."""
    return dataclasses.replace(PRESETS["quant4"], block_tokens=args.block_tokens)


def decode_run(model: Transformer, prompt: torch.Tensor, spec: MemhierSpec, cache_spec: CacheSpec, new_tokens: int,
               on_token=None) -> dict:
    """One generation through a fresh cache -> decode tokens/s and the cache's figures (its spill dir removed)."""
    cache = make_cache(cache_spec, spec, model.config, prompt.shape[0], CPU, torch.float32)
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
    sides = {"off": lambda: decode_run(model, prompt, MemhierSpec(), preset(args), args.new_tokens)}
    for f in FRACTIONS:
        spec = dataclasses.replace(budgets(cache_bytes, f, args), mode=mode, topk_blocks=args.topk_blocks)
        sides[f"{f:.0%}"] = lambda spec=spec: decode_run(model, prompt, spec, preset(args), args.new_tokens)
    runs = alternate(args.repeats, sides)
    off = statistics.median(r["decode_tok_s"] for r in runs["off"])
    rows = {}
    for name, rs in runs.items():
        tok_s = statistics.median(r["decode_tok_s"] for r in rs)
        rows[name] = {"decode_tok_s": tok_s, "ratio_to_off": tok_s / off, "figures": rs[-1]}
        print(f"[{mode}] device tier {name:>4}: {tok_s:7.1f} decode tok/s ({tok_s / off:.2f}x memhier=off)", flush=True)
    return rows


def device_read_bytes() -> int:
    """Bytes this process has made the kernel fetch from storage devices so far (Linux /proc/self/io, every
    thread); page-cache hits do not count, so a difference says how much of a read really came from the disk."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["read_bytes"])


def raw_read(path: Path, nbytes: int, cold: bool) -> dict:
    """Read `nbytes` of `path` sequentially in 1 MiB reads; cold: dropped from the page cache first."""
    with open(path, "rb") as f:
        if cold:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages (fsynced): really dropped
        buf = bytearray(1 << 20)
        device, start, done = device_read_bytes(), time.perf_counter(), 0
        while done < nbytes:
            done += f.readinto(buf) or nbytes  # a short file ends the loop
        seconds = time.perf_counter() - start
    return {"gb_s": nbytes / seconds / 1e9, "device_bytes": device_read_bytes() - device}


def tier_read(model, prompt, spec: MemhierSpec, args) -> dict:
    """One decode run -> what its disk tier read: bytes, reads, GB/s and microseconds per read inside
    DiskTier.read, and the bytes the process fetched from the device meanwhile."""
    device = device_read_bytes()
    run = decode_run(model, prompt, spec, preset(args), args.new_tokens)
    nbytes, seconds, reads = run["memhier_disk_bytes_read"], run["disk_read_seconds"], run["memhier_disk_hits"]
    return {"bytes": nbytes, "reads": reads, "gb_s": nbytes / seconds / 1e9, "us_per_read": 1e6 * seconds / reads,
            "device_bytes": device_read_bytes() - device}


def disk_bandwidth(model, prompt, args, spec: MemhierSpec) -> dict:
    """The disk tier's read bandwidth in one configuration, reads on the decoding thread and on the prefetch thread,
    against raw cold and warm sequential reads of the same number of bytes, in alternating rounds; medians."""
    on_caller = dataclasses.replace(spec, prefetch=False)
    run = decode_run(model, prompt, on_caller, preset(args), args.new_tokens)
    nbytes = run["memhier_disk_bytes_read"]  # the same each run
    if nbytes == 0:
        raise ValueError("the 10% run read nothing from disk: raise --new-tokens or lower the budgets")
    with tempfile.NamedTemporaryFile(dir=args.spill_dir) as f:  # on the spill tier's file system
        f.write(os.urandom(nbytes))
        f.flush()
        os.fsync(f.fileno())
        runs = alternate(args.repeats, {
            "decoding_thread": lambda: tier_read(model, prompt, on_caller, args),
            "prefetch_thread": lambda: tier_read(model, prompt, spec, args),  # memhier.prefetch=true, the default
            "raw": lambda: {"cold": raw_read(Path(f.name), nbytes, cold=True),
                            "warm": raw_read(Path(f.name), nbytes, cold=False)},
        })
    caller, prefetch = medians(runs["decoding_thread"]), medians(runs["prefetch_thread"])
    cold, warm = medians([r["cold"] for r in runs["raw"]]), medians([r["warm"] for r in runs["raw"]])
    return {"bytes": nbytes, "block_file_bytes": nbytes / caller["reads"], "decoding_thread": caller,
            "prefetch_thread": prefetch, "raw_cold": cold, "raw_warm": warm,
            "ratio_cold": caller["gb_s"] / cold["gb_s"], "ratio_cold_prefetch": prefetch["gb_s"] / cold["gb_s"],
            "ratio_warm": caller["gb_s"] / warm["gb_s"], "rounds": runs}


def section_disk(model, prompt, args, cache_bytes: int) -> dict:
    """Disk tier bandwidth in the 10% exact run at --group-bytes (judged against the target) and at the other
    --disk-group-bytes, which show what a read's fixed cost (a file to open, Python) weighs against its bytes."""
    rows, mib = {}, 2**20
    for group in sorted({args.group_bytes, *args.disk_group_bytes}):
        spec = dataclasses.replace(budgets(cache_bytes, 0.1, args), group_bytes=group)
        row = disk_bandwidth(model, prompt, args, spec)
        caller, prefetch, cold, warm = row["decoding_thread"], row["prefetch_thread"], row["raw_cold"], row["raw_warm"]
        print(f"[disk] groups of at most {group // 1024} KiB: {row['bytes'] / mib:.1f} MiB read from spill files in "
              f"{caller['reads']:.0f} reads of {row['block_file_bytes'] / 1e3:.0f} KB, "
              f"{caller['device_bytes'] / mib:.1f} MiB of it from the device (the rest page-cache hits)", flush=True)
        for name, side in (("decoding thread", caller), ("prefetch thread", prefetch)):
            print(f"[disk]   tier, reads on the {name}: {side['gb_s']:.2f} GB/s, {side['us_per_read']:.1f} us per "
                  f"read = {side['gb_s'] / cold['gb_s']:.0%} of the cold raw read", flush=True)
        print(f"[disk]   raw sequential read of the same bytes: {cold['gb_s']:.2f} GB/s cold ("
              f"{cold['device_bytes'] / mib:.1f} MiB from the device), {warm['gb_s']:.2f} GB/s warm", flush=True)
        rows[group] = row
    judged = rows[args.group_bytes]
    ok, words = verdict(judged["ratio_cold"], 0.7, percent=True)
    print(f"[disk] in groups of at most {args.group_bytes // 1024} KiB, decoding-thread reads = "
          f"{judged['ratio_cold']:.0%} of the cold raw read ({words})", flush=True)
    return {"group_bytes": args.group_bytes, "target": 0.7, "pass": ok, "ratio_cold": judged["ratio_cold"],
            "by_group_bytes": rows}


def section_perplexity(model, val: np.ndarray | None, args) -> dict:
    n, W = args.ppl_length, args.ppl_windows
    if val is None:
        ids = torch.randint(0, model.config.vocab_size, (W, n + 1), generator=torch.Generator().manual_seed(1))
    else:
        ids = evenly_spaced_windows(val, W, n, "--ppl-length")  # (W, n + 1)
    out = {}
    for mode in ("exact", "retrieval"):
        spec = MemhierSpec(enabled=True, device_bytes=2**40, mode=mode, topk_blocks=args.topk_blocks,
                           spill_dir=args.spill_dir)
        cache = make_cache(preset(args), spec, model.config, W, CPU, torch.float32)
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
        spec = MemhierSpec(enabled=True, device_bytes=2**40, persist=True,
                           persist_dir=str(root / f"round-{r}"), spill_dir=args.spill_dir)
        for side in ("cold", "warm"):  # cold fills the empty store the warm run then reuses
            cache = make_cache(preset(args), spec, model.config, 1, CPU, torch.float32, model_id)
            g = generate(model, prompt, cache, 2, GREEDY, prefill=cache.prefill)
            ttft[side].append(g.prefill_seconds)
            reused = cache.reused_blocks
            cache.close()
    cold, warm = statistics.median(ttft["cold"]), statistics.median(ttft["warm"])
    ok, words = verdict(cold / warm, 3.0)
    print(f"[prefix] {args.prefix_len}-token prompt: time to first token {1e3 * cold:.0f} ms cold, {1e3 * warm:.0f} ms "
          f"with a warm store ({reused} blocks reused) = {cold / warm:.1f}x ({words})", flush=True)
    return {"ttft_cold_s": cold, "ttft_warm_s": warm, "speedup": cold / warm, "reused_blocks": reused,
            "ttft_all": ttft, "target": 3.0, "pass": ok}


def figure(model, args, cache_bytes_per_token: float, out: Path) -> None:
    """Tier of every group of blocks at every step of one generation (device 25%, host 25% of the final cache)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T, N = args.figure_prompt, args.figure_new_tokens
    prompt = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(3))
    final = int(cache_bytes_per_token * (T + N))
    spec = MemhierSpec(enabled=True, group_bytes=args.group_bytes,
                       device_bytes=final // 4, host_bytes=final // 4, spill_dir=args.spill_dir)
    snapshots = []  # per step: {key: tier level}

    def snapshot(cache) -> None:
        snapshots.append({key: level for level, tier in enumerate(cache.store.tiers)
                          for key in tier.blocks})

    decode_run(model, prompt, spec, preset(args), N, on_token=snapshot)
    keys = sorted({k for s in snapshots for k in s})  # (group,), in the order the layers allocated them
    grid = np.full((len(keys), len(snapshots)), np.nan)
    for step, s in enumerate(snapshots):
        for row, key in enumerate(keys):
            grid[row, step] = s.get(key, np.nan)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), height_ratios=[3, 1.2], sharex=True)
    cmap = matplotlib.colors.ListedColormap(["#2b8cbe", "#fdae61", "#d7191c"])
    top.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=2.5)
    top.set_ylabel("group of blocks (oldest first)")
    top.set_title(f"where each group of quant4 blocks lives: {T}-token prompt, {N} new tokens, device and host "
                  f"tiers 25% of the final cache each", fontsize=9)
    counts = np.stack([(grid == level).sum(axis=0) for level in range(3)])  # (3, steps)
    bottom.stackplot(np.arange(len(snapshots)), counts, colors=cmap.colors, labels=["device", "host", "disk"])
    bottom.set_xlabel("decode step")
    bottom.set_ylabel("groups")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"[figure] wrote {out}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memhier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help="run or checkpoint folder; default: random weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per comparison (median)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--block-tokens", type=int, default=64)
    parser.add_argument("--group-bytes", type=int, default=64 * 1024,
                        help="exact mode: the most bytes the tiers move as one group (one disk file)")
    parser.add_argument("--disk-group-bytes", type=int, nargs="+", default=[16 * 1024, 256 * 1024],
                        help="disk section: other group sizes measured beside --group-bytes")
    parser.add_argument("--topk-blocks", type=int, default=8)
    parser.add_argument("--ppl-length", type=int, default=768)
    parser.add_argument("--ppl-windows", type=int, default=2)
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--figure-prompt", type=int, default=256)
    parser.add_argument("--figure-new-tokens", type=int, default=256)
    parser.add_argument("--spill-dir", default=tempfile.gettempdir(), help="where spill and prefix files go")
    parser.add_argument("--figure", default="docs/figures/memhier_tiers.png")
    parser.add_argument("--out", default="bench/results/memhier.json")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections (default: all); the others of --out are left as they are")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, val = load_model(args.ckpt, ModelConfig())  # random weights: the tiny model's shape
    pack_for_decode(model)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(0))  # (B, T)
    probe = decode_run(model, prompt, MemhierSpec(), preset(args), 4)  # warm-up (setup unbilled), bytes per token
    per_token = probe["kv_bytes"] / probe["tokens_seen"]
    cache_bytes = int(per_token * (args.prompt_len + args.new_tokens))
    decode_run(model, prompt, budgets(cache_bytes, 0.1, args), preset(args), 4)  # warm-up of the tiered path
    print(f"model {model.config.to_dict()}, {'checkpoint ' + args.ckpt if args.ckpt else 'random weights'}; "
          f"quant4 cache of B={args.batch} x {args.prompt_len + args.new_tokens} tokens = {cache_bytes:,} bytes",
          flush=True)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() and set(args.sections) != set(SECTIONS) else {}
    run = {"machine": machine(), "model": model.config.to_dict(), "args": vars(args), "cache_bytes": cache_bytes}
    report.setdefault("runs", {}).update({section: run for section in args.sections})
    if "budgets" in args.sections:
        report["exact"] = section_budgets(model, prompt, args, "exact", cache_bytes)
    if "disk" in args.sections:
        report["disk"] = section_disk(model, prompt, args, cache_bytes)
    if "retrieval" in args.sections:
        report["retrieval"] = section_budgets(model, prompt, args, "retrieval", cache_bytes)
        report["perplexity"] = section_perplexity(model, val, args)
    if "prefix" in args.sections:
        report["prefix"] = section_prefix(model, args)
    if "figure" in args.sections:
        figure(model, args, per_token / args.batch, Path(args.figure))
    summary(report, args.sections)
    write_json(out, report)


def summary(report: dict, sections: list[str]) -> None:
    """The closing table of what this run measured."""
    if "budgets" in sections and "retrieval" in sections:
        print(f"\n{'device tier':<12} {'exact tok/s':>11} {'vs off':>7} {'retrieval tok/s':>15} {'vs exact':>8}")
        print(f"{'off':<12} {report['exact']['off']['decode_tok_s']:>11.1f}   1.00x   (memhier=off, measured again "
              f"in the retrieval section: {report['retrieval']['off']['decode_tok_s']:.1f})")
        for name in (f"{f:.0%}" for f in FRACTIONS):
            e, r = report["exact"][name], report["retrieval"][name]
            print(f"{name:<12} {e['decode_tok_s']:>11.1f} {e['ratio_to_off']:>6.2f}x {r['decode_tok_s']:>15.1f} "
                  f"{r['decode_tok_s'] / e['decode_tok_s']:>7.2f}x")
    if "retrieval" in sections:
        ppl = report["perplexity"]
        print(f"perplexity   exact {ppl['exact']:.3f}   retrieval {ppl['retrieval']:.3f}")
    if "disk" in sections:
        for group, row in report["disk"]["by_group_bytes"].items():
            print(f"disk read    groups of {group // 1024:>3} KiB: {row['decoding_thread']['gb_s']:.2f} GB/s in "
                  f"decoding = {row['ratio_cold']:.0%} of a cold raw read ({row['ratio_cold_prefetch']:.0%} on the "
                  f"prefetch thread)")
        disk = report["disk"]
        print(f"disk target  {disk['ratio_cold']:.0%} in groups of {disk['group_bytes'] // 1024} KiB "
              f"({verdict(disk['ratio_cold'], disk['target'], percent=True)[1]})")
    if "prefix" in sections:
        prefix = report["prefix"]
        print(f"prefix       TTFT {prefix['ttft_cold_s']:.3f} s cold / {prefix['ttft_warm_s']:.3f} s warm = "
              f"{prefix['speedup']:.1f}x ({verdict(prefix['speedup'], prefix['target'])[1]})")


if __name__ == "__main__":
    main()
