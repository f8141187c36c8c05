"""The engine protocol: one request shape, one event stream, for every backend.

LlamaEngine (llama.cpp, CPU) and VllmEngine (--gpu) both implement `Engine`. Callers
(steer, editor, REPL, server) build a `Request`, iterate `engine.stream(request)` and get
`Event`s: text pieces with their token ids, and a final event carrying `Timings`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from morph.models import ModelInfo
from morph.steering.vector import ControlVector


# Where a request's steering vector is added: at every position (llama.cpp's control
# vector), or only while generating, with the prompt evaluated unsteered.
APPLY_MODES = ("all", "generated")


@dataclass
class Request:
    prompt: str | None = None  # raw text, continued as is
    messages: list[dict] | None = None  # chat turns, formatted with the model's template
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.0  # >1 discourages repeating the last `repeat_last_n` tokens
    repeat_last_n: int = 64
    seed: int | None = None
    stop: Sequence[str] = ()
    steering: ControlVector | None = None  # already combined and scaled
    apply: str = "all"  # one of APPLY_MODES
    # OpenAI sampling fields: logit_bias maps token id -> added logit (or is a dense
    # float array of n_vocab); the penalties subtract count * frequency_penalty and, once a
    # token has appeared, presence_penalty (over the last repeat_last_n tokens).
    logit_bias: Mapping[int, float] | np.ndarray | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    cancel: threading.Event | None = None  # set it to stop this stream at the next token
    add_bos: bool = True


@dataclass
class Timings:
    prompt_tokens: int = 0  # tokens in the prompt
    evaluated_tokens: int = 0  # prompt tokens actually evaluated (the rest came from KV)
    gen_tokens: int = 0
    ttft_s: float = 0.0  # request start -> first token sampled
    prompt_s: float = 0.0
    decode_s: float = 0.0  # first token -> last token
    total_s: float = 0.0

    @property
    def tok_per_s(self) -> float:
        """Decode speed over the tokens after the first."""
        n = self.gen_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "evaluated_tokens": self.evaluated_tokens,
            "gen_tokens": self.gen_tokens,
            "ttft_s": round(self.ttft_s, 5),
            "prompt_s": round(self.prompt_s, 5),
            "decode_s": round(self.decode_s, 5),
            "total_s": round(self.total_s, 5),
            "tok_per_s": round(self.tok_per_s, 2),
        }


@dataclass
class Event:
    text: str = ""
    token_ids: tuple[int, ...] = ()
    done: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" (on the final event)
    timings: Timings | None = None


@runtime_checkable
class Engine(Protocol):
    name: str
    info: ModelInfo

    @property
    def n_ctx(self) -> int: ...

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...

    def stream(self, request: Request) -> Iterator[Event]: ...

    def cancel(self) -> None:
        """Stop whatever stream is running now (thread-safe)."""
        ...

    def logits(self, text: str, steering: ControlVector | None = None) -> np.ndarray:
        """Next-token logits after `text` (used for tests and feature scoring)."""
        ...

    def close(self) -> None: ...


@dataclass
class Completion:
    """A stream drained into one value (for callers that do not stream)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    timings: Timings | None = None


def collect(events: Iterator[Event]) -> Completion:
    out = Completion()
    parts = []
    for ev in events:
        parts.append(ev.text)
        out.token_ids.extend(ev.token_ids)
        if ev.done:
            out.finish_reason = ev.finish_reason
            out.timings = ev.timings
    out.text = "".join(parts)
    return out
