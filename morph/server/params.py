"""Request bodies of /v1/completions and /v1/chat/completions, checked field by field.

Every field the server honours is read here with its type and range, so that a bad value
is one OpenAI-shaped 400 naming the field (`param`). Fields the server does not implement
(logprobs, tools, best_of > 1, ...) are refused when set, never silently ignored; unknown
extra fields are ignored, as OpenAI-compatible servers do.

Sampling fields a request leaves out take morph's defaults (morph/tasks.py, config.toml's
[generation]), the same as `morph steer`: a chat request is the "chat" framing, a
completion the "continue" framing. The `steering` extension is morph's steering request
(steering/request.py), the same for `vllm serve` with morph's plugin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from morph.errors import FieldError
from morph.errors import kind_of as _show
from morph.server.errors import APIError, bad
from morph.steering import request as steering_request
from morph.steering.request import SteeringRequest

MAX_STOPS = 16
MAX_LOGIT_BIAS = 1024  # entries in a request's logit_bias (OpenAI allows 300)


@dataclass
class Params:
    """What one request asks for, before it becomes an engine Request."""

    kind: str  # "chat" | "completion"
    model: str | None
    prompt: str | None = None
    messages: list[dict] | None = None
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    max_tokens: int | None = None
    max_tokens_field: str = "max_tokens"  # the field that set it (named in errors)
    sampling: dict[str, Any] = field(default_factory=dict)  # Request fields the body set
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] | None = None
    steering: SteeringRequest | None = None

    @property
    def framing(self) -> str:
        """tasks.py framing whose defaults apply: chat requests chat, completions continue."""
        return "chat" if self.kind == "chat" else "continue"


# --- typed field readers ------------------------------------------------------------------


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(body: dict, key: str, lo: float, hi: float, *, lo_open: bool = False,
           prefix: str = "") -> float | None:
    v = body.get(key)
    if v is None:
        return None
    name = prefix + key
    if not _is_num(v) or not math.isfinite(v):
        raise bad(f"'{name}' must be a number, got {_show(v)}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        side = "(" if lo_open else "["
        raise bad(f"'{name}' must be in {side}{lo:g}, {hi:g}], got {v:g}", name)
    return float(v)


def integer(body: dict, key: str, lo: int | None = None, hi: int | None = None, prefix: str = "") -> int | None:
    v = body.get(key)
    if v is None:
        return None
    name = prefix + key
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad(f"'{name}' must be an integer, got {_show(v)}", name)
    if lo is not None and v < lo:
        raise bad(f"'{name}' must be >= {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise bad(f"'{name}' must be <= {hi}, got {v}", name)
    return v


def _typed(body: dict, key: str, kind: type, what: str, default, prefix: str):
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, kind):
        raise bad(f"'{prefix + key}' must be {what}, got {_show(v)}", prefix + key)
    return v


def boolean(body: dict, key: str, default: bool = False, prefix: str = "") -> bool:
    return _typed(body, key, bool, "true or false", default, prefix)


def string(body: dict, key: str, prefix: str = "") -> str | None:
    return _typed(body, key, str, "a string", None, prefix)


def _unsupported(body: dict, key: str, ok=(None, False, 0, 1, [], {}, "")) -> None:
    v = body.get(key)
    if any(v is o or (type(v) is type(o) and v == o) for o in ok):
        return
    raise bad(f"'{key}' is not supported by this server", key)


# --- bodies ---------------------------------------------------------------------------------


def parse_completion(body: Any) -> Params:
    body = _object(body)
    p = Params("completion", _model(body))
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad("'prompt' must be one string (one prompt per request)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, list) or _is_num(prompt):
        raise bad("token-id prompts are not supported: send 'prompt' as text", "prompt")
    p.prompt = _required(prompt, "prompt", str, "a string")
    p.echo = boolean(body, "echo")
    p.max_tokens = integer(body, "max_tokens", lo=1)
    for key in ("logprobs", "suffix"):
        _unsupported(body, key)
    if integer(body, "best_of", lo=1) not in (None, 1):
        raise bad("'best_of' other than 1 is not supported", "best_of")
    _common(body, p)
    return p


def parse_chat(body: Any) -> Params:
    body = _object(body)
    p = Params("chat", _model(body))
    p.messages = _messages(body.get("messages"))
    mct = integer(body, "max_completion_tokens", lo=1)
    p.max_tokens = mct if mct is not None else integer(body, "max_tokens", lo=1)
    if mct is not None:
        p.max_tokens_field = "max_completion_tokens"
    for key in ("logprobs", "top_logprobs", "tools", "functions", "audio", "prediction"):
        _unsupported(body, key)
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none"):
            raise bad(f"'{key}' is not supported by this server", key)
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad("'response_format' other than text is not supported", "response_format")
    _common(body, p)
    return p


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_show(body)}")
    return body


def _model(body: dict) -> str | None:
    return string(body, "model")


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _required(v: Any, name: str, kind: type, what: str):
    """A required, non-empty field of type `kind`."""
    if v is None:
        raise bad(f"'{name}' is required", name)
    if not isinstance(v, kind):
        raise bad(f"'{name}' must be {what}, got {_show(v)}", name)
    if not v:
        raise bad(f"'{name}' is empty", name)
    return v


def _messages(msgs: Any) -> list[dict]:
    _required(msgs, "messages", list, "an array")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object, got {_show(m)}", where)
        role = m.get("role")
        if role not in ROLES:
            if role in ("tool", "function"):
                raise bad(f"'{where}.role' {role!r} is not supported (no tool calls)", f"{where}.role")
            raise bad(f"'{where}.role' must be one of {', '.join(ROLES)}, got {_show(role)}", f"{where}.role")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), where, role)})
    if all(not m["content"] for m in out):
        raise bad("every message is empty", "messages")
    return out


def _content(c: Any, where: str, role: str) -> str:
    if c is None:
        if role == "assistant":
            return ""
        raise bad(f"'{where}.content' is required", f"{where}.content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"'{where}.content[{j}]' must be a text part (only text is supported)",
                          f"{where}.content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"'{where}.content' must be a string or an array of text parts, got {_show(c)}",
              f"{where}.content")


def _common(body: dict, p: Params) -> None:
    n = integer(body, "n", lo=1)
    if n not in (None, 1):
        raise bad("only n=1 is supported", "n")
    p.stream = boolean(body, "stream")
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise bad(f"'stream_options' must be an object, got {_show(so)}", "stream_options")
        if not p.stream:
            raise bad("'stream_options' needs 'stream': true", "stream_options")
        p.include_usage = boolean(so, "include_usage", prefix="stream_options.")
    s = p.sampling
    for key, lo, hi, lo_open in (("temperature", 0.0, 2.0, False), ("top_p", 0.0, 1.0, True),
                                 ("frequency_penalty", -2.0, 2.0, False),
                                 ("presence_penalty", -2.0, 2.0, False),
                                 ("repetition_penalty", 0.0, 3.0, True)):
        v = number(body, key, lo, hi, lo_open=lo_open)
        if v is not None:
            s["repeat_penalty" if key == "repetition_penalty" else key] = v
    top_k = integer(body, "top_k", lo=-1)
    if top_k is not None:
        s["top_k"] = max(0, top_k)  # vLLM: -1 (or 0) = off
    seed = integer(body, "seed", lo=-(2**63), hi=2**64 - 1)
    if seed is not None:
        s["seed"] = seed
    p.stop = _stop(body.get("stop"))
    p.logit_bias = _logit_bias(body.get("logit_bias"))
    string(body, "user")
    p.steering = parse_steering(body.get("steering"))


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("'stop' must be a string or an array of strings", "stop")
    if len(v) > MAX_STOPS:
        raise bad(f"'stop' has {len(v)} strings; at most {MAX_STOPS}", "stop")
    return [s for s in v if s]


def _logit_bias(v: Any) -> dict[int, float] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise bad(f"'logit_bias' must be an object of token id -> bias, got {_show(v)}", "logit_bias")
    if len(v) > MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' has {len(v)} entries; at most {MAX_LOGIT_BIAS}", "logit_bias")
    out = {}
    for k, b in v.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise bad(f"'logit_bias' key {k!r} is not a token id", "logit_bias") from None
        if tok < 0:
            raise bad(f"'logit_bias' key {k!r} is not a token id", "logit_bias")
        if not _is_num(b) or not -100 <= b <= 100:
            raise bad(f"'logit_bias' value for {k!r} must be a number in [-100, 100]", "logit_bias")
        out[tok] = float(b)
    return out


def parse_steering(v: Any) -> SteeringRequest | None:
    """The body's `steering` field (steering/request.py), its errors as 400s naming the field."""
    try:
        return steering_request.parse(v)
    except FieldError as e:
        raise APIError(str(e), 400, e.param) from None
