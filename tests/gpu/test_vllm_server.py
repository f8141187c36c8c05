"""`morph serve` on the vLLM engine (--gpu), unchanged: the server runs as many streams as the
engine says it serves at once, vLLM batches them, and each request gets its own vector
(the per-request vector map) and its own OpenAI sampling fields."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

CHAT = [{"role": "user", "content": "Write a short note to my boss saying I will be late today."}]


@pytest.fixture(scope="module")
def served(vengine, model_info, catalog):
    import uvicorn

    from morph.config import Config
    from morph.runtime import Runtime
    from morph.server.app import Server, create_app
    from morph.server.run import bind

    rt = Runtime(Config(n_ctx=2048), model_info, vengine, catalog)
    server = Server(rt, log=False)
    sock = bind("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", lifespan="off"))
    t = threading.Thread(target=lambda: asyncio.run(uv.serve(sockets=[sock])), daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield server, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server.scheduler.stop_all()
    uv.should_exit = True
    t.join(60)
    sock.close()
    server.close()


def _chat(base, features=None, stream=True, **kw):
    body = {"messages": CHAT, "max_tokens": 24, "temperature": 0, "stream": stream, **kw}
    if features:
        body["steering"] = {"features": features, "experimental": True}
    with httpx.Client(timeout=600) as h:
        if not stream:
            return h.post(base + "/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        import json

        parts = []
        with h.stream("POST", base + "/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    d = json.loads(line[6:])
                    if d["choices"] and d["choices"][0]["delta"].get("content"):
                        parts.append(d["choices"][0]["delta"]["content"])
        return "".join(parts)


def test_concurrent_requests_batch_with_their_own_steering(served, vengine, model_info, catalog, greedy_agrees):
    """Three requests batched against each alone: other batch shapes, other kernels, so
    greedy tokens agree up to the first near-tie (conftest), scored under each request's
    own steering (no repetition penalty, so the raw logits are what greedy compared)."""
    from morph import tasks
    from morph.engine.base import Request
    from morph.steering import profile

    server, base = served
    assert server.scheduler.streams == vengine.max_streams > 1
    feats = [{"formal": 0.4}, {"casual": 0.4}, None]
    alone = [_chat(base, f, repetition_penalty=1.0) for f in feats]
    assert len(set(alone)) == 3
    out = [None] * 3
    ts = [threading.Thread(target=lambda i=i: out.__setitem__(i, _chat(base, feats[i], repetition_penalty=1.0)))
          for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(600)
    prompt = vengine.prepare_tokens(Request(messages=CHAT))
    for f, want, got in zip(feats, alone, out):
        cv = profile.resolve(catalog, model_info, f, experimental=True).vector if f else None
        greedy_agrees(vengine, prompt, vengine.tokenize(want, add_bos=False), vengine.tokenize(got, add_bos=False),
                      cv, tasks.DEFAULT_APPLY["chat"])


def test_openai_sampling_fields_reach_vllm(served, vengine, model_info, catalog):
    """The server's penalties and logit-mode steering give exactly what the engine gives
    for the same fields (each run alone after a prefix-cache reset: same kernels)."""
    from morph import tasks
    from morph.engine.base import Request, collect
    from morph.steering import profile
    from morph.steering.logits import LogitSteering

    def direct(framing, **kw):
        vengine.reset_prefix_cache()
        return collect(vengine.stream(Request(**(tasks.Defaults().sampling_for(framing) | kw)))).text

    _, base = served
    prompt = "The capital of France is"
    with httpx.Client(timeout=600) as h:
        def complete(**kw):
            vengine.reset_prefix_cache()
            r = h.post(base + "/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0, **kw})
            return r.json()["choices"][0]["text"]

        forced = vengine.tokenize(" banana", add_bos=False)[0]
        assert complete(logit_bias={str(forced): 100}).startswith(" banana")
        loop = "one two one two one two one two one two"
        out = {}
        for field in (None, "presence_penalty", "frequency_penalty"):
            vengine.reset_prefix_cache()
            body = {"prompt": loop, "max_tokens": 16, "temperature": 0, "repetition_penalty": 1.0}
            out[field] = h.post(base + "/completions", json=body | ({field: 0.5} if field else {})).json()["choices"][0]["text"]
    # Each penalty is its own field (at 0.5 a word seen five times costs 2.5 by frequency,
    # 0.5 by presence: three texts), and gives what the engine gives for that field.
    assert len(set(out.values())) == 3, out
    for field in ("presence_penalty", "frequency_penalty"):
        assert out[field] == direct("continue", prompt=loop, max_tokens=16, temperature=0, repeat_penalty=1.0,
                                    **{field: 0.5}), field
    # Logit-mode steering is a dense bias: it reaches vLLM as logit_bias.
    vengine.reset_prefix_cache()
    steered = _chat(base, None, stream=False, steering={"features": {"casual": 1.0}, "mode": "logits",
                                                       "experimental": True})
    bias = LogitSteering.for_engine(vengine, model_info).bias(
        profile.resolve(catalog, model_info, {"casual": 1.0}, experimental=True).vector)
    want = direct("chat", messages=CHAT, max_tokens=24, temperature=0, logit_bias=bias)
    assert steered == want != direct("chat", messages=CHAT, max_tokens=24, temperature=0)
