"""Generate text, or measure perplexity, through a KV cache, and report what the cache cost.

    python infer.py                                        # continue "To be, or not to be" (Hamlet is held out)
    python infer.py cache=sink prompt="ROMEO:"             # stream a continuation, then a summary table
    python infer.py cache=h2o cache.budget=128 prompt_file=prompts.txt sampling.temperature=0
    python infer.py cache=sink cache.codec=int4 ckpt=runs/tiny-gqa logger=wandb
    python infer.py mode=ppl cache=kivi2 ppl.length=1024   # held-out plays, one token at a time through the cache
    python infer.py mode=tasks cache=sink tasks.names=[passkey] tasks.samples=4   # the task suite, a needle picture
    python infer.py cache=quant4 memhier=on prompt="ROMEO:" # the same 4-bit cache, its blocks in device/host/disk
    python infer.py --multirun cache=full,sink,minicache,quant4,gear4   # one report per preset, in one folder
    python infer.py --multirun mode=generate,ppl cache=full,quant4,gear4 # + perplexity; then python -m bench.compare
    python infer.py cache=quant4 memhier=on memhier.persist=true prompt_file=p.txt   # run twice: the 2nd reuses
    python infer.py mode=ppl cache=quant4 memhier=on memhier.mode=retrieval          # InfLLM-style block retrieval
    python infer.py mode=serve serve.requests=64 serve.rate=4   # a workload through the serving engine
    python infer.py mode=serve serve.max_cache_tokens=64        # ... each request with a KV-Compress budget
    python infer.py mode=http serve.port=8000                   # an OpenAI-compatible server (serving/http.py)

The checkpoint is `ckpt` (default runs/tiny-mha, what `python train.py` writes). A prompt_file holds one prompt per
line; they are decoded together as one ragged batch, each row at its own length (the block pool: every preset but
MiniCache's), else prompts of equal token length together, and each batch gets its own column in the summary.
Figures go to stdout, to <run>/infer/<timestamp>-<mode>-<preset>.json, and to W&B with logger=wandb. A --multirun
sweep writes its reports together instead, to runs/compare/<timestamp>/infer/ (hydra.sweep.dir in conf/infer.yaml),
where `python -m bench.compare runs/compare/<timestamp>` draws them side by side. A generate report holds each decode
step's seconds and the cache's bytes after it.

This file is the only inference code that knows Hydra: it merges the composed config into the dataclasses of
serving/config.py once and hands plain objects down (see docs/05_inference.md).
"""

import codecs
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import hydra
import torch
import uvicorn
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cache.presets import takes_ragged_batches
from memhier.cache import TieredModelCache, make_cache
from memhier.persist import weights_digest
from memhier.store import TierFullError
from memhier.tiers import BlockIntegrityError
from toymodel.checkpoint import (PRETRAINED, TRAINED, default_checkpoint, load_model_config, load_weights, read_meta,
                                 resolve_checkpoint, run_folder)
from toymodel.decode_layout import pack_for_decode
from serving.generate import generate, perplexity_through_cache
from toymodel.model import Transformer
from toymodel.allocator import keep_freed_memory
from toymodel.threads import ThreadGovernor, thread_policy
from corpus.tokenizer import EOT_ID, get_tokenizer
from corpus.splits import validation_tokens
from corpus.tasks import make_samples
from corpus.windows import evenly_spaced_windows
from serving.config import InferConfig
from serving.engine import Engine
from serving.http import EngineLoop, make_app
from serving.report import format_table, peak_memory_bytes, write_report
from serving.serve import arrival_times, make_workload, plot_latency_cdf, serve, summary
from serving.tasks import default_lengths, plot_needles, run_tasks
from serving.tasks import figures as task_figures
from tracking.logger import make_logger


# What a user can cause: a bad value, a path that is not what it should be, a full disk, memhier budgets too small
# for the blocks a run needs, a damaged spill file. One line on stderr and exit status 1, no traceback; anything
# else is a bug in kvlab, and its traceback is the report.
USER_ERRORS = (ValueError, OSError, ModuleNotFoundError, TierFullError, BlockIntegrityError)


def to_typed(cfg: DictConfig) -> InferConfig:
    """Check the composed config against the dataclass schema (types, and each number's declared range) and
    return the typed object; a bad key or value exits with one line naming it."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(InferConfig), cfg))
    except OmegaConfBaseException as e:
        line = str(e).splitlines()[0]  # the value and the type expected; the lines after it repeat the key
        raise SystemExit(f"invalid config: {e.full_key}: {line}" if e.full_key else f"invalid config: {line}")
    except ValueError as e:
        raise SystemExit(f"invalid config: {e}")


def load_model(cfg: InferConfig, device: torch.device) -> tuple[Transformer, Path, dict]:
    """The checkpoint's model in eval mode on `device`, its folder, and its config.json."""
    ckpt = resolve_checkpoint(default_checkpoint() if cfg.ckpt == "auto" else cfg.ckpt)
    if ckpt == PRETRAINED:
        print(f"ckpt=auto: no {TRAINED} yet (python train.py writes it), so the model shipped with kvlab: {ckpt}",
              file=sys.stderr)
    model = Transformer(load_model_config(ckpt), backend=cfg.backend)
    load_weights(model, ckpt)
    model = pack_for_decode(model.to(device=device, dtype=getattr(torch, cfg.dtype)).eval())
    return model, ckpt, read_meta(ckpt)


def read_prompts(cfg: InferConfig) -> list[str]:
    """The prompts to continue: the non-blank lines of `prompt_file` when one is given (it wins over `prompt`, which
    has a default: the opening of Hamlet's soliloquy, see serving/config.py), else `prompt`."""
    if cfg.prompt_file is not None:
        path = Path(cfg.prompt_file)
        if path.is_dir():
            raise IsADirectoryError(f"prompt_file={cfg.prompt_file} is a directory; give a text file, one prompt a "
                                    f"line")
        if not path.is_file():
            raise FileNotFoundError(f"prompt_file={cfg.prompt_file} does not exist; give a text file, one prompt "
                                    f"a line")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt_file={cfg.prompt_file} holds no prompt; write one prompt per line")
        return prompts
    if cfg.prompt is None:
        raise ValueError('no prompt: pass prompt="..." or prompt_file=<path> (one prompt per line)')
    if not cfg.prompt.strip():
        raise ValueError(f'prompt={cfg.prompt!r} is empty; pass some text, e.g. prompt="ROMEO:"')
    return [cfg.prompt]


def batches_by_length(ids: list[list[int]], ragged: bool) -> list[list[int]]:
    """Group prompt indices into batches: all of them in one ragged batch when the cache keeps a length per row
    (the block pool), else by token length (in order of first appearance), each group one (B, T) batch."""
    if ragged:
        return [list(range(len(ids)))]
    groups: dict[int, list[int]] = {}
    for i, seq in enumerate(ids):
        groups.setdefault(len(seq), []).append(i)
    return list(groups.values())


def right_padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of any lengths -> ids (B, T_max) padded with 0 on the right, and their lengths (B,)."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)  # (B, T)
    return ids, torch.tensor([len(r) for r in rows], device=device)


class TextStream:
    """An `on_token` callback that prints row 0's text as it comes; a character split across tokens waits whole."""

    def __init__(self, prompt: str) -> None:
        self.enc, self.utf8 = get_tokenizer(), codecs.getincrementaldecoder("utf-8")(errors="replace")
        print(prompt, end="", flush=True)

    def __call__(self, token: torch.Tensor) -> None:
        print(self.utf8.decode(self.enc.decode_single_token_bytes(int(token[0]))), end="", flush=True)


def run_generate(cfg: InferConfig, model: Transformer, device: torch.device, model_id: str | None,
                 threads: ThreadGovernor | None) -> tuple[dict[str, dict], list[str]]:
    """Decode every prompt, streaming when there is one. Returns the figures per batch and the texts, in order.
    model_id roots memhier's content addresses (memhier.persist); threads picks each decode step's thread count."""
    enc, config, dtype = get_tokenizer(), model.config, getattr(torch, cfg.dtype)
    prompts = read_prompts(cfg)
    ids = [enc.encode_ordinary(p) for p in prompts]
    limit = cfg.max_context or config.block_size
    for i, seq in enumerate(ids):
        if len(seq) > limit:
            raise ValueError(f"prompt {i + 1} has {len(seq)} tokens, more than max_context={limit} (default: the "
                             f"block_size the model was trained on); shorten it or raise max_context")
    texts, columns = [""] * len(prompts), {}
    new_cache = lambda B, T: make_cache(cfg.cache, cfg.memhier, config, B, device, dtype, model_id, cfg.backend,
                                        max_tokens=T + cfg.max_new_tokens)  # a block pool sized to the need
    # rows of any lengths in one batch: the block pool, memhier's included, but for persistent prefixes (an address
    # names a block of every row: the rows' prompts must be as long)
    one_batch = takes_ragged_batches(cfg.cache, config) and not (cfg.memhier.enabled and cfg.memhier.persist)
    for group in batches_by_length(ids, one_batch):
        prompt, lengths = right_padded([ids[i] for i in group], device)  # (B, T), (B,)
        ragged = bool((lengths != lengths[0]).any())
        # Warm up on a throwaway cache (one-time kernel setup would otherwise be billed to prefill), then measure.
        # The warm-up's plain forward stores no prefix, so a persistent store is only ever warmed by earlier runs.
        generate(model, prompt, new_cache(len(group), prompt.shape[1]), 2, cfg.sampling,
                 prompt_lengths=lengths if ragged else None)
        cache = new_cache(len(group), prompt.shape[1])
        stream = TextStream(prompts[0]) if len(prompts) == 1 else None
        persist = isinstance(cache, TieredModelCache) and cache.prefix is not None
        prefill = cache.prefill if persist else None  # memhier.persist: reuses stored prefixes
        gen = generate(model, prompt, cache, cfg.max_new_tokens, cfg.sampling, stream, prefill, record_steps=True,
                       threads=threads, prompt_lengths=lengths if ragged else None)
        for row, i in enumerate(group):
            texts[i] = enc.decode(ids[i] + gen.tokens[row].tolist())
            if stream is None:
                print(f"--- prompt {i + 1} ---\n{texts[i]}")
        T = f"{int(lengths.min())}-{prompt.shape[1]}" if ragged else prompt.shape[1]
        columns[f"B={len(group)}, T={T}"] = {
            "batch_size": len(group), "prompt_tokens": gen.prompt_tokens // len(group),  # a ragged batch: the mean
            "new_tokens": cfg.max_new_tokens,
            "prefill_seconds": gen.prefill_seconds, "decode_seconds": gen.decode_seconds,
            "prefill_tokens_per_s": gen.prefill_tokens_per_s, "decode_tokens_per_s": gen.decode_tokens_per_s,
            "decode_ms_per_token_median": 1e3 * statistics.median(gen.step_seconds) if gen.step_seconds else None,
            "decode_threads": torch.get_num_threads(),  # with threads=0: the governor's choice at the end
            **cache.figures(), "kv_bytes_by_tier": cache.memory_bytes(),
            "decode_step_seconds": gen.step_seconds, "kv_bytes_per_step": gen.kv_bytes,  # per token: bench.compare
        }
    print()
    return columns, texts


def run_ppl(cfg: InferConfig, model: Transformer, device: torch.device, meta: dict, model_id: str | None,
            threads: ThreadGovernor | None) -> dict[str, dict]:
    """Perplexity of `ppl.windows` evenly spaced held-out windows of `ppl.length` tokens, through the cache."""
    val = validation_tokens(meta.get("run", {}).get("data"))  # the checkpoint's held-out text
    n, B = cfg.ppl.length, cfg.ppl.windows
    ids = evenly_spaced_windows(val, B, n, "ppl.length").to(device)  # (B, n+1)
    cache = make_cache(cfg.cache, cfg.memhier, model.config, B, device, getattr(torch, cfg.dtype), model_id,
                       cfg.backend, max_tokens=n + 1)
    start = time.perf_counter()
    ppl = perplexity_through_cache(model, ids, cache, threads=threads)  # ends by reading the loss: device done
    seconds = time.perf_counter() - start
    return {f"B={B}, T={n}": {"batch_size": B, "perplexity": ppl, "seconds": seconds,
                              "ppl_tokens_per_s": B * n / seconds, **cache.figures(),
                              "kv_bytes_by_tier": cache.memory_bytes()}}


def run_task_suite(cfg: InferConfig, model: Transformer, device: torch.device, meta: dict, model_id: str | None,
                   threads: ThreadGovernor | None) -> tuple[dict[str, dict], list[dict]]:
    """The task suite on the checkpoint's held-out text through the cache: one column, and every sample's result."""
    limit = cfg.max_context or model.config.block_size
    samples = make_samples(get_tokenizer(), validation_tokens(meta.get("run", {}).get("data")), cfg.tasks.names,
                           cfg.tasks.lengths or default_lengths(limit), cfg.tasks.depths, cfg.tasks.samples,
                           cfg.tasks.seed, limit, cfg.tasks.key_digits)
    dtype = getattr(torch, cfg.dtype)
    new_cache = lambda B, T: make_cache(cfg.cache, cfg.memhier, model.config, B, device, dtype, model_id, cfg.backend,
                                        max_tokens=T)
    results, seconds = run_tasks(model, samples, new_cache, get_tokenizer(), cfg.tasks.batch_size, threads=threads)
    return {f"{len(samples)} samples": task_figures(results, seconds)}, results


def make_engine(cfg: InferConfig, model: Transformer, decode: Callable[[list[int]], str]) -> Engine:
    """The serving engine of mode=serve and mode=http: the cache preset, the serve group's sizes."""
    return Engine(model, cfg.cache, cfg.serve.kv_bytes, max_batch=cfg.serve.max_batch,
                  max_prefill_tokens=cfg.serve.max_prefill_tokens, decode=decode, max_context=cfg.max_context,
                  headroom=cfg.serve.headroom, prefix_caching=cfg.serve.prefix_caching)


def run_http(cfg: InferConfig, model: Transformer, ckpt: Path) -> None:
    """Serve the checkpoint over HTTP until SIGINT or SIGTERM (serving/http.py)."""
    if cfg.memhier.enabled:
        raise ValueError("mode=http keeps the cache in the engine's block pool; run it with memhier=off")
    enc = get_tokenizer()
    name = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name  # the run's folder
    loop = EngineLoop(make_engine(cfg, model, enc.decode), cfg.serve.max_queue)
    app = make_app(loop, name, enc.encode_ordinary, enc.decode, EOT_ID)
    print(f"serving {name} (cache={cfg.cache.name}) at http://{cfg.serve.host}:{cfg.serve.port}/v1; Ctrl-C stops",
          flush=True)
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning", timeout_graceful_shutdown=5)


def run_serve(cfg: InferConfig, model: Transformer, meta: dict) -> tuple[dict[str, dict], list[str], list[dict],
                                                                         list]:
    """The workload through the serving engine: one column of figures, the outputs, every request's record, and
    the completions (for the latency picture)."""
    if cfg.memhier.enabled:
        raise ValueError("mode=serve keeps the cache in the engine's block pool; run it with memhier=off")
    enc = get_tokenizer()
    engine = make_engine(cfg, model, enc.decode)
    held_out = lambda: enc.decode(validation_tokens(meta.get("run", {}).get("data")).tolist())  # noqa: E731
    requests = make_workload(cfg.serve, cfg.sampling, held_out, enc.encode_ordinary)
    done, seconds = serve(engine, requests, arrival_times(len(requests), cfg.serve.rate, cfg.serve.seed))
    texts = [enc.decode(c.tokens) for c in done]
    records = [{"id": i, "prompt_tokens": c.prompt_tokens, "output_tokens": len(c.tokens), "output": text,
                "finish_reason": c.finish_reason, "time_to_first_token_s": c.time_to_first_token,
                "time_per_output_token_s": c.time_per_output_token, "latency_s": c.latency,
                "preemptions": c.preemptions} for i, (c, text) in enumerate(zip(done, texts))]
    return {f"{len(done)} requests": summary(engine, done, seconds)}, texts, records, done


def report(cfg: InferConfig, columns: dict[str, dict], texts: list[str], ckpt: Path, device: torch.device,
           samples: list[dict] | None = None) -> Path:
    """The summary table on stdout, the JSON report under the checkpoint's run folder (with mode=tasks or serve
    every sample's or request's record; mode=tasks: the needle picture as a PNG beside it), and W&B with
    logger=wandb. Returns the report's path."""
    peak, how = peak_memory_bytes(device)
    for figures in columns.values():
        figures["peak_memory_bytes"] = peak
    print(format_table(columns))
    run_dir = run_folder(ckpt)
    plain = OmegaConf.to_container(OmegaConf.structured(cfg))
    record = {"config": plain, "checkpoint": str(ckpt), "device": str(device), "peak_memory_measure": how,
              "batches": list(columns.values()), "texts": texts, **({"samples": samples} if samples else {})}
    path = write_report(report_dir(run_dir), cfg.mode, cfg.cache.name, record)
    print(f"report: {path}")
    if samples and cfg.mode == "tasks":
        picture = plot_needles({cfg.cache.name: samples}, path.with_suffix(".png"), cfg.tasks.depths)
        print(f"needles: {picture or 'no picture (no passkey or multikey task in tasks.names)'}")
    logger = make_logger(cfg.logger.kind, cfg.logger.project, f"infer-{cfg.mode}-{cfg.cache.name}", run_dir, plain)
    for step, figures in enumerate(columns.values()):
        logger.log({f"infer/{k}": v for k, v in figures.items() if v is not None and not isinstance(v, list)},
                   step=step)
    logger.finish()
    return path


def report_dir(run_dir: Path) -> Path:
    """Where the JSON report goes: the run folder, or in a --multirun sweep the sweep's folder (hydra.sweep.dir), so
    that one sweep's reports lie together for bench.compare."""
    hydra_config = HydraConfig.get()
    return Path(hydra_config.runtime.output_dir) if hydra_config.mode == RunMode.MULTIRUN else run_dir


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="infer")
def main(cfg: DictConfig) -> None:
    typed = to_typed(cfg)
    if typed.keep_freed_memory:
        keep_freed_memory()  # before the first large tensor is made
    if typed.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("invalid config: device=cuda but no CUDA GPU is available; use device=auto or device=cpu")
    if typed.device == "auto":
        typed.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(typed.device)
    try:
        model, ckpt, meta = load_model(typed, device)
        if typed.mode == "http":
            return run_http(typed, model, ckpt)
        model_id = weights_digest(model) if typed.memhier.persist else None  # roots the prefix store's addresses
        samples, threads = None, thread_policy(typed.threads, device)
        if typed.mode == "generate":
            columns, texts = run_generate(typed, model, device, model_id, threads)
        elif typed.mode == "ppl":
            columns, texts = run_ppl(typed, model, device, meta, model_id, threads), []
        elif typed.mode == "tasks":
            (columns, samples), texts = run_task_suite(typed, model, device, meta, model_id, threads), []
        else:
            columns, texts, samples, done = run_serve(typed, model, meta)
        path = report(typed, columns, texts, ckpt, device, samples)
        if typed.mode == "serve":
            path.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples), encoding="utf-8")
            picture = plot_latency_cdf(done, path.with_suffix(".png"), f"mode=serve, cache={typed.cache.name}")
            print(f"requests: {path.with_suffix('.jsonl')}\nlatency CDF: {picture}")
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    sys.exit(main())
