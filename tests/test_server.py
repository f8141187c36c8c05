"""`morph serve` over real HTTP: a real uvicorn server on a free port, the real model through
the real engine (1 thread), the official `openai` client for what clients do, raw httpx for
the error cases, subprocesses for signals, ports and the `llm` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from morph import store
from morph.engine.base import Request, collect
from morph.steering import profile
from morph.server.app import Server, create_app

CHAT = [{"role": "user", "content": "Write a short note to my boss saying I will be late today."}]
STORY = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


# --- a real server in this process -----------------------------------------------------------


class Served:
    """uvicorn serving a morph Server on a free loopback port, in a thread."""

    def __init__(self, server: Server):
        import uvicorn

        from morph.server.run import bind

        self.server = server
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(create_app(server), log_level="warning", access_log=False, lifespan="off")
        self.uv = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.uv.serve(sockets=[self.sock])), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uv.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=kw.pop("api_key", "none"), timeout=300,
                             max_retries=0, **kw)

    def stop(self):
        self.server.scheduler.stop_all()
        self.uv.should_exit = True
        self.thread.join(30)
        self.sock.close()
        self.server.close()


def _runtime(model_info, engine=None, threads=1):
    from morph.config import Config
    from morph.engine.llama import LlamaEngine
    from morph.runtime import Runtime
    from morph.steering.catalog import Catalog

    eng = engine or LlamaEngine(model_info, n_ctx=2048, threads=threads)
    return Runtime(Config(threads=threads, n_ctx=2048), model_info, eng, Catalog(model_info.model_id))


@pytest.fixture(scope="module")
def srv(model_info, threads):
    rt = _runtime(model_info, threads=threads)
    s = Served(Server(rt))
    yield s
    s.stop()
    rt.close()


@pytest.fixture(scope="module")
def client(srv):
    return srv.client()


def defaults_for(framing: str) -> dict:
    from morph import tasks

    return tasks.Defaults().sampling_for(framing)


def fresh(*engines) -> None:
    """Empty KV caches, so that the server and the direct call below compute alike (a
    prompt's last token evaluated alone after prefix reuse takes other kernels than in a
    batch; greedy text can then drift after a few dozen tokens)."""
    for e in engines:
        reset = getattr(e, "reset_cache", None)
        if reset is not None:
            reset()


def direct(engine, framing: str, **kw) -> str:
    """The same request as the server builds, run on the engine directly (fresh cache)."""
    fresh(engine)
    args = defaults_for(framing) | kw
    return collect(engine.stream(Request(**args))).text


def last_runs(n=1):
    with store.safe() as box:
        return [dict(r) for r in store.recent_runs(box[0], n)]


# --- endpoints -----------------------------------------------------------------------------


def test_models_features_health(srv, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    assert client.models.retrieve("smollm2").max_model_len == 2048
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    h = httpx.get(srv.base + "/health").json()
    assert h["status"] == "ok" and h["engine"] == "llama.cpp"
    feats = httpx.get(srv.base + "/v1/features").json()["data"]
    formal = {f["id"]: f for f in feats}["formal@sae"]
    assert formal["layer"] == 16 and formal["default_scale"] > 0 and "scores" in formal
    assert {f["name"] for f in feats} >= {"formal", "casual", "concise"}


def test_chat_whole_and_stream_equal_the_engine(srv, client, engine):
    fresh(srv.server.engine)
    r = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert text == direct(engine, "chat", messages=CHAT, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    n_prompt = len(engine.tokenize(engine.format_chat(CHAT), add_bos=False, special=True))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 24 and r.usage.total_tokens == n_prompt + 24
    assert r.choices[0].finish_reason == "length"

    fresh(srv.server.engine)
    chunks = list(client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])
    # Without include_usage, no usage chunk.
    plain = list(client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=5, temperature=0,
                                                stream=True))
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


def test_completions_whole_stream_echo_stop(srv, client, engine):
    fresh(srv.server.engine)
    r = client.completions.create(model="smollm2", prompt=STORY, max_tokens=16, temperature=0)
    text = r.choices[0].text
    assert text == direct(engine, "continue", prompt=STORY, max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.usage.prompt_tokens == len(engine.tokenize(STORY))
    fresh(srv.server.engine)
    streamed = list(client.completions.create(model="smollm2", prompt=STORY, max_tokens=16, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text
    fresh(srv.server.engine)
    echo = client.completions.create(model="smollm2", prompt=STORY, max_tokens=16, temperature=0, echo=True)
    assert echo.choices[0].text == STORY + text
    # OpenAI's default for completions is 16 tokens.
    assert client.completions.create(model="smollm2", prompt=STORY, temperature=0).usage.completion_tokens == 16
    # A stop string taken from the greedy text: cut there, finish_reason "stop".
    words = text.split()
    stop = words[len(words) // 2]
    fresh(srv.server.engine)
    cut = client.completions.create(model="smollm2", prompt=STORY, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_seed_temperature_top_p(client):
    def run(seed, **kw):
        return client.completions.create(model="smollm2", prompt=STORY, max_tokens=24, temperature=1.0,
                                         seed=seed, **kw).choices[0].text

    a, b, c = run(123), run(123), run(456)
    assert a == b and a != c
    # top_p near 0 keeps only the most likely token: greedy.
    greedy = client.completions.create(model="smollm2", prompt=STORY, max_tokens=24, temperature=0).choices[0].text
    assert run(7, top_p=1e-6) == greedy


def test_logit_bias_and_penalties(srv, client, engine):
    prompt = "The capital of France is"
    base = client.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0)
    first = engine.tokenize(base.choices[0].text, add_bos=False)[0]
    banned = client.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0,
                                       logit_bias={str(first): -100})
    assert engine.tokenize(banned.choices[0].text, add_bos=False)[0] != first
    forced_id = engine.tokenize(" banana", add_bos=False)[0]
    forced = client.completions.create(model="smollm2", prompt=prompt, max_tokens=3, temperature=0,
                                       logit_bias={str(forced_id): 100})
    assert forced.choices[0].text.startswith(" banana")

    loop = "one two one two one two one two one two"
    kw = dict(model="smollm2", prompt=loop, max_tokens=24, temperature=0, extra_body={"repetition_penalty": 1.0})
    plain = client.completions.create(**kw).choices[0].text
    fresh(srv.server.engine)
    pres = client.completions.create(presence_penalty=2.0, **kw).choices[0].text
    freq = client.completions.create(frequency_penalty=2.0, **kw).choices[0].text

    def repeats(t):
        ids = engine.tokenize(t, add_bos=False)
        return len(ids) - len(set(ids))

    assert repeats(pres) < repeats(plain) and repeats(freq) < repeats(plain)
    assert pres == direct(engine, "continue", prompt=loop, max_tokens=24, temperature=0, repeat_penalty=1.0,
                          presence_penalty=2.0)


# --- steering --------------------------------------------------------------------------------


def _resolve(model_info, features, experimental=True):
    from morph.steering.catalog import Catalog

    return profile.resolve(Catalog(model_info.model_id), model_info, features, experimental=experimental)


def test_steering_through_extra_body(srv, client, engine, model_info):
    plain = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0)
    fresh(srv.server.engine)
    r = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0,
                                       extra_body={"steering": {"features": {"formal": 0.3}, "experimental": True}})
    assert r.steering["features"] == _resolve(model_info, {"formal": 0.3}).profile and r.steering["mode"] == "residual"
    st = _resolve(model_info, {"formal": 0.3})
    want = direct(engine, "chat", messages=CHAT, max_tokens=24, temperature=0, steering=st.vector,
                  apply=r.steering["apply"])
    assert r.choices[0].message.content == want != plain.choices[0].message.content
    # The list form and a bare name (the feature's default scale) resolve the same way.
    bare = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4, temperature=0,
                                          extra_body={"steering": {"features": ["formal"], "experimental": True}})
    assert bare.steering["features"] == _resolve(model_info, ["formal"]).profile
    # Zero scale: exactly unsteered.
    zero = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0,
                                          extra_body={"steering": {"features": {"formal": 0}, "experimental": True}})
    assert zero.choices[0].message.content == plain.choices[0].message.content


def test_steering_apply_generated(srv, client, engine, model_info):
    body = {"steering": {"features": {"formal": 0.5}, "apply": "generated", "experimental": True}}
    fresh(srv.server.engine)
    r = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0, extra_body=body)
    assert r.steering["apply"] == "generated"
    st = _resolve(model_info, {"formal": 0.5})
    assert r.choices[0].message.content == direct(engine, "chat", messages=CHAT, max_tokens=24, temperature=0,
                                                  steering=st.vector, apply="generated")
    every = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0,
                                           extra_body={"steering": {"features": {"formal": 0.5}, "apply": "all", "experimental": True}})
    assert every.choices[0].message.content != r.choices[0].message.content


@pytest.fixture(scope="module")
def logit_steering(engine, model_info):
    from morph.steering.logits import LogitSteering

    return LogitSteering.for_engine(engine, model_info)


def test_logit_mode(srv, client, engine, model_info, logit_steering):
    body = {"steering": {"features": {"casual": 1.0}, "mode": "logits", "experimental": True}}
    fresh(srv.server.engine)
    r = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0, extra_body=body)
    assert r.steering == {"features": _resolve(model_info, {"casual": 1.0}).profile, "apply": "generated",
                          "mode": "logits"}
    bias = logit_steering.bias(_resolve(model_info, {"casual": 1.0}).vector)
    assert bias.shape == (model_info.n_vocab,) and np.isfinite(bias).all()
    want = direct(engine, "chat", messages=CHAT, max_tokens=24, temperature=0, logit_bias=bias)
    plain = direct(engine, "chat", messages=CHAT, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want != plain
    # Streaming in logit mode too; "all" makes no sense for a logit bias.
    fresh(srv.server.engine)
    chunks = list(client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, extra_body=body))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    bad = httpx.post(f"{client.base_url}chat/completions", json={
        "messages": CHAT, "steering": {"features": {"casual": 1.0}, "mode": "logits", "apply": "all", "experimental": True}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "steering.apply"


def test_logit_bias_moves_each_feature_its_way(engine, model_info, logit_steering):
    """The logit bias of a feature raises its own pole's wording over the other pole's on
    the held-out contrast pairs (the measure morph's diffmean build uses), by at least a
    tenth of the shift the feature's residual vector made there in the build (measured:
    formal 0.12, casual 0.39 of it; a bias at a hundredth of its scale: ~0.001)."""
    from morph import paths
    from morph.steering import diffmean as dm
    from morph.steering.catalog import Catalog

    ls = logit_steering
    cat = Catalog(model_info.model_id)
    r = dm.load_recipe(paths.recipes_dir() / "formality.json")
    test = dm.split_pairs(r)[1][:8]

    def shift(bias):
        return np.mean([engine.continuation_logprobs(dm.NEUTRAL_PROMPT, p["positive"], logit_bias=bias).mean()
                        - engine.continuation_logprobs(dm.NEUTRAL_PROMPT, p["negative"], logit_bias=bias).mean()
                        for p in test])

    base = shift(None)
    for pole, sign in r.poles:
        f = cat.get(pole["name"], experimental=True)
        steered = shift(ls.bias(f.load_vector() * 1.0))
        assert sign * (steered - base) > 0.1 * f.scores["style_shift_at_default"], (f.key, base, steered)


# --- errors ----------------------------------------------------------------------------------


def _err(resp, status, param=None):
    assert resp.status_code == status, resp.text
    e = resp.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["code"] == status and e["message"]
    if param is not None:
        assert e["param"] == param, e
    return e


def test_error_cases_and_the_server_stays_up(srv, client):
    url = srv.base + "/v1"
    chat, comp = url + "/chat/completions", url + "/completions"
    ok = {"messages": CHAT, "max_tokens": 2, "temperature": 0}
    assert _err(httpx.post(chat, content=b'{"messages": [', headers={"content-type": "application/json"}),
                400)["type"] == "BadRequestError"
    _err(httpx.post(chat, content=b""), 400)
    _err(httpx.post(chat, json=[1, 2]), 400)
    _err(httpx.post(chat, json=ok | {"temperature": "hot"}), 400, "temperature")
    _err(httpx.post(chat, json=ok | {"max_tokens": "10"}), 400, "max_tokens")
    _err(httpx.post(chat, json=ok | {"max_tokens": 0}), 400, "max_tokens")
    _err(httpx.post(chat, json=ok | {"top_p": 1.5}), 400, "top_p")
    _err(httpx.post(chat, json=ok | {"stream": "yes"}), 400, "stream")
    _err(httpx.post(chat, json=ok | {"stop": [1]}), 400, "stop")
    _err(httpx.post(chat, json=ok | {"logit_bias": {"x": 1}}), 400, "logit_bias")
    _err(httpx.post(chat, json=ok | {"logit_bias": {"999999": 1}}), 400, "logit_bias")
    _err(httpx.post(chat, json=ok | {"n": 2}), 400, "n")
    _err(httpx.post(chat, json=ok | {"logprobs": True}), 400, "logprobs")
    _err(httpx.post(chat, json=ok | {"stream_options": {"include_usage": True}}), 400, "stream_options")
    _err(httpx.post(chat, json={"messages": "hi"}), 400, "messages")
    _err(httpx.post(chat, json={"messages": [{"role": "robot", "content": "hi"}]}), 400, "messages[0].role")
    _err(httpx.post(chat, json={"messages": []}), 400, "messages")
    _err(httpx.post(comp, json={"prompt": ""}), 400, "prompt")
    _err(httpx.post(comp, json={"prompt": ["a", "b"]}), 400, "prompt")
    _err(httpx.post(comp, json={}), 400, "prompt")
    e = _err(httpx.post(chat, json=ok | {"model": "gpt-4"}), 404, "model")
    assert e["type"] == "NotFoundError"
    _err(httpx.post(chat, json=ok | {"steering": {"features": {"nope": 0.3}}}), 400, "steering.features")
    _err(httpx.post(chat, json=ok | {"steering": {"features": {"formal": 5}, "experimental": True}}), 400, "steering.features")
    _err(httpx.post(chat, json=ok | {"steering": {"features": {"formal": "strong"}, "experimental": True}}), 400, "steering.features")
    _err(httpx.post(chat, json=ok | {"steering": {"features": {"file:/etc/passwd": 1}}}), 400, "steering.features")
    # Experimental features (they fall short of morph's quality goal) only when asked for.
    experimental = [f["name"] for f in httpx.get(url + "/features").json()["data"]
                    if f["experimental"] and f["method"] == "sae"]
    if experimental:
        e = _err(httpx.post(chat, json=ok | {"steering": {"features": {experimental[0] + "@sae": 0.2}}}), 400,
                 "steering.features")
        assert "experimental" in e["message"]
    _err(httpx.post(chat, json=ok | {"steering": {"features": {"formal": 0.3}, "apply": "sometimes", "experimental": True}}), 400,
         "steering.apply")
    _err(httpx.post(chat, json=ok | {"steering": {"features": {"formal": 0.3}, "mode": "magic", "experimental": True}}), 400,
         "steering.mode")
    _err(httpx.post(chat, json=ok | {"steering": {"feature": {"formal": 0.3}}}), 400, "steering")
    # Context: 2048 tokens here.
    _err(httpx.post(chat, json=ok | {"max_tokens": 5000}), 400, "max_tokens")
    _err(httpx.post(comp, json={"prompt": "word " * 3000, "max_tokens": 4}), 400, "prompt")
    # Over the body limit: refused from the Content-Length header, and when streamed in chunks.
    big = b'{"prompt": "' + b"a" * (3 * 1024 * 1024) + b'"}'
    assert _err(httpx.post(comp, content=big, headers={"content-type": "application/json"}), 413)
    _err(httpx.post(comp, content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)])), 413)
    # Routes and methods.
    _err(httpx.get(url + "/nothing"), 404)
    _err(httpx.get(chat), 405)
    # Still serving.
    assert httpx.get(srv.base + "/health").status_code == 200
    assert client.chat.completions.create(model="smollm2", **ok).choices[0].message.content


def test_api_key(model_info, engine):
    rt = _runtime(model_info, engine)
    s = Served(Server(rt, api_key="sekrit", log=False))
    try:
        body = {"messages": CHAT, "max_tokens": 2}
        e = _err(httpx.post(s.base + "/v1/chat/completions", json=body), 401)
        assert e["type"] == "AuthenticationError"
        _err(httpx.post(s.base + "/v1/chat/completions", json=body, headers={"authorization": "Bearer nope"}), 401)
        _err(httpx.get(s.base + "/v1/models"), 401)
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert s.client(api_key="sekrit").chat.completions.create(model="smollm2", **body).choices
        assert httpx.get(s.base + "/health").status_code == 200  # liveness stays open
    finally:
        s.stop()


# --- concurrency, cancellation, logging ------------------------------------------------------


def _stream_text(client, features, seed, max_tokens=32, barrier=None):
    kw = dict(model="smollm2", messages=CHAT, max_tokens=max_tokens, temperature=0.8, seed=seed, stream=True)
    if features:
        kw["extra_body"] = {"steering": {"features": features, "experimental": True}}
    parts = []
    stream = client.chat.completions.create(**kw)
    for c in stream:
        if barrier is not None:
            barrier.wait()  # read one chunk each, in turn
            barrier = None
        if c.choices and c.choices[0].delta.content:
            parts.append(c.choices[0].delta.content)
    return "".join(parts)


def test_interleaved_clients_get_their_own_steering(srv, client):
    a_alone = _stream_text(client, {"formal": 0.4}, seed=11)
    b_alone = _stream_text(client, {"casual": 0.4}, seed=11)
    assert a_alone != b_alone
    out = {}
    barrier = threading.Barrier(2)

    def go(name, feats):
        out[name] = _stream_text(srv.client(), feats, seed=11, barrier=barrier)

    ts = [threading.Thread(target=go, args=("a", {"formal": 0.4})), threading.Thread(target=go, args=("b", {"casual": 0.4}))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    assert out == {"a": a_alone, "b": b_alone}


def test_engine_taking_concurrent_streams(model_info, engine):
    """An engine that serves several streams at once (vLLM) gets that many workers: here the
    llama engine is called from 3 workers (its own lock serialises them), and each request
    still gets exactly its own steering."""
    s = Served(Server(_runtime(model_info, engine), log=False, streams=3))
    try:
        feats = [{"formal": 0.4}, {"casual": 0.4}, None]
        alone = [_stream_text(s.client(), f, seed=5, max_tokens=16) for f in feats]
        out = [None] * 3
        ts = [threading.Thread(target=lambda i=i: out.__setitem__(i, _stream_text(s.client(), feats[i], seed=5,
                                                                                  max_tokens=16)))
              for i in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(300)
        assert out == alone and len(set(alone)) == 3
        assert len(s.server.scheduler._workers) == 3
    finally:
        s.stop()


class HeldWorker:
    """Holds the server's one engine worker with a job of the scheduler's own queue (a
    callable that waits for `release`), so that requests queue behind it in an order and
    for a time the test decides, however fast or slow the CPU."""

    def __init__(self, srv):
        self.srv = srv
        self.release = threading.Event()
        self.loop = asyncio.new_event_loop()  # the job's one event lands here; nobody reads it
        srv.server.scheduler.call(lambda: self.release.wait(600), self.loop)
        _health_until(srv, lambda h: h["running"] == 1 and h["queued"] == 0)

    def close(self):
        self.release.set()
        self.loop.close()


def _health_until(srv, cond, timeout=120) -> dict:
    """Poll /health until `cond(health)`; the timeout only ends a test whose server never gets there."""
    deadline = time.monotonic() + timeout
    while True:
        h = httpx.get(srv.base + "/health").json()
        if cond(h):
            return h
        assert time.monotonic() < deadline, h
        time.sleep(0.01)


def test_sixteen_queued_streams_are_served_in_arrival_order(srv, monkeypatch):
    """Fair: 16 streams queued one after another behind a held worker start in the order
    they arrived (the engine sees their seeds 0..15 in turn), each logs the time it
    waited, and all complete."""
    n, results, errors, started = 16, {}, [], []
    eng = srv.server.scheduler.engine

    class Recording:  # the scheduler's engine, noting which request each stream is for
        def __getattr__(self, name):
            return getattr(eng, name)

        def stream(self, request):
            started.append(request.seed)
            return eng.stream(request)

    monkeypatch.setattr(srv.server.scheduler, "engine", Recording())

    def go(i):
        try:
            chunks = list(srv.client().completions.create(model="smollm2", prompt=f"{i} {STORY}", max_tokens=8,
                                                          temperature=0.7, seed=i, stream=True,
                                                          stream_options={"include_usage": True}))
            results[i] = chunks
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    before = last_runs(1)
    held = HeldWorker(srv)
    ts, queued_at = [], {}
    try:
        for i in range(n):  # one at a time: request i arrives only once i-1 is in the queue
            ts.append(threading.Thread(target=go, args=(i,)))
            ts[-1].start()
            _health_until(srv, lambda h: h["queued"] == i + 1 or errors)
            queued_at[i] = time.monotonic()
        released = time.monotonic()
    finally:
        held.close()
    for t in ts:
        t.join(600)
    assert not errors and len(results) == n
    assert started == list(range(n))  # first in, first out
    for chunks in results.values():
        assert chunks[-1].usage.completion_tokens == 8
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # Each logged wait covers at least the time the test kept it queued.
    srv.server.log.flush()
    # this test's rows (a request of the test before may be logged late, after `before`)
    ours = {f"{i} {STORY}": i for i in range(n)}
    rows = [r for r in last_runs(n + 8) if r not in before and r["input"] in ours]
    waited = {ours[r["input"]]: json.loads(r["timings"])["queue_s"] for r in rows}
    assert sorted(waited) == list(range(n))
    assert all(waited[i] >= released - queued_at[i] for i in range(n)), (waited, released, queued_at)


def test_queued_stream_starts_before_its_turn(srv):
    """A stream waiting behind another gets its headers and first (role) chunk while it is
    still queued, not when its generation starts; then its text."""
    held = HeldWorker(srv)
    try:
        with httpx.Client(timeout=120) as h:
            with h.stream("POST", srv.base + "/v1/chat/completions",
                          json={"messages": CHAT, "max_tokens": 4, "stream": True}) as resp:
                lines = resp.iter_lines()
                first = next(l for l in lines if l.startswith("data: "))
                health = httpx.get(srv.base + "/health").json()
                assert '"role":"assistant"' in first
                assert not held.release.is_set() and health["running"] == 1 and health["queued"] == 1, health
                held.release.set()
                rest = [l for l in lines if l.startswith("data: ")]
    finally:
        held.close()
    assert rest[-1] == "data: [DONE]" and len(rest) >= 3


def _no_end(srv) -> dict:
    """A logit_bias that bans every end-of-generation token."""
    eng = srv.server.engine
    return {str(t): -100 for t in range(eng.n_vocab) if eng.is_eog(t)}


def _next_cancelled_row(srv, before: list, timeout: float = 60) -> dict:
    """The requests log's newest row once it is a new, cancelled one."""
    deadline = time.monotonic() + timeout
    while True:
        srv.server.log.flush()
        rows = last_runs(1)
        if rows and rows != before and rows[0]["finish_reason"] == "cancelled":
            return rows[0]
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)


def test_disconnect_cancels_within_one_token(srv):
    before = last_runs(1)
    body = {"prompt": STORY, "max_tokens": 400, "temperature": 0.7, "seed": 1, "stream": True}
    received = 0
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", srv.base + "/v1/completions", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    received += 1
                    if received == 10:
                        break  # closing the response closes the connection
    row = _next_cancelled_row(srv, before)
    t = json.loads(row["timings"])
    assert t["tokens_after_cancel"] <= 1, t
    assert row["gen_tokens"] <= received + 3, (row["gen_tokens"], received)
    assert httpx.get(srv.base + "/health").json()["running"] == 0
    # A whole (non-streamed) request whose client gives up while it generates is cancelled
    # too: the client closes its connection once /health shows the request running (end
    # of text banned, so that it cannot finish first however fast the CPU).
    before = last_runs(1)
    whole = json.dumps(body | {"stream": False, "max_tokens": 1500, "logit_bias": _no_end(srv)}).encode()
    with socket.create_connection(("127.0.0.1", srv.port)) as c:
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(whole), whole))
        _health_until(srv, lambda h: h["running"] == 1)
    row = _next_cancelled_row(srv, before)
    assert row["gen_tokens"] < 1500 and json.loads(row["timings"]).get("tokens_after_cancel", 0) <= 1
    assert httpx.get(srv.base + "/health").json()["running"] == 0


def test_requests_are_logged(srv, client, model_info):
    r = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=6, temperature=0,
                                       extra_body={"steering": {"features": {"formal": 0.2}, "experimental": True}})
    srv.server.log.flush()
    row = last_runs(1)[0]
    assert row["command"] == "serve" and row["model"] == "smollm2"
    key = _resolve(model_info, {"formal": 0.2}).profile
    assert json.loads(row["features"]) == key
    assert json.loads(row["input"]) == CHAT and row["output"] == r.choices[0].message.content
    assert row["gen_tokens"] == 6 and row["ttft_s"] > 0 and row["mode"].startswith("chat")
    t = json.loads(row["timings"])
    # Measured from one clock: the queue wait is part of the time to the response.
    assert 0 <= t["queue_s"] <= t["server_first_byte_s"]
    out = subprocess.run([sys.executable, "-m", "morph", "log", "-n", "1"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and f" serve smollm2 [{next(iter(key))}=0.2] chat" in out.stdout


# --- steer, check, choose ------------------------------------------------------------------------

LADDER = {"steering": {"features": {"formal": None}}}  # the default strength: morph chooses one


def _direct_choice(srv, engine, model_info, features, **kw):
    """The ladder the server runs for CHAT, run here through choose.run on the engine."""
    from morph import choose
    from morph.steering.catalog import Catalog

    ladder = choose.ladder_features(Catalog(model_info.model_id), _resolve(model_info, features, False))
    return choose.run(engine, srv.server.rt.embedder, "chat", "", ladder, messages=CHAT, **kw)


def test_chat_ladder_returns_the_chosen_candidate_and_logs_it(srv, client, engine, model_info):
    from morph import choose

    r = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=32, temperature=0,
                                       extra_body=LADDER)
    chosen = r.steering["chosen"]
    assert chosen["rung"] in {g.name for g in choose.rungs_for("chat") if g != choose.PLAIN}
    assert r.steering["apply"] == choose.LADDER_APPLY
    assert r.steering["features"] == _resolve(model_info, {"formal": None}, False).profile
    want = _direct_choice(srv, engine, model_info, {"formal": None}, max_tokens=32, temperature=0)
    by_rung = {c.rung.name: c for c in want.candidates}
    assert r.choices[0].message.content == by_rung[chosen["rung"]].text == want.text
    assert chosen == json.loads(json.dumps(want.as_dict()))  # the scores too, every candidate's
    assert [c["rung"] for c in chosen["candidates"]] == [g.name for g in choose.RUNGS]  # PLAIN: the reference
    assert r.usage.completion_tokens == len(want.chosen.ids) <= 32
    assert r.choices[0].finish_reason == want.chosen.finish
    srv.server.log.flush()
    row = last_runs(1)[0]
    assert json.loads(row["chosen"]) == chosen and row["output"] == r.choices[0].message.content


def test_ladder_stream_equals_whole_and_carries_the_choice(srv, client):
    whole = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=32, temperature=0,
                                           extra_body=LADDER)
    chunks = list(client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=32, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=LADDER))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    echoed = [i for i, c in enumerate(chunks) if getattr(c, "steering", None)]
    assert echoed[0] == 0 and "chosen" not in chunks[0].steering  # the role chunk: before the choice
    with_choice = [i for i in echoed if "chosen" in chunks[i].steering]
    finish = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason)
    assert len(with_choice) == 1 and with_choice[0] < finish
    assert chunks[with_choice[0]].steering == whole.steering
    assert chunks[finish].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # Raw SSE: every event a JSON data line, then [DONE].
    with httpx.stream("POST", srv.base + "/v1/chat/completions", timeout=300, json={
            "messages": CHAT, "max_tokens": 8, "temperature": 0, "stream": True} | LADDER) as resp:
        events = [ln for ln in resp.iter_lines() if ln and not ln.startswith(":")]
    assert events[-1] == "data: [DONE]" and all(json.loads(e[6:]) for e in events[:-1])


def test_choose_false_explicit_scales_and_what_the_ladder_cannot_honour(srv, client, engine, model_info):
    """`choose: false` is one generation exactly as without the ladder; an explicit scale,
    `apply`, logit mode, logit_bias, penalties and completions generate once (no
    `chosen`); `choose: true` with any of them is a 400 naming the field."""
    st = _resolve(model_info, {"formal": None}, False)
    fresh(srv.server.engine)
    off = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=32, temperature=0,
                                         extra_body={"steering": {"features": {"formal": None}, "choose": False}})
    assert "chosen" not in off.steering and off.steering["apply"] == defaults_apply("chat")
    assert off.choices[0].message.content == direct(engine, "chat", messages=CHAT, max_tokens=32, temperature=0,
                                                     steering=st.vector, apply=off.steering["apply"])
    single = dict(model="smollm2", messages=CHAT, max_tokens=4, temperature=0)
    for steering, extra in (({"features": {"formal": 0.3}}, {}), ({"features": ["formal=0.2"]}, {}),
                            ({"features": {"formal": None}, "apply": "generated"}, {}),
                            ({"features": {"formal": None}, "mode": "logits"}, {}),
                            ({"features": {"formal": None}}, {"logit_bias": {"0": -1}}),
                            ({"features": {"formal": None}}, {"presence_penalty": 0.5})):
        r = client.chat.completions.create(**single, extra_body={"steering": steering} | extra)
        assert "chosen" not in r.steering, (steering, extra)
    comp = client.completions.create(model="smollm2", prompt=STORY, max_tokens=4, temperature=0, extra_body=LADDER)
    assert "chosen" not in comp.steering
    url = srv.base + "/v1/chat/completions"
    ask = {"messages": CHAT, "max_tokens": 4, "temperature": 0}
    for steering, extra, param in (({"features": {"formal": 0.3}}, {}, "steering.features"),
                                   ({"features": {"formal": None}, "apply": "all"}, {}, "steering.apply"),
                                   ({"features": {"formal": None}, "mode": "logits"}, {}, "steering.mode"),
                                   ({"features": {"formal": None}}, {"logit_bias": {"0": -1}}, "logit_bias"),
                                   ({"features": {"formal": None}}, {"frequency_penalty": 1.0}, "frequency_penalty")):
        e = _err(httpx.post(url, json=ask | extra | {"steering": steering | {"choose": True}}), 400, param)
        assert "'steering.choose' is true" in e["message"]
    _err(httpx.post(srv.base + "/v1/completions", json={"prompt": STORY, "steering": {
        "features": ["formal"], "choose": True}}), 400, "steering.choose")
    for bad in ("yes", 1, [True]):
        e = _err(httpx.post(url, json=ask | {"steering": {"features": ["formal"], "choose": bad}}), 400,
                 "steering.choose")
        assert "true or false" in e["message"]


def defaults_apply(framing: str) -> str:
    from morph import tasks

    return tasks.Defaults().apply[framing]


def test_disconnect_cancels_a_ladder(srv):
    """A whole ladder request whose client leaves while it runs (on the scheduler's worker,
    as /health shows) ends cancelled and frees the worker."""
    before = last_runs(1)
    body = json.dumps({"messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
                       "max_tokens": 1500, "temperature": 0.7, "seed": 3} | LADDER).encode()
    with socket.create_connection(("127.0.0.1", srv.port)) as c:
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _health_until(srv, lambda h: h["running"] == 1)
    t0 = time.monotonic()
    row = _next_cancelled_row(srv, before)
    assert row["chosen"] is None and row["mode"] == "chat apply=generated"
    _health_until(srv, lambda h: h["running"] == 0)
    assert time.monotonic() - t0 < 30


def test_without_the_embedder_requests_generate_once_with_one_warning(model_info, engine, monkeypatch, capfd):
    from morph.engine import minilm

    def missing(name):
        raise minilm.md.PackageNotFoundError(name)

    monkeypatch.setattr(minilm.md, "distribution", missing)
    rt = _runtime(model_info, engine)
    s = Served(Server(rt, log=False))
    try:
        c = s.client()
        capfd.readouterr()
        for _ in range(2):
            r = c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4, temperature=0,
                                          extra_body=LADDER)
            assert "chosen" not in r.steering and r.steering["apply"] == defaults_apply("chat")
        err = capfd.readouterr().err
        assert err.count("morph: warning: ") == 1 and "steering.chosen" in err, err
    finally:
        s.stop()


# --- the command, as a process ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """`python -m morph serve ...` with a private data dir (1 thread), URL read from stdout."""

    def __init__(self, tmp: Path, *args, env=None):
        data = tmp / "data"
        data.mkdir(exist_ok=True)
        threads = int(os.environ.get("MORPH_TEST_THREADS") or 1)  # as conftest's engines
        (data / "config.toml").write_text(f"threads = {threads}\nn_ctx = 2048\n")
        self.env = dict(os.environ, MORPH_DATA_DIR=str(data), PYTHONPATH=str(Path(__file__).parents[1]),
                        **(env or {}))
        self.p = subprocess.Popen([sys.executable, "-m", "morph", "serve", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=self.env)
        self.url = None

    def wait_url(self, timeout=120) -> str:
        line = self.p.stdout.readline()  # blocks until the URL (or exit)
        assert line.startswith("morph: serving "), (line, self.p.stderr.read() if self.p.poll() is not None else "")
        self.url = line.split(" at ")[1].split()[0]
        return self.url

    def stop(self, sig=signal.SIGTERM, timeout=30):
        self.p.send_signal(sig)
        rc = self.p.wait(timeout)
        return rc, self.p.stdout.read(), self.p.stderr.read()


def _port_free(port: int) -> bool:
    """Nothing listens on the port: a new server can take it (SO_REUSEADDR, as `morph serve`
    binds: the connections the old one closed may linger in TIME_WAIT) and a client is
    refused."""
    with socket.socket() as c:
        if c.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return True
        except OSError:
            return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_streams_and_frees_the_port(tmp_path, sig):
    port = _free_port()
    proc = Proc(tmp_path, "--port", str(port))
    try:
        url = proc.wait_url()
        assert url == f"http://127.0.0.1:{port}/v1"
        lines, finish = [], []
        with httpx.Client(timeout=60) as h:
            with h.stream("POST", url + "/completions", json={"prompt": STORY, "max_tokens": 1500, "stream": True,
                                                              "temperature": 0.8, "seed": 2}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                    if len(lines) == 5:
                        proc.p.send_signal(sig)
                    if line.startswith("data: {"):
                        finish.append(json.loads(line[6:])["choices"][0]["finish_reason"])
        assert lines[-1] == "data: [DONE]" and finish[-1] == "abort"
        assert len(lines) < 200  # ended at the signal, not after 1500 tokens
        rc = proc.p.wait(30)
        err = proc.p.stderr.read()
        assert rc == (130 if sig == signal.SIGINT else 0), err  # morph's status for Ctrl-C
        assert "Traceback" not in err and f"stopped ({signal.Signals(sig).name})" in err
        assert _port_free(port)
    finally:
        if proc.p.poll() is None:
            proc.p.kill()


def test_accepted_connections_have_nagle_off():
    """bind() makes a socket asyncio recognises as TCP, so every accepted connection gets
    TCP_NODELAY (with Nagle on, back-to-back requests lost ~40 ms each to delayed ACKs)."""
    from morph.server.run import bind

    async def main():
        sock = bind("127.0.0.1", 0)
        seen = asyncio.get_running_loop().create_future()

        class P(asyncio.Protocol):
            def connection_made(self, transport):
                s = transport.get_extra_info("socket")
                seen.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await asyncio.get_running_loop().create_server(P, sock=sock)
        _, w = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        flag = await asyncio.wait_for(seen, 10)
        w.close()
        server.close()
        return flag

    assert asyncio.run(main()) != 0


def test_busy_port_is_one_error_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "morph", "serve", "--port", str(port)], capture_output=True,
                           text=True, timeout=60, env=dict(os.environ, MORPH_DATA_DIR=str(tmp_path)))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("morph: error: ") and r.stderr.count("\n") == 1 and "in use" in r.stderr


def test_non_loopback_without_key_warns(tmp_path):
    proc = Proc(tmp_path, "--host", "0.0.0.0", "--port", "0", "--no-log")
    try:
        url = proc.wait_url()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        rc, _, err = proc.stop()
        assert rc == 0 and "warning: listening on 0.0.0.0 without --api-key" in err
    finally:
        if proc.p.poll() is None:
            proc.p.kill()
    keyed = Proc(tmp_path, "--host", "0.0.0.0", "--port", "0", "--api-key", "k", "--no-log")
    try:
        keyed.wait_url()
        rc, _, err = keyed.stop()
        assert rc == 0 and "warning" not in err
    finally:
        if keyed.p.poll() is None:
            keyed.p.kill()


def test_default_features_no_log_and_bad_feature(tmp_path, model_info):
    bad = subprocess.run([sys.executable, "-m", "morph", "serve", "--port", "0", "-f", "nope"], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, MORPH_DATA_DIR=str(tmp_path)))
    assert bad.returncode == 1 and bad.stderr.startswith("morph: error: unknown feature 'nope'")
    proc = Proc(tmp_path, "--port", "0", "-f", "formal=0.3", "--experimental", "--no-log")
    try:
        url = proc.wait_url()
        c = openai.OpenAI(base_url=url, api_key="x", timeout=120, max_retries=0)
        r = c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4, temperature=0)
        assert r.steering["features"] == _resolve(model_info, {"formal": 0.3}).profile  # the server's default
        r = c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4, temperature=0,
                                      extra_body={"steering": {}})
        assert getattr(r, "steering", None) is None  # the request's own (none) wins
        rc, _, _ = proc.stop()
        assert rc == 0
        log = subprocess.run([sys.executable, "-m", "morph", "log", "--json"], capture_output=True, text=True,
                             timeout=60, env=proc.env)
        assert json.loads(log.stdout) == []
    finally:
        if proc.p.poll() is None:
            proc.p.kill()


def test_llm_cli_works_unmodified(srv, client, tmp_path):
    llm = Path(sys.executable).with_name("llm")  # the test extra installs it
    assert llm.exists(), "the llm CLI is missing: pip install -e '.[test]'"
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: morph-smollm2\n  model_name: smollm2\n  api_base: \"{srv.base}/v1\"\n")
    env = dict(os.environ, LLM_USER_PATH=str(tmp_path))
    prompt = "Write a short note to my boss saying I will be late today."
    r = subprocess.run([str(llm), "-m", "morph-smollm2", "--no-log", "-o", "temperature", "0", "-o", "max_tokens", "20",
                        prompt], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    want = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=20, temperature=0).choices[0].message.content
    assert r.stdout.strip() == want.strip() and want.strip()
