"""The serving engine over HTTP next to the same engine in process, and prefix caching as a client sees it.

    python -m bench.serving --http [--requests 32] [--out bench/results/serving_http.json]

A server (`python infer.py mode=http`) runs in a process of its own on a free loopback port, over a checkpoint of
the bench model (its random weights, written to a temporary folder), with as many threads as this process. The
clients are this process's: one streaming request each (httpx), all sent at once, greedy, `ignore_eos` so every
request gets its max_tokens. Sides:

    offline        Engine.generate over bench.serving's workload in this process (32 requests, prompts of 128-512
                   tokens, 64-128 new tokens)
    http           the same requests over HTTP; time to first token: the first chunk of text a client receives
    shared, cold   bench.serving_prefix's workload (a 768-token beginning shared by every prompt) over HTTP, the
                   server started with serve.prefix_caching=false
    shared, cached the same, prefix caching on (the default)

Reported per side: wall seconds, requests/s, output tokens/s, time to first token (p50, p90); one round each.
"""

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.common import machine, seeded_model, write_json
from bench.decode import BENCH_MODEL
from serving.serve import random_workload as workload
from bench.serving_prefix import shared_workload
from serving.engine import Engine
from serving.sequence import Request
from serving.serve import percentiles
from toymodel.checkpoint import save_checkpoint
from toymodel.decode_layout import pack_for_decode

ROOT = Path(__file__).resolve().parents[1]


def figures(seconds: float, ttft: list[float], out_tokens: int, n: int) -> dict:
    return {"seconds": seconds, "requests_per_s": n / seconds, "output_tokens_per_s": out_tokens / seconds,
            **percentiles(ttft, "ttft_s")}


def offline(model, requests: list[Request]) -> dict:
    engine = Engine(model, "full", kv_bytes=512 * 2**20)
    start = time.perf_counter()
    done = engine.generate(requests)
    return figures(time.perf_counter() - start, [c.time_to_first_token for c in done],
                   sum(len(c.tokens) for c in done), len(done))


class Server:
    """`python infer.py mode=http` over checkpoint `ckpt` on a free port, until the with-block ends (SIGTERM)."""

    def __init__(self, ckpt: Path, *overrides: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.args = [sys.executable, "infer.py", "mode=http", f"ckpt={ckpt}", f"serve.port={self.port}",
                     f"threads={torch.get_num_threads()}", f"serve.kv_bytes={512 * 2**20}", *overrides]

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        url, deadline = f"http://127.0.0.1:{self.port}", time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return url
            except httpx.TransportError:
                time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"the server did not start: {self.proc.stderr.read()}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


async def one(client: httpx.AsyncClient, url: str, request: Request, start: float) -> tuple[float, int]:
    """Stream one request; returns its time to first text (from `start`) and its completion tokens."""
    body = {"prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else time.perf_counter() - start, tokens


def over_http(url: str, requests: list[Request]) -> dict:
    async def run() -> tuple[float, list[tuple[float, int]]]:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(requests))) as client:
            start = time.perf_counter()
            got = await asyncio.gather(*(one(client, url, r, start) for r in requests))
            return time.perf_counter() - start, got

    seconds, got = asyncio.run(run())
    return figures(seconds, [t for t, _ in got], sum(n for _, n in got), len(requests))


def main(requests: int, out: str) -> None:
    model = seeded_model(BENCH_MODEL).eval()
    plain = workload(requests, model.config.vocab_size)
    shared = shared_workload(requests, 768, model.config.vocab_size)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(Path(tmp), 0, model, model.config)
        packed = pack_for_decode(model)
        offline(packed, plain[:2])  # warm-up: kernels, allocator
        results["offline"] = offline(packed, plain)
        with Server(ckpt) as url:
            over_http(url, plain[:2])  # warm-up
            results["http"] = over_http(url, plain)
        with Server(ckpt, "serve.prefix_caching=false") as url:
            results["shared, cold"] = over_http(url, shared)
        with Server(ckpt) as url:
            results["shared, cached"] = over_http(url, shared)
    print(f"[http] {requests} concurrent streaming clients, server in its own process, "
          f"{torch.get_num_threads()} thread(s) each side")
    print(f"{'side':<16} {'seconds':>8} {'req/s':>6} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p90':>9}")
    for name, r in results.items():
        print(f"{name:<16} {r['seconds']:8.2f} {r['requests_per_s']:6.2f} {r['output_tokens_per_s']:9.0f} "
              f"{r['ttft_s_p50']:9.2f} {r['ttft_s_p90']:9.2f}")
    o, h = results["offline"], results["http"]
    c, w = results["shared, cold"], results["shared, cached"]
    print(f"[http] over HTTP: {h['output_tokens_per_s'] / o['output_tokens_per_s']:.2f}x the offline output "
          f"tokens/s; prefix caching over HTTP: time to first token p50 {c['ttft_s_p50'] / w['ttft_s_p50']:.2f}x "
          f"shorter, {w['output_tokens_per_s'] / c['output_tokens_per_s']:.2f}x the output tokens/s")
    write_json(out, {"machine": machine(), "model": model.config.to_dict(), "requests": requests,
                     "results": results})
