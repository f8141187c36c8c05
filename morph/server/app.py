"""The OpenAI-compatible HTTP app (Starlette): routes, SSE streaming, auth, limits, logging.

    GET  /health                 liveness, queue depth
    GET  /v1/models              the one served model (and /v1/models/{id})
    GET  /v1/features            the feature catalog with its measured scores
    POST /v1/completions         text completion ("continue" defaults), stream or not
    POST /v1/chat/completions    chat (the model's template, "chat" defaults), stream or not

Shapes follow vLLM's OpenAI server: errors are {"error": {message, type, param, code}},
400 for bad parameters, 404 for an unknown model, 401 without the API key, 413 for a
body over the limit. Steering rides in the request body (`steering`, see params.py) and
resolves through morph.steering.profile like `morph steer -f`; a response echoes what it
resolved to. A chat request whose features are left at their default strengths is
answered by steer, check, choose (morph/choose.py): a ladder of candidates in one batch,
the strongest that keeps the unsteered answer's meaning returned, and the echo says which
(`steering.chosen`). Every request is logged to the history database (`morph log`) unless
the server runs with --no-log.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from morph import choose
from morph.engine.base import Event, Request
from morph.errors import MorphError
from morph.server.errors import APIError, bad
from morph.server.params import Params, parse_chat, parse_completion
from morph.steering.request import SteeringRequest
from morph.server.requestlog import RequestLog
from morph.server.scheduler import Failure, Job, Scheduler
from morph.steering import profile

MAX_BODY = 2 * 1024 * 1024  # bytes; a full 8k-token context is ~40 KB of text
INLINE_TOKENIZE = 16 * 1024  # shorter inputs are tokenized on the event loop (faster)
COMPLETION_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
FIRST_EVENT_WAIT = 2.0  # s a stream waits for its first event before it sends headers
KEEPALIVE_S = 10.0  # SSE comment this often while a stream waits in the queue


@dataclass
class Prepared:
    request: Request
    n_prompt: int
    steering: dict | None  # what the request's steering resolved to (echoed, logged)
    log_input: str
    ladder: list[choose.Feature] | None = None  # steer, check, choose instead of one generation


@dataclass
class Chosen(Event):
    """A ladder's outcome as one final event: the chosen candidate's text, and the choice."""

    choice: choose.Choice | None = None


class Server:
    """State shared by the routes: the runtime, the scheduler, caches and the log."""

    def __init__(self, rt, *, api_key: str | None = None, log: bool = True,
                 default_steering: SteeringRequest | None = None, max_body: int = MAX_BODY,
                 streams: int | None = None):
        self.rt = rt
        self.engine = rt.engine
        self.model_id = rt.model_name
        self.aliases = {rt.model_name, rt.info.model_id, str(rt.info.file.path)}
        self.api_key = api_key
        self.max_body = max_body
        self.default_steering = default_steering
        self.defaults = rt.defaults  # morph/tasks.py with config.toml applied
        self.scheduler = Scheduler(self.engine, streams)
        self.log = RequestLog() if log else None
        self.created = int(time.time())
        self._resolved: dict[tuple, Any] = {}
        self._logit = None  # morph.steering.logits.LogitSteering, built on first use
        self._logit_lock = asyncio.Lock()
        self._ladders: dict[tuple, list[choose.Feature]] = {}
        self._embedder = None  # the meaning check's, opened on the first ladder (False: unavailable)
        self._embedder_lock = asyncio.Lock()

    def close(self) -> None:
        self.scheduler.close()
        if self.log is not None:
            self.log.close()

    # --- plumbing ------------------------------------------------------------------------

    def _auth(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError("missing or wrong API key (send 'Authorization: Bearer KEY')", 401)

    async def _json(self, request: HTTPRequest) -> Any:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise APIError(f"request body is {int(length)} bytes; the limit is {self.max_body}", 413)
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self.max_body:
                raise APIError(f"request body is over the limit of {self.max_body} bytes", 413)
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise bad("the request body is empty (expected a JSON object)")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"malformed JSON in the request body ({e})") from None

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.aliases:
            raise APIError(f"The model `{model}` does not exist (this server serves `{self.model_id}`).",
                           404, "model")

    # --- routes -----------------------------------------------------------------------------

    async def health(self, request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_id, "engine": self.engine.name,
                             "queued": self.scheduler.queued, "running": self.scheduler.running})

    def _card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "morph",
                "root": str(self.rt.info.file.path), "parent": None, "max_model_len": self.engine.n_ctx}

    async def models(self, request: HTTPRequest) -> Response:
        self._auth(request)
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: HTTPRequest) -> Response:
        self._auth(request)
        self._check_model(request.path_params["model"])
        return JSONResponse(self._card())

    async def features(self, request: HTTPRequest) -> Response:
        self._auth(request)
        data = []
        for f in self.rt.catalog.features:
            data.append({
                "id": f.key, "object": "feature", "name": f.name, "method": f.method,
                "description": f.description, "layer": f.layer, "default_scale": f.default_scale,
                "experimental": bool(getattr(f, "experimental", False)), "source": f.source,
                "explanation": f.explanation, "scores": f.scores,
            })
        return JSONResponse({"object": "list", "model": self.model_id, "data": data})

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, parse_completion)

    async def chat_completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, parse_chat)

    # --- generation -----------------------------------------------------------------------

    async def _generate(self, request: HTTPRequest, parse) -> Response:
        t0 = time.perf_counter()
        self._auth(request)
        p = parse(await self._json(request))
        self._check_model(p.model)
        prep = await self._prepare(p)
        loop = asyncio.get_running_loop()
        try:
            if prep.ladder:
                cancel = threading.Event()
                job = self.scheduler.call(lambda: self._choose(p, prep, cancel), loop, cancel)
            else:
                job = self.scheduler.submit(prep.request, loop)
        except MorphError as e:
            raise APIError(str(e), 503) from None
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, job))
        try:
            # Wait for the engine's first event, so that a failure at its start is still a
            # proper 4xx; a stream queued behind others starts anyway (keep-alives follow).
            first = await asyncio.wait_for(job.events.get(), FIRST_EVENT_WAIT if p.stream else None)
        except asyncio.TimeoutError:
            first = None
        except BaseException:
            job.stop()
            watcher.cancel()
            raise
        if isinstance(first, Failure):
            watcher.cancel()
            raise APIError(first.message, 500 if first.internal else 400)
        reply = _Reply(self, p, prep, job, t0)
        if p.stream:
            return StreamingResponse(reply.sse(first, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return JSONResponse(await reply.whole(first))
        finally:
            watcher.cancel()

    async def _prepare(self, p: Params) -> Prepared:
        """The engine Request for `p`: morph's defaults for its framing, the body's fields,
        its steering, and its length checked against the context."""
        sampling = self.defaults.sampling_for(p.framing) | p.sampling
        cv, bias, apply, echo, ladder = await self._steering(p)
        if p.logit_bias:
            bias = self._add_user_bias(bias, p.logit_bias)
        req = Request(prompt=p.prompt, messages=p.messages, stop=tuple(p.stop), steering=cv, apply=apply,
                      logit_bias=bias, **sampling)
        size = len(p.prompt or "") + sum(len(m["content"]) for m in p.messages or ())
        if size > INLINE_TOKENIZE:  # long inputs: keep the event loop free for other streams
            n_prompt = await run_in_threadpool(self._count_tokens, req)
        else:
            n_prompt = self._count_tokens(req)
        req.max_tokens = self._max_tokens(p, n_prompt)
        log_input = p.prompt if p.prompt is not None else json.dumps(p.messages, ensure_ascii=False)
        return Prepared(req, n_prompt, echo, log_input, ladder)

    async def _steering(self, p: Params):
        """(control vector, logit bias, apply, what to echo, the ladder's features or None)
        for the request's steering, or the server's default steering (-f) when the body has
        no `steering` field."""
        apply = self.defaults.apply.get(p.framing, "all")
        spec = p.steering if p.steering is not None else self.default_steering
        if spec is None or not spec.features:
            return None, None, apply, None, None
        st = await self._resolve(spec)
        ladder = await self._ladder(p, spec, st)
        cv, bias = None, None
        if ladder:
            apply = choose.LADDER_APPLY  # what the ladder's candidates run with (echoed, logged)
        elif spec.mode == "logits":  # a logit bias acts on sampled tokens only (checked in the parser)
            apply = "generated"
            bias = (await self._logit_steering()).bias(st.vector)
        else:
            apply = spec.apply or apply  # checked where the body was parsed
            cv = st.vector
        return cv, bias, apply, {"features": dict(st.profile), "apply": apply, "mode": spec.mode}, ladder

    async def _ladder(self, p: Params, spec: SteeringRequest, st) -> list[choose.Feature] | None:
        """The features a ladder chooses the strength of, or None: one generation (`choose`
        false, something the ladder cannot honour, or no embedder). `choose: true` with
        something it cannot honour is a 400 naming that field."""
        if spec.choose is False:
            return None
        conflict = _no_ladder(p, spec, st)
        if conflict is not None:
            if spec.choose:
                raise bad(f"'steering.choose' is true, but {conflict[1]}", conflict[0])
            return None
        key = tuple(st.profile.items())
        features = self._ladders.get(key)
        if features is None:
            features = await run_in_threadpool(choose.ladder_features, self.rt.catalog, st, self.engine)
            if len(self._ladders) > 256:
                self._ladders.clear()
            self._ladders[key] = features
        if not features or await self._meaning_embedder() is None:
            return None
        return features

    async def _meaning_embedder(self):
        """The meaning check's embedder, opened on the first ladder; None where it cannot be
        (its package missing): ladders then fall back to one generation, with one warning."""
        async with self._embedder_lock:
            if self._embedder is None:
                try:
                    self._embedder = await run_in_threadpool(lambda: self.rt.embedder)
                except MorphError as e:
                    print(f"morph: warning: {e}; steered requests generate once (no ladder, no "
                          "steering.chosen)", file=sys.stderr, flush=True)
                    self._embedder = False
            return self._embedder or None

    def _choose(self, p: Params, prep: Prepared, cancel: threading.Event) -> Event:
        """Run on the scheduler's worker: the ladder for the request's turns, as one event."""
        if cancel.is_set():  # its client left while it queued
            return Event(done=True, finish_reason="cancelled")
        req = prep.request
        try:
            choice = choose.run(self.engine, self._embedder, p.framing, "", prep.ladder, defaults=self.defaults,
                                cancel=cancel, messages=req.messages, stop=list(req.stop),
                                max_tokens=req.max_tokens, **p.sampling)
        except KeyboardInterrupt:  # choose.run's word for a cancel
            return Event(done=True, finish_reason="cancelled")
        c = choice.chosen
        return Chosen(text=c.text, token_ids=tuple(c.ids), done=True, finish_reason=c.finish,
                      timings=choice.timings, choice=choice)

    def _add_user_bias(self, bias, user: dict[int, float]):
        n_vocab = self.rt.info.n_vocab
        outside = [t for t in user if t >= n_vocab]
        if outside:
            raise bad(f"'logit_bias' token id {outside[0]} is outside the vocabulary (0..{n_vocab - 1})", "logit_bias")
        if bias is None:
            return dict(user)
        bias = bias.copy()  # the logit-steering bias (dense) is cached: add to a copy
        for t, b in user.items():
            bias[t] += b
        return bias

    def _max_tokens(self, p: Params, n_prompt: int) -> int:
        """The body's max_tokens if the context has room for it (400 otherwise); else
        OpenAI's defaults: 16 for completions, the rest of the context for chat."""
        n_ctx = self.engine.n_ctx
        field = "messages" if p.kind == "chat" else "prompt"
        if n_prompt == 0:
            raise bad(f"'{field}' is empty after tokenization", field)
        if n_prompt >= n_ctx:
            raise bad(f"This model's maximum context length is {n_ctx} tokens. However, your request has "
                      f"{n_prompt} input tokens. Please reduce the length of the input.", field)
        room = n_ctx - n_prompt
        if p.max_tokens is not None:
            if p.max_tokens > room:
                raise bad(f"'max_tokens' or 'max_completion_tokens' is too large: {p.max_tokens}. This model's "
                          f"maximum context length is {n_ctx} tokens and your request has {n_prompt} input "
                          f"tokens ({p.max_tokens} > {n_ctx} - {n_prompt}).", p.max_tokens_field)
            return p.max_tokens
        return min(COMPLETION_MAX_TOKENS, room) if p.kind == "completion" else room

    def _count_tokens(self, req: Request) -> int:
        eng = self.engine
        try:
            prepare = getattr(eng, "prepare_tokens", None)
            if prepare is not None:
                return len(prepare(req))
            if req.messages is not None:
                return len(eng.tokenize(eng.format_chat(req.messages), add_bos=False, special=True))
            return len(eng.tokenize(req.prompt or "", add_bos=req.add_bos))
        except MorphError as e:  # e.g. a model without a chat template
            raise bad(str(e), "messages" if req.messages is not None else "prompt") from None

    async def _resolve(self, spec: SteeringRequest):
        key = (tuple(spec.features.items()), spec.experimental)
        st = self._resolved.get(key)
        if st is None:
            def resolve():
                return profile.resolve(self.rt.catalog, self.rt.info, spec.features,
                                                experimental=spec.experimental)
            try:
                st = await run_in_threadpool(resolve)
            except (MorphError, ValueError, TypeError) as e:
                raise bad(str(e), "steering.features") from None
            if len(self._resolved) > 256:
                self._resolved.clear()
            self._resolved[key] = st
        return st

    async def _logit_steering(self):
        """Built once, on the first logit-mode request: the output head read from the GGUF
        and the last block's typical norm measured through the engine (in queue order)."""
        async with self._logit_lock:
            if self._logit is None:
                from morph.steering.logits import LogitSteering

                job = self.scheduler.call(lambda: _try(LogitSteering.for_engine, self.engine, self.rt.info),
                                          asyncio.get_running_loop())
                res = await job.events.get()
                if isinstance(res, Failure):
                    raise APIError(f"logit steering is unavailable: {res.message}", 500)
                if isinstance(res, MorphError):
                    raise APIError(f"logit steering is unavailable for this model: {res}", 400, "steering.mode")
                self._logit = res
            return self._logit


def _no_ladder(p: Params, spec: SteeringRequest, st) -> tuple[str, str] | None:
    """(field, why) when the request asks for something a ladder cannot honour."""
    if p.kind != "chat":
        return "steering.choose", "completions generate once (the ladder is for chat completions)"
    if spec.mode != "residual":
        return "steering.mode", "the ladder steers the residual stream"
    if spec.apply is not None:
        return "steering.apply", "the ladder places its vectors itself (on the generated tokens)"
    if st.explicit:
        return "steering.features", "a scale given explicitly is honoured exactly (leave it out to choose one)"
    if p.logit_bias:
        return "logit_bias", "the ladder's batched generation has no logit bias"
    for key in ("frequency_penalty", "presence_penalty"):
        if p.sampling.get(key):
            return key, f"the ladder's batched generation has no {key.replace('_', ' ')}"
    return None


def _try(fn, *args):
    try:
        return fn(*args)
    except MorphError as e:
        return e


async def _cancel_on_disconnect(request: HTTPRequest, job: Job) -> None:
    """Stop the job's generation as soon as its client goes away (the body is already read,
    so the next ASGI message is the disconnect)."""
    try:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                job.stop()
                return
    except asyncio.CancelledError:
        pass
    except Exception:  # noqa: BLE001 - a broken connection is a disconnect too
        job.stop()


class _Reply:
    """Turns one job's events into an OpenAI response (whole, or SSE chunks)."""

    def __init__(self, server: Server, p: Params, prep: Prepared, job: Job, t0: float):
        self.server, self.p, self.prep, self.job, self.t0 = server, p, prep, job, t0
        chat = p.kind == "chat"
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.parts: list[str] = []
        self.first_byte_s: float | None = None
        self.chosen: dict | None = None  # a ladder's choice (Choice.as_dict), once it is made

    def _take(self, item: Event) -> None:
        if item.text:
            self.parts.append(item.text)
        if isinstance(item, Chosen) and item.choice is not None:
            self.chosen = item.choice.as_dict()

    def _steering(self) -> dict | None:
        """The steering echo: what the request resolved to, and what a ladder chose."""
        st = self.prep.steering
        return st if st is None or self.chosen is None else st | {"chosen": self.chosen}

    def _usage(self, ev: Event | None) -> dict:
        t = ev.timings if ev is not None else None
        n_prompt = t.prompt_tokens if t is not None and t.prompt_tokens else self.prep.n_prompt
        n_gen = t.gen_tokens if t is not None else 0
        if isinstance(ev, Chosen):  # the text returned (the timings count the whole ladder's)
            n_gen = len(ev.token_ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}

    def _finish(self, ev: Event) -> str:
        if ev.finish_reason == "cancelled":
            return "abort"
        return ev.finish_reason or "stop"

    # --- whole responses -------------------------------------------------------------------

    async def whole(self, item) -> dict:
        text_prefix = self.p.prompt if self.p.echo else ""
        while True:
            if isinstance(item, Failure):
                raise APIError(item.message, 500 if item.internal else 400)
            self._take(item)
            if item.done:
                break
            item = await self.job.events.get()
        text = text_prefix + "".join(self.parts)
        finish = self._finish(item)
        if self.p.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.server.model_id,
               "choices": [choice], "usage": self._usage(item)}
        if self.prep.steering is not None:
            out["steering"] = self._steering()
        self.first_byte_s = time.perf_counter() - self.t0
        self._log(item)
        return out

    # --- streams -----------------------------------------------------------------------------

    def _chunk(self, delta: str | None = None, finish: str | None = None, role: bool = False,
               usage: dict | None = None, last: bool = False, steering: bool = False) -> str:
        chat = self.p.kind == "chat"
        if last:
            choices = []
        elif chat:
            d: dict = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
            choices = [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}]
        obj = {"id": self.id, "object": "chat.completion.chunk" if chat else "text_completion",
               "created": self.created, "model": self.server.model_id, "choices": choices}
        if self.p.include_usage:
            obj["usage"] = usage
        if (role or steering) and self.prep.steering is not None:
            obj["steering"] = self._steering()
        return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def sse(self, item, watcher: asyncio.Future):
        job = self.job
        ev = None
        try:
            if self.p.kind == "chat":
                yield self._chunk(role=True)
            elif self.p.echo:
                yield self._chunk(self.p.prompt)
            while True:
                if item is None:  # still queued: an SSE comment keeps the connection alive
                    try:
                        item = await asyncio.wait_for(job.events.get(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield f": queued ({self.server.scheduler.queued} waiting)\n\n"
                    continue
                if isinstance(item, Failure):
                    err = APIError(item.message, 500 if item.internal else 400)
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                self._take(item)
                chosen = isinstance(item, Chosen)  # the ladder's text, with the choice echoed on it
                if item.text or chosen:
                    if self.first_byte_s is None:
                        self.first_byte_s = time.perf_counter() - self.t0
                    yield self._chunk(item.text, steering=chosen)
                if item.done:
                    ev = item
                    yield self._chunk(None if self.p.kind == "chat" else "", finish=self._finish(item))
                    if self.p.include_usage:
                        yield self._chunk(usage=self._usage(item), last=True)
                    break
                item = await job.events.get()
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            if ev is None:  # the client went away (or the stream failed): stop generating
                job.stop()
                # Log once the engine has stopped, from a task of its own: this one is being
                # cancelled, and anyio cancels every further await in it.
                _background(self._log_when_stopped())
            else:
                self._log(ev)

    async def _log_when_stopped(self) -> None:
        self._log(await _drain(self.job))

    def _log(self, ev: Event | None) -> None:
        log = self.server.log
        if log is None:
            return
        timings = ev.timings.as_dict() if ev is not None and ev.timings is not None else {}
        timings["queue_s"] = round(self.job.queue_s, 5)
        if self.first_byte_s is not None:
            timings["server_first_byte_s"] = round(self.first_byte_s, 5)
        if self.job.tokens_at_cancel is not None and ev is not None and ev.timings is not None:
            timings["tokens_after_cancel"] = ev.timings.gen_tokens - self.job.tokens_at_cancel
        st = self.prep.steering
        mode = self.p.kind
        if st is not None:
            mode += f" {st['mode']}" if st["mode"] != "residual" else f" apply={st['apply']}"
        finish = None if ev is None else ("cancelled" if ev.finish_reason == "cancelled" else ev.finish_reason)
        log.write(self.server.model_id, st["features"] if st else {}, mode, self.prep.log_input,
                  "".join(self.parts), finish, timings, self.chosen)


_tasks: set[asyncio.Task] = set()


def _background(coro) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _tasks.add(task)  # keep a reference until it is done
    task.add_done_callback(_tasks.discard)


async def _drain(job: Job, timeout: float = 30.0) -> Event | None:
    """After a cancel: wait (briefly) for the job's final event, for the log."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            item = await asyncio.wait_for(job.events.get(), left)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            return None
        if isinstance(item, Failure):
            return None
        if item.done:
            return item


def create_app(server: Server) -> Starlette:
    async def api_error(request, exc: APIError):
        return exc.response()

    async def http_error(request, exc: HTTPException):
        status = exc.status_code
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(status, str(exc.detail))
        return APIError(msg, status).response()

    async def internal(request, exc: Exception):
        traceback.print_exception(exc)
        return APIError(f"internal error: {type(exc).__name__}: {exc}", 500).response()

    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/v1/features", server.features, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={
        APIError: api_error, HTTPException: http_error, Exception: internal})
    app.state.server = server
    return app
