"""The OpenAI-compatible endpoint (serving/http.py) as a client meets it: a real `python infer.py mode=http` process
on a free loopback port, driven by the official openai client. Every wait is bounded."""

import asyncio
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from serving.engine import Engine
from serving.http import EngineLoop, Overloaded, make_app
from serving.sequence import Request
from engine_checks import model  # tests/engine_checks.py

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-mha"  # the shipped checkpoint's name (ckpt=auto on a fresh clone)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(url: str, name: str) -> float:
    """A value of /metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "infer.py", "mode=http", f"serve.port={port}", "threads=1"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"the server did not answer /health within 120 s:\n{proc.stdout.read()}")
    yield url, port, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0, timeout=120)


def test_models_health_and_a_plain_completion(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.completions.create(model=MODEL, prompt="**HAMLET**  \n", max_tokens=12, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.choices[0].text
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_a_streamed_completion_is_the_plain_one_in_pieces(client):
    kwargs = dict(model=MODEL, prompt="**ROMEO**  \n", max_tokens=40, temperature=0, stop=["\n\n"])
    plain = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == plain.text
    assert chunks[-1].choices[0].finish_reason == plain.finish_reason
    assert "\n\n" not in plain.text  # a stop string is not part of the text


def test_concurrent_requests_with_their_own_budgets_get_the_tokens_they_get_alone(client):
    """32 requests (prompts of 20-120 token ids, KV-Compress budgets of 8-32 tokens or none, compressing once or
    while decoding), sent one at a time and then all at once: the same greedy text."""
    g = torch.Generator().manual_seed(0)
    bodies = []
    for i in range(32):
        prompt = torch.randint(0, 4000, (int(torch.randint(20, 121, (1,), generator=g)),), generator=g).tolist()
        knobs = {} if i % 4 == 0 else {"max_cache_tokens": 8 * (i % 4), "protected_window_size": 4,
                                       "compress_once": i % 3 != 0}
        bodies.append(dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body=knobs))
    alone = [client.completions.create(**b).choices[0].text for b in bodies]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda b: client.completions.create(**b).choices[0].text, bodies))
    assert together == alone


def test_requests_naming_evicting_presets_get_the_tokens_they_get_alone(client):
    """8 requests of 150-220 token ids, past the presets' budget of 128, naming sink, h2o, window or nothing: each
    evicting preset's requests run in a cohort of their own, and each gets the text it gets alone."""
    g = torch.Generator().manual_seed(1)
    bodies = []
    for i in range(8):
        prompt = torch.randint(0, 4000, (int(torch.randint(150, 221, (1,), generator=g)),), generator=g).tolist()
        knobs = {} if i % 4 == 0 else {"cache": ("sink", "h2o", "window")[i % 4 - 1]}
        bodies.append(dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body=knobs))
    alone = [client.completions.create(**b).choices[0].text for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: client.completions.create(**b).choices[0].text, bodies))
    assert together == alone


@pytest.mark.parametrize("kwargs, field", [
    ({"extra_body": {"nope": 1}}, "nope"),
    ({"extra_body": {"max_cache_tokens": -4}}, "max_cache_tokens"),
    ({"extra_body": {"cache": "fulll"}}, "cache"),
    ({"temperature": -1}, "temperature"),
    ({"extra_body": {"max_tokens": "many"}}, "max_tokens"),
    ({"prompt": list(range(300))}, "prompt"),  # longer than the model's 256-token context
])
def test_bad_fields_get_a_400_naming_the_field(client, kwargs, field):
    body = {"model": MODEL, "prompt": "**HAMLET**  \n", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**body)
    assert caught.value.status_code == 400 and caught.value.body["param"] == field
    assert field in caught.value.body["message"]


def test_a_client_that_disconnects_mid_stream_leaves_no_blocks_held(server, client):
    url = server[0]
    finished, aborted = metric(url, "kvlab_requests_finished_total"), metric(url, "kvlab_requests_aborted_total")
    # No end-of-text stop (greedy text may reach it within a few dozen tokens, before the server sees the client
    # go) and nearly the whole context to fill: 240 decode steps
    stream = client.completions.create(model=MODEL, prompt="**HAMLET**  \n", max_tokens=240, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    pieces = iter(stream)
    next(pieces), next(pieces)
    stream.close()
    deadline = time.monotonic() + 30
    while metric(url, "kvlab_blocks_in_use") or metric(url, "kvlab_requests_running"):
        assert time.monotonic() < deadline, "the aborted request still holds blocks after 30 s"
        time.sleep(0.1)
    assert (metric(url, "kvlab_requests_aborted_total"), metric(url, "kvlab_requests_finished_total")) == (
        aborted + 1, finished)  # dropped, not run to its end


def test_a_prefix_hit_skips_prefill_and_answers_as_cold(server, client):
    """The same 50-token prompt twice: the second skips its 3 full blocks' prefill (48 tokens, counted in
    /metrics) and gets the same text; a prompt that shares only the first 40 tokens skips 2 blocks."""
    url = server[0]
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 4000, (50,), generator=g).tolist()
    ask = lambda ids: client.completions.create(model=MODEL, prompt=ids, max_tokens=12,  # noqa: E731
                                                temperature=0).choices[0].text
    hits = metric(url, "kvlab_prefix_hit_tokens_total")
    cold = ask(prompt)
    assert ask(prompt) == cold and metric(url, "kvlab_prefix_hit_tokens_total") == hits + 48
    ask(prompt[:40] + torch.randint(0, 4000, (20,), generator=g).tolist())
    assert metric(url, "kvlab_prefix_hit_tokens_total") == hits + 48 + 32


def test_sigterm_stops_the_server_and_frees_its_port(server, client):
    """Last in the file: it stops the module's server, with a stream in flight, which ends cleanly."""
    url, port, proc = server
    stream = iter(client.completions.create(model=MODEL, prompt="**HAMLET**  \n", max_tokens=240, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    next(stream)
    proc.terminate()
    assert list(stream)[-1].choices[0].finish_reason in ("length", "abort")  # finished in the grace, or aborted
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    assert "server stopped; 0 requests aborted" in proc.stdout.read()
    with socket.socket() as s:  # a new server may listen there (as servers do, past connections in TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # raises if the port were still held
        s.listen()


def test_past_its_queue_the_server_answers_429():
    """Requests beyond max_queue waiting are refused in OpenAI's shape, not queued without end. In process: the
    app's engine thread is not started (no lifespan), so nothing leaves the queue."""
    loop = EngineLoop(Engine(model(), n_blocks=64), max_queue=2)
    events = asyncio.new_event_loop()
    try:
        for _ in range(2):
            loop.submit(Request([1, 2, 3], max_tokens=2), events)
        with pytest.raises(Overloaded, match="serve.max_queue"):
            loop.submit(Request([1, 2, 3], max_tokens=2), events)
        app = make_app(loop, "tiny", lambda text: [1, 2], lambda ids: "x" * len(ids), 96)
        answer = TestClient(app).post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})
        assert answer.status_code == 429 and answer.json()["error"]["type"] == "rate_limit_error"
    finally:
        events.close()
