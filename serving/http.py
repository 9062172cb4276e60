"""`python infer.py mode=http`: the engine behind an OpenAI-compatible HTTP endpoint (FastAPI + uvicorn).

    python infer.py mode=http serve.port=8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="tiny-mha", prompt="**HAMLET**  \\n", max_tokens=64, stop=["\\n\\n"],
                              extra_body={"max_cache_tokens": 96})   # kvlab's knobs travel in extra_body

Endpoints:
    POST /v1/completions   prompt (text or token ids), max_tokens, temperature, top_p, stop, seed, n=1, stream
                           (server-sent events, ending with `data: [DONE]`), and kvlab's own fields: cache,
                           max_cache_tokens, protected_window_size, compress_once (serving/kvcompress.py), top_k,
                           ignore_eos
    GET  /v1/models        the checkpoint served
    GET  /health           {"status": "ok"}
    GET  /metrics          Prometheus text: running, waiting, blocks in use, tokens out, tokens/s, preemptions

How it runs. One thread owns the engine (`EngineLoop`): it adds what the handlers submit, steps while there is
work, and after each step hands every request its tokens so far through a queue its handler awaits on uvicorn's
event loop. Requests that arrive together therefore share decode steps: the scheduler batches them as it batches
an offline workload. A client that goes away aborts its request, and its blocks are free before the next step.
Bad input gets a 400 in OpenAI's error shape naming the field; more than `max_queue` waiting requests, a 429.
"""

import asyncio
import json
import random
import re
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from serving.engine import Engine
from serving.generate import Sampling
from serving.sequence import Request

RATE_WINDOW_S = 10.0  # /metrics' tokens/s: over the last this many seconds


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions: OpenAI's fields that kvlab serves, then kvlab's. Any other field is an
    error (400), never silently ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)  # None: a fresh one per request
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict[str, bool] | None = None  # {"include_usage": true}: a last chunk with the usage
    top_k: int = Field(0, ge=0)  # kvlab: 0 is off
    ignore_eos: bool = False  # kvlab (vLLM's name): run to max_tokens past the end-of-text token (benchmarks)
    cache: str | None = None  # kvlab: a preset whose blocks are the engine's (serving/engine.py, Engine.add)
    max_cache_tokens: int | None = Field(None, ge=1)  # kvlab, KV-Compress: tokens per layer and KV head
    protected_window_size: int | None = Field(None, ge=0)
    compress_once: bool = True


@dataclass
class Handle:
    """A submitted request, as its handler sees it: updates (tokens so far, finish reason or None) arrive on
    `updates`, put there from the engine's thread."""

    id: int
    prompt_tokens: int
    updates: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    sent: int = 0  # tokens pushed so far

    def push(self, tokens: list[int], reason: str | None) -> int:
        """Hand over the tokens so far; returns how many are new."""
        new, self.sent = len(tokens) - self.sent, len(tokens)
        self.loop.call_soon_threadsafe(self.updates.put_nowait, (tokens, reason))
        return new


class Overloaded(Exception):
    """More requests are waiting than the server queues."""


@dataclass(eq=False)  # hashable by identity: prometheus_client registers it as a collector
class EngineLoop:
    """The engine's own thread: submit() and abort() from the handlers, step() in a loop while there is work."""

    engine: Engine
    max_queue: int = 256
    handles: dict[int, Handle] = field(default_factory=dict)
    tokens_out: int = 0
    finished: int = 0
    aborted: int = 0  # by their clients, gone before the end
    recent: deque = field(default_factory=deque)  # (time, tokens) of the steps in the last RATE_WINDOW_S

    def __post_init__(self) -> None:
        self.lock = threading.Lock()  # the engine is touched under it only
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Handle:
        """Queue a request; raises ValueError (a request the engine cannot serve) or Overloaded."""
        with self.lock:
            if len(self.engine.scheduler.waiting) >= self.max_queue:
                raise Overloaded(f"{self.max_queue} requests are waiting already (serve.max_queue); retry later")
            handle = Handle(self.engine.add(request), len(request.prompt), asyncio.Queue(), loop)
            self.handles[handle.id] = handle
        self.wake.set()
        return handle

    def abort(self, id: int) -> None:
        with self.lock:
            self.aborted += self.engine.abort(id)
            self.handles.pop(id, None)

    def stop(self) -> int:
        """End the thread and abort every request left (its handler gets finish reason "abort"); returns how many
        were aborted."""
        self.stopping = True
        self.wake.set()
        self.thread.join()
        with self.lock:
            aborted = len(self.handles)
            for id, handle in self.handles.items():
                self.engine.abort(id)
                handle.push([], "abort")
            self.handles.clear()
        return aborted

    def _run(self) -> None:
        while not self.stopping:
            with self.lock:
                busy = self.engine.has_work()
                if busy:
                    self._deliver(self.engine.step())
                else:
                    self.wake.clear()  # under the lock: a submit after this sets it again
            if not busy:
                self.wake.wait()

    def _deliver(self, done: list) -> None:
        """Every handle's tokens so far after a step: the finished ones with their reason, then forgotten."""
        live, new = self.engine.sequences(), 0
        for id, handle in self.handles.items():
            if id in live and len(live[id].output) > handle.sent:
                new += handle.push(list(live[id].output), None)
        for c in done:
            self.finished += 1
            handle = self.handles.pop(c.id, None)
            if handle is not None:
                new += handle.push(c.tokens, c.finish_reason)
        now = time.perf_counter()
        self.tokens_out += new
        self.recent.append((now, new))
        while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    def collect(self) -> list:
        """Prometheus metric families, read under the lock (a prometheus_client collector)."""
        with self.lock:
            s, pool, prefix = self.engine.scheduler, self.engine.pool, self.engine.prefix
            cached = prefix.reclaimable() if prefix else 0
            span = time.perf_counter() - self.recent[0][0] if len(self.recent) > 1 else 0.0
            rate = sum(n for _, n in self.recent) / span if span else 0.0
            values = [("kvlab_requests_running", "Sequences in the running batch", len(s.running)),
                      ("kvlab_requests_waiting", "Requests waiting for admission", len(s.waiting)),
                      ("kvlab_blocks_in_use", "Blocks of the KV pool requests hold", pool.blocks_in_use() - cached),
                      ("kvlab_blocks_cached", "Blocks only the prefix cache holds (reclaimed when needed)", cached),
                      ("kvlab_blocks_total", "Blocks of the KV pool", pool.n_blocks),
                      ("kvlab_output_tokens_per_second", f"Output tokens/s over the last {RATE_WINDOW_S:.0f} s",
                       rate)]
            counts = [("kvlab_output_tokens", "Output tokens", self.tokens_out),
                      ("kvlab_requests_finished", "Requests finished", self.finished),
                      ("kvlab_requests_aborted", "Requests their clients left before the end", self.aborted),
                      ("kvlab_preemptions", "Sequences preempted", self.engine.stats.preemptions),
                      ("kvlab_prefix_hit_tokens", "Prompt tokens whose prefill a prefix-cache hit skipped",
                       self.engine.stats.prefix_hit_tokens)]
        out = [GaugeMetricFamily(name, text, value=v) for name, text, v in values]
        return out + [CounterMetricFamily(name, text, value=v) for name, text, v in counts]


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    """OpenAI's error shape."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def named_field(message: str) -> str | None:
    """The field an engine error names first ("max_tokens=0: ...", "prompt: ...", "cache='x' ...")."""
    match = re.match(r"([a-z_]+)\b", message)
    return match.group(1) if match else None


@dataclass
class Renderer:
    """Tokens to the text a client sees: the end-of-text id and a stop string left out, and while the request runs,
    held back what may still change (a partial UTF-8 character, a tail that may begin a stop string)."""

    decode: Callable[[list[int]], str]
    stops: tuple[str, ...]
    eot_id: int

    def __call__(self, tokens: list[int], reason: str | None) -> str:
        if tokens and tokens[-1] == self.eot_id:
            tokens = tokens[:-1]
        text = self.decode(tokens)
        if reason is not None:
            ended = [s for s in self.stops if text.endswith(s)] if reason == "stop" else []
            return text[: len(text) - len(ended[0])] if ended else text
        text = text.rstrip("\ufffd")
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold]


def make_app(loop: EngineLoop, model_name: str, encode: Callable[[str], list[int]],
             decode: Callable[[list[int]], str], eot_id: int) -> FastAPI:
    """The FastAPI app over a (not yet started) EngineLoop: it starts with the server and stops with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop.thread.start()
        yield
        print(f"server stopped; {loop.stop()} requests aborted", flush=True)

    app = FastAPI(title="kvlab", lifespan=lifespan)
    registry = CollectorRegistry()
    registry.register(loop)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        hint = "; kvlab's extra fields: see GET /docs" if first["type"] == "extra_forbidden" else ""
        return error(400, f"{param}: {first['msg']}{hint}", param)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "kvlab"}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest) -> Response:
        if body.model is not None and body.model != model_name:
            return error(404, f"model: {body.model!r} is not served here; GET /v1/models lists {model_name!r}",
                         "model", "not_found_error")
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        prompt = encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        seed = random.randrange(2**31) if body.seed is None else body.seed
        try:
            request = Request(prompt, body.max_tokens, Sampling(body.temperature, body.top_k, body.top_p, seed),
                              stop_ids=() if body.ignore_eos else (eot_id,), stop=stops, cache=body.cache,
                              max_cache_tokens=body.max_cache_tokens, compress_once=body.compress_once,
                              protected_window_size=body.protected_window_size)
            handle = loop.submit(request, asyncio.get_running_loop())
        except ValueError as e:
            return error(400, str(e), named_field(str(e)))
        except Overloaded as e:
            return error(429, str(e), kind="rate_limit_error")
        render = Renderer(decode, stops, eot_id)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.get("include_usage"))
            return StreamingResponse(stream(loop, handle, render, head, usage), media_type="text/event-stream")
        tokens, reason = await finish(loop, handle, http)
        if reason is None:
            return Response(status_code=499)  # the client went away
        if reason == "abort":
            return error(503, "the server is shutting down: the request was aborted", kind="server_error")
        choice = {"text": render(tokens, reason), "index": 0, "logprobs": None, "finish_reason": reason}
        return JSONResponse({**head, "choices": [choice], "usage": usage_of(handle, tokens)})

    return app


def usage_of(handle: Handle, tokens: list[int]) -> dict:
    return {"prompt_tokens": handle.prompt_tokens, "completion_tokens": len(tokens),
            "total_tokens": handle.prompt_tokens + len(tokens)}


async def finish(loop: EngineLoop, handle: Handle, http: HttpRequest) -> tuple[list[int], str | None]:
    """Wait for the request's last update; abort it if the client disconnects first (reason None)."""
    while True:
        try:
            tokens, reason = await asyncio.wait_for(handle.updates.get(), timeout=0.5)
        except asyncio.TimeoutError:
            tokens, reason = [], None
        if reason is not None:
            return tokens, reason
        if await http.is_disconnected():
            loop.abort(handle.id)
            return tokens, None


async def stream(loop: EngineLoop, handle: Handle, render: Renderer, head: dict, usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: the new text of every step, the finish reason on the last,
    then `data: [DONE]`. A client that goes away cancels this generator, which aborts the request."""
    sent, done = "", False
    try:
        while not done:
            tokens, reason = await handle.updates.get()
            done = reason is not None
            text = render(tokens, reason)
            delta = text[len(sent) :] if text.startswith(sent) else ""
            if delta or done:
                choice = {"text": delta, "index": 0, "logprobs": None, "finish_reason": reason}
                yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
            sent = text
        if usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage_of(handle, tokens)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            loop.abort(handle.id)
