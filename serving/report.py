"""What infer.py measures and how it reports it: KV bytes, compression, peak memory, a table, a JSON file.

The KV figures come from `ModelCache.figures()` (cache/model_cache.py), read after the run (DESIGN.md, Metrics):
kv_bytes (the storage bytes of every tensor the cache holds), kv_bytes_full_fp16 (what a full fp16 cache would
hold for the same tokens seen), their ratio, and bits per cached element (all overheads in the numerator).

Peak memory is the process's high-water mark: ru_maxrss on the CPU (weights, activations and the cache, plus the
Python runtime), torch.cuda.max_memory_allocated on a GPU (tensors only).
"""

import datetime
import json
import resource
import sys
from pathlib import Path

import torch


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """The high-water mark of memory use and how it was measured."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024, "ru_maxrss"  # bytes on macOS, KiB on Linux


# How each figure is shown: (JSON key, label, format).
ROWS = [
    ("prompt_tokens", "prompt tokens", "{:,}"),
    ("new_tokens", "new tokens", "{:,}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("prefill_tokens_per_s", "prefill tokens/s", "{:,.1f}"),
    ("decode_tokens_per_s", "decode tokens/s", "{:,.1f}"),
    ("decode_ms_per_token_median", "decode ms/token, median step", "{:.3f}"),
    ("decode_threads", "decode threads, at the end", "{:d}"),
    ("ppl_tokens_per_s", "scored tokens/s", "{:,.1f}"),
    # mode=tasks (serving/tasks.py, figures): mean score per task type, then per task (continue: log-likelihood)
    ("tasks_samples", "task samples", "{:,}"),
    ("tasks_samples_per_s", "task samples/s", "{:.2f}"),
    *[(f"tasks_type_{t}", f"score, {t} tasks", "{:.3f}") for t in ("retrieval", "tracking", "copy", "language")],
    *[(f"tasks_task_{t}", f"score, {t}", "{:.3f}") for t in ("passkey", "multikey", "vartrack", "recall", "continue")],
    # mode=serve (serving/serve.py, summary): the workload through the engine
    ("requests", "requests", "{:,}"),
    ("seconds", "seconds, first arrival to last token", "{:.2f}"),
    ("requests_per_s", "requests/s", "{:.2f}"),
    ("output_tokens", "output tokens", "{:,}"),
    ("output_tokens_per_s", "output tokens/s, end to end", "{:,.1f}"),
    *[(f"{key}_p{q}", f"{label}, p{q}", "{:.3f}") for key, label in
      (("ttft_s", "time to first token (s)"), ("tpot_s", "time per output token (s)"), ("latency_s", "latency (s)"))
      for q in (50, 90, 99)],
    ("mean_running_batch", "mean running batch", "{:.1f}"),
    ("peak_blocks", "peak blocks in use", "{:,}"),
    ("pool_blocks", "blocks in the pool", "{:,}"),
    ("peak_kv_bytes", "peak KV bytes", "{:,}"),
    ("preemptions", "preemptions", "{:,}"),
    ("blocks_evicted", "blocks evicted (KV-Compress budgets, evicting presets)", "{:,}"),
    ("prefill_steps", "prefill steps", "{:,}"),
    ("decode_steps", "decode steps", "{:,}"),
    ("tokens_seen", "tokens seen / sequence", "{:,}"),
    ("tokens_cached", "tokens cached / sequence", "{:,.1f}"),
    ("kv_bytes", "KV bytes held", "{:,}"),
    ("kv_pool_bytes", "KV block pool bytes (blocks held and free)", "{:,}"),
    ("kv_bytes_full_fp16", "KV bytes, full fp16 cache", "{:,}"),
    ("compression_ratio", "compression ratio", "{:.2f}x"),
    ("bits_per_element", "bits per cached element", "{:.2f}"),
    ("peak_memory_bytes", "peak memory (MiB)", "MiB"),
    # memhier=on (memhier/cache.py, TieredModelCache.figures): where the blocks are and what moved
    *[(f"memhier_{tier}_{what}", f"memhier {tier}: {label}", fmt) for tier in ("device", "host", "disk")
      for what, label, fmt in (("bytes", "bytes held", "{:,}"), ("hits", "hits", "{:,}"),
                               ("misses", "misses", "{:,}"))],
    ("memhier_blocks_promoted", "memhier blocks moved up", "{:,}"),
    ("memhier_blocks_demoted", "memhier blocks moved down", "{:,}"),
    ("memhier_blocks_dropped", "memhier blocks dropped (all evicted)", "{:,}"),
    ("memhier_disk_bytes_read", "memhier disk bytes read", "{:,}"),
    ("memhier_disk_bytes_written", "memhier disk bytes written", "{:,}"),
    ("memhier_move_seconds", "memhier seconds moving data", "{:.3f}"),
    ("memhier_prefetch_wait_seconds", "memhier seconds waiting for prefetch", "{:.3f}"),
    ("memhier_prefix_reused_blocks", "memhier prefix blocks reused", "{:,}"),
    ("memhier_prefill_tokens_skipped", "memhier prefill tokens skipped", "{:,}"),
    ("memhier_prefix_entries", "memhier prefix store entries", "{:,}"),
    # memhier.persist=true (memhier/persist.py, PrefixStore.stats): what the prefix store found and did this run
    ("memhier_prefix_hits", "memhier prefix store hits", "{:,}"),
    ("memhier_prefix_misses", "memhier prefix store misses", "{:,}"),
    ("memhier_prefix_bad", "memhier prefix bad entries (deleted, recomputed)", "{:,}"),
    ("memhier_prefix_written", "memhier prefix entries written", "{:,}"),
    ("memhier_prefix_evicted", "memhier prefix entries evicted", "{:,}"),
]


def format_table(columns: dict[str, dict]) -> str:
    """One row per figure present in any column, one column per batch: {header: figures} -> aligned text."""
    def show(value, fmt: str) -> str:
        if value is None:
            return "-"
        return f"{value / 2**20:,.1f}" if fmt == "MiB" else fmt.format(value)

    rows = [["", *columns]]
    rows += [[label, *(show(col.get(key), fmt) for col in columns.values())]
             for key, label, fmt in ROWS if any(key in col for col in columns.values())]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def write_report(run_dir: Path, mode: str, preset: str, report: dict) -> Path:
    """Write `report` to <run_dir>/infer/<timestamp>-<mode>-<preset>.json and return the path."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    path = Path(run_dir) / "infer" / f"{stamp}-{mode}-{preset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path
