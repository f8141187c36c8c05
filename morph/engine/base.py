"""The engine protocol: one request shape, one event stream, for every backend.

LlamaEngine (llama.cpp, CPU) and VllmEngine (--gpu) both implement `Engine`. Callers
(steer, editor, REPL, server) build a `Request`, iterate `engine.stream(request)` and get
`Event`s: text pieces with their token ids, and a final event carrying `Timings`.

Where the steering vector applies (`Request.apply`: "all", "generated", "prompt-scaled[:F]")
is one rule for every engine, `steering.request.apply_factors`; a cache entry is valid
only for the vector that produced it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from morph.steering.request import APPLY_MODES, PROMPT_SCALE, apply_factors  # noqa: F401 (engine API)

if TYPE_CHECKING:  # annotations only: the editor paints before numpy is imported
    import numpy as np

    from morph.models import ModelInfo
    from morph.steering.vector import ControlVector


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
    apply: str = "all"  # where `steering` applies: "all" | "generated" | "prompt-scaled[:F]" (APPLY_MODES)
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


EditFn = Callable[[int, "np.ndarray"], "np.ndarray | None"]  # (layer, acts) -> new acts or None


class BatchRunner(Protocol):
    """Many sequences decoded together in a context of their own (not the generation
    context), with residual capture and per-row edits at chosen blocks. Not thread-safe.
    Positions and sequence ids are the caller's; `clear` forgets cells."""

    engine: "Engine"  # the engine whose model it runs (tokenizer, end-of-generation tokens)
    n_seq: int  # sequences it holds
    n_ctx: int  # KV cells in all
    n_batch: int  # tokens per decode call at most
    n_embd: int
    n_layer: int
    n_vocab: int

    def clear(self, seq: int = -1) -> None:
        """Forget sequence `seq`'s cells (-1: all)."""
        ...

    def copy(self, src: int, dst: int, n: int) -> None:
        """Make sequence `dst` hold the first `n` positions of sequence `src`."""
        ...

    def decode(self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int], logits: Sequence[bool],
               layers: Sequence[int] = (), edit: EditFn | None = None,
               stop_after: bool = False) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Evaluate one batch: row i is token i at position pos[i] of sequence seq[i].
        Returns (logits of the rows with logits[i] true, in order, valid until the next
        call; {layer: (n, n_embd) output of that block for every row}). `edit(layer, acts)` may return replacement
        activations, which everything downstream sees. stop_after: end the graph after
        the deepest captured block (faster; logits and deeper cells are then garbage,
        so `clear` before reusing those sequences)."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> "BatchRunner": ...

    def __exit__(self, *exc) -> None: ...


@runtime_checkable
class Engine(Protocol):
    name: str
    info: ModelInfo
    # How many streams the engine serves at once: callers (the server) may call stream()
    # from that many threads together. 1: one at a time (llama.cpp's one context).
    max_streams: int

    @property
    def n_ctx(self) -> int: ...

    @property
    def n_embd(self) -> int:
        """Width of the residual stream."""
        ...

    @property
    def n_layer(self) -> int:
        """Transformer blocks; `direction.N` / `l_out-N` name block N (0-based)."""
        ...

    @property
    def n_vocab(self) -> int: ...

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]: ...

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        """Text of `ids`; special=True renders special tokens (e.g. `<|im_end|>`) as text."""
        ...

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends generation (EOS, end of turn, ...)."""
        ...

    def is_control(self, token: int) -> bool:
        """Whether `token` is a control token (`<|im_start|>`): tokenize() gives it only with special=True."""
        ...

    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...

    def prepare_tokens(self, request: Request) -> list[int]:
        """The prompt ids of `request`: its prompt, or its messages in the chat template, the
        template's control tokens parsed and message text as plain text (engine/chat.py)."""
        ...

    def stream(self, request: Request) -> Iterator[Event]: ...

    def cancel(self) -> None:
        """Stop whatever stream is running now (thread-safe)."""
        ...

    def logits(self, text: str, steering: ControlVector | None = None, apply: str = "all") -> np.ndarray:
        """Next-token logits after `text` under `steering` (the whole text is prompt, so
        apply="generated" gives the unsteered logits)."""
        ...

    def continuation_logprobs(self, prompt: str | Sequence[int], continuation: str | Sequence[int],
                              steering: ControlVector | None = None, apply: str = "all") -> np.ndarray:
        """log p of each token of `continuation` after `prompt` (text or token ids),
        teacher-forced; `prompt` positions get the prompt factor of `apply`, `continuation`
        ones the generation's."""
        ...

    def reset_cache(self) -> None:
        """Forget cached prompts, so the next request runs as in a fresh process."""
        ...

    def capture(self, texts: Sequence[str], layer: int, add_bos: bool = True,
                drop_first: bool = True) -> list[np.ndarray]:
        """Per text, the unsteered output of block `layer` (`l_out-<layer>`), (n_tokens,
        n_embd) float32; position 0 (the attention sink) dropped unless drop_first=False."""
        ...

    def logits_with_edit(self, text: str, layer: int,
                         edit: Callable[[np.ndarray], "np.ndarray | None"]) -> np.ndarray:
        """Next-token logits after `text` (unsteered) with block `layer`'s output replaced
        by `edit(acts)` (acts: (n_tokens, n_embd); None keeps them)."""
        ...

    def batch_runner(self, n_seq: int = 32, n_ctx: int = 8192, n_batch: int = 512,
                     unified: bool = True) -> BatchRunner:
        """A new multi-sequence context on this model (see BatchRunner); close it after use.
        unified=False gives each sequence its own KV stream (then a batch must be one
        sequence, or one token per sequence with consecutive ids)."""
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
