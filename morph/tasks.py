"""How user text becomes a Request: the one place for prompt framings and generation defaults.

Every front end (`morph steer`, the REPL, the editor, the server, `morph eval`) builds its
requests here, so a mode means the same prompt, the same sampling and the same steering
placement everywhere. config.toml's `[generation]` and `[steering]` tables override the
defaults below; a command's own flags override config.

Framings: rewrite, continue, chat (the user-facing modes) and the editor's explain,
expand, compress and ghost (inline suggestion).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields, replace

from morph.engine.base import Request
from morph.errors import MorphError
from morph.steering.request import apply_factors

MODES = ("rewrite", "continue", "chat")
FRAMINGS = MODES + ("explain", "expand", "compress", "ghost")

REWRITE_SYSTEM = (
    "You are a writing assistant. Rewrite the user's text, keeping its meaning. "
    "Reply with the rewritten text only, no preamble."
)
CHAT_SYSTEM = "You are a helpful writing assistant."
WRITER_SYSTEM = "You are a writing assistant."
EXPLAIN_TOKENS = 80
TELESCOPE_TOKENS = 400  # cap for expand; compress needs fewer
CONTINUE_TOKENS = 256


@dataclass(frozen=True)
class Sampling:
    """Sampling defaults. The repeat penalty is on everywhere: the 135M model loops without it."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None


# What a framing changes from the shared sampling defaults, and why.
FRAMING_SAMPLING: dict[str, dict] = {
    # Inline suggestions: near-greedy and seeded, so the same context gives the same
    # suggestion (and tests are reproducible); a narrower nucleus keeps them on topic.
    "ghost": {"temperature": 0.2, "top_p": 0.9, "seed": 7},
    # Definitions and telescopic rewrites: low temperature, the answer should be plain.
    "explain": {"temperature": 0.2},
    "expand": {"temperature": 0.3},
    "compress": {"temperature": 0.3},
}

# Where the steering vector applies, per framing: "all" positions, only "generated"
# tokens (the prompt evaluated unsteered), or "prompt-scaled:F" (F x the vector on the
# prompt). Chosen on morph eval's tuning half (4 rewrite + 4 continue prompts, every
# feature x method at x0.5 and x1 of its default, in one tune-half results JSON;
# `morph eval --from tune.json` prints the comparison): per task, the placement under
# which the most features meet the goal at some scale.
#   rewrite:  prompt-scaled:0.25 3/21, all 2/21, generated 1/21 (all: NLL x2.2 on average,
#             relevance 0.91 x unsteered; prompt-scaled:0.25 and generated 1.5 and 0.96)
#   continue: all 7/21, prompt-scaled:0.25 5/21, generated 4/21
# chat, explain, expand and compress put the user's text in a chat turn like rewrite and
# take its placement; ghost continues raw text like continue and takes its (not measured
# on their own: the eval prompts are rewrite and continue).
REWRITE_APPLY = "prompt-scaled:0.25"
CONTINUE_APPLY = "all"
DEFAULT_APPLY: dict[str, str] = {f: CONTINUE_APPLY if f in ("continue", "ghost") else REWRITE_APPLY for f in FRAMINGS}


@dataclass(frozen=True)
class Defaults:
    sampling: Sampling = field(default_factory=Sampling)
    apply: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_APPLY))
    suggestion_tokens: int = 32

    def sampling_for(self, framing: str) -> dict:
        """Request keyword arguments for `framing` (framing-specific values win)."""
        base = {f.name: getattr(self.sampling, f.name) for f in fields(Sampling)}
        return base | FRAMING_SAMPLING.get(framing, {})


def defaults(config=None) -> Defaults:
    """The defaults with config.toml's `[generation]` and `[steering]` applied."""
    if config is None:
        return Defaults()
    known = {f.name for f in fields(Sampling)}
    sampling = replace(Sampling(), **{k: v for k, v in config.generation.items() if k in known})
    apply = dict(DEFAULT_APPLY)
    for k, v in config.apply.items():
        if k in apply and valid_apply(v):
            apply[k] = v
        else:
            print(f"morph: warning: config.toml: ignoring steering.apply.{k} = {v!r} (modes: "
                  f"{', '.join(FRAMINGS)}; values: all, generated, prompt-scaled[:F])", file=sys.stderr)
    return Defaults(sampling, apply, config.suggestion_tokens)


# The style instruction for each pole (morph eval's prompting baseline and the ladder's
# instructed rungs), in the task's own framing: "Rewrite this text <phrase>:" and, for
# continue, "(Written <phrase>.)" above the text.
STYLE_PHRASES = {
    "formal": "in a formal, polite, professional register",
    "casual": "in a casual, chatty register",
    "concise": "concisely, in as few words as possible",
    "elaborate": "in an elaborate, detailed, wordy style",
    "vivid": "vividly, with sensory, concrete imagery",
    "plain": "plainly and literally, without imagery",
    "technical": "in a technical register, with precise terms, numbers and units",
    "simple": "in simple everyday words a child could follow",
    "positive": "in a positive, enthusiastic, warm tone",
    "critical": "in a critical, skeptical, fault-finding tone",
    "poetic": "poetically, with rhythm and metaphor",
    "prosaic": "as matter-of-fact, literal prose",
}


def style_phrase(name: str, description: str = "") -> str:
    """How to ask for a feature in words: its phrase, else its description."""
    return STYLE_PHRASES.get(name) or f"in this style: {description or name}"



# --- framings: text -> prompt or messages ---------------------------------------------


def rewrite_messages(text: str, style: str | None = None) -> list[dict]:
    """`style` (e.g. "in a formal register") turns the request into a prompted rewrite."""
    ask = f"Rewrite this text {style.strip()}:" if style else "Rewrite this text:"
    return [
        {"role": "system", "content": REWRITE_SYSTEM},
        {"role": "user", "content": f"{ask}\n\n{text.strip()}"},
    ]


def chat_messages(text: str, history: list[dict] | None = None, system: str = CHAT_SYSTEM) -> list[dict]:
    return [{"role": "system", "content": system}, *(history or []), {"role": "user", "content": text}]


def explain_messages(word: str, sentence: str) -> list[dict]:
    # A one-sentence question explains best on SmolLM2-135M (greedy trials).
    return [{"role": "user", "content": f'What does "{word}" mean in the sentence "{sentence}"? '
                                        "Reply with a one-sentence definition."}]


def telescope_messages(kind: str, scope: str, text: str) -> tuple[list[dict], int]:
    """(messages, max_tokens) for expanding or compressing `text` (a sentence or paragraph).

    "longer and more descriptive" expands where "expand into a more detailed version"
    echoed the input; "at most N words" compresses (SmolLM2-135M trials).
    """
    n = len(text.split())
    if kind == "expand":
        msgs = [{"role": "system", "content": WRITER_SYSTEM},
                {"role": "user", "content": f"Make this {scope} longer and more descriptive:\n\n{text}"}]
        return msgs, min(TELESCOPE_TOKENS, int(n * 4) + 40)
    if kind != "compress":
        raise MorphError(f"unknown telescope kind {kind!r}")
    target = max(3, n // 2)
    msgs = [{"role": "user", "content": f"Shorten this {scope} to at most {target} words.\n\n{text}"}]
    return msgs, min(TELESCOPE_TOKENS // 2, int(n * 1.5) + 10)


def rewrite_max_tokens(n_input_tokens: int) -> int:
    """About twice the input: a rewrite has no reason to run much longer than its input."""
    return min(1024, 2 * n_input_tokens + 48)


# --- requests ----------------------------------------------------------------------------


def build_request(framing: str, text: str = "", *, defaults: Defaults | None = None,
                  history: list[dict] | None = None, word: str = "", scope: str = "sentence",
                  style: str | None = None, **overrides) -> Request:
    """The request for `text` in `framing`, with the shared defaults.

    `overrides` are Request fields given explicitly (a flag the user set, a request's own
    max_tokens...); None values are ignored so callers can pass optional flags through.
    `messages` among them replaces the framing's own turns (a server request's, as sent).
    `style` (e.g. "in a formal register") asks for a style in words, in the framing's own
    way: in the rewrite request, "(Written <style>.)" above a text to continue, an
    instruction in the system message of the other chat framings.
    """
    d = defaults or Defaults()
    if framing not in FRAMINGS:
        raise MorphError(f"unknown mode {framing!r} (choose: {', '.join(MODES)})")
    kw = d.sampling_for(framing) | {"apply": d.apply.get(framing, "all")}
    if framing == "rewrite":
        kw |= {"messages": rewrite_messages(text, style)}
    elif framing == "continue":
        kw |= {"prompt": styled_text(text, style), "max_tokens": CONTINUE_TOKENS}
    elif framing == "chat":
        kw |= {"messages": chat_messages(text, history)}
    elif framing == "explain":
        kw |= {"messages": explain_messages(word, text), "max_tokens": EXPLAIN_TOKENS}
    elif framing in ("expand", "compress"):
        msgs, n = telescope_messages(framing, scope, text)
        kw |= {"messages": msgs, "max_tokens": n}
    else:  # ghost: continue the text before the cursor, up to a blank line
        kw |= {"prompt": styled_text(text, style), "max_tokens": d.suggestion_tokens, "stop": ["\n\n"]}
    kw |= {k: v for k, v in overrides.items() if v is not None}
    if style and framing not in ("rewrite", "continue", "ghost"):  # also on messages given as an override
        kw["messages"] = styled_messages(kw["messages"], style)
    return Request(**kw)  # `apply` was checked where it came in (flags, config, a request body)


def styled_text(text: str, style: str | None) -> str:
    """A raw text to continue, with the style asked for above it."""
    return f"(Written {style.strip()}.)\n\n{text}" if style else text


def styled_messages(messages: list[dict], style: str) -> list[dict]:
    """Chat turns with "Write <style>." added to the system message (one is made if none)."""
    ask = f"Write {style.strip()}."
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']} {ask}"}, *messages[1:]]
    return [{"role": "system", "content": ask}, *messages]


def valid_apply(value) -> bool:
    try:
        apply_factors(value)
        return isinstance(value, str)
    except MorphError:
        return False
