"""The REPL's state: mode, steering profile, bounded chat context, transcript.

No terminal code here, so the app, the tests and a future frontend share it. Modes mean
what they mean in `morph steer` (morph/tasks.py): `chat` keeps a multi-turn conversation
(rendered with the model's chat template), `rewrite` and `continue` are one-shot and do
not enter the chat context. The context is bounded in tokens so that prompt + reply fit
engine.n_ctx: the oldest exchanges are dropped first, and the caller prints a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from morph import tasks
from morph.engine.base import Request
from morph.errors import MorphError
from morph.repl.log import SessionInfo, SessionLog, StoredTurn
from morph.steering.catalog import Catalog
from morph.steering.profile import Profile
from morph.steering.vector import ControlVector

MIN_REPLY_TOKENS = 16  # below this a reply is not worth starting: say the input is too long


@dataclass
class Turn:
    role: str  # user | assistant | note
    content: str
    mode: str
    features: dict[str, float]
    finish_reason: str | None = None  # assistant turns: stop | length | cancelled
    timings: dict | None = None
    chosen: dict | None = None  # a reply chosen from a ladder: choose.Choice.as_dict()


@dataclass
class Prepared:
    request: Request
    dropped: int = 0  # oldest chat exchanges dropped to fit the context
    prompt_tokens: int = 0


@dataclass
class Session:
    engine: object  # morph.engine.Engine
    catalog: Catalog
    model_name: str
    mode: str = "chat"
    max_tokens: int = 256
    defaults: tasks.Defaults = field(default_factory=tasks.Defaults)
    sampling: dict = field(default_factory=dict)  # flags given on the command line (None: default)
    log: SessionLog | None = None
    experimental: bool = False
    context: list[dict] = field(default_factory=list)  # chat messages after the system one
    transcript: list[Turn] = field(default_factory=list)
    features: Profile | None = None  # the active features (steering/profile.py)
    choose: bool = True  # rewrite mode at default strengths: choose among a ladder (morph/choose.py)

    def __post_init__(self):
        if self.features is None:
            self.features = Profile(self.catalog, self.engine.info, experimental=self.experimental)

    @property
    def profile(self) -> dict[str, float]:
        """The stored form: {"formal@sae": 0.3}."""
        return self.features.items

    # --- mode and features ------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        if mode not in tasks.MODES:
            raise MorphError(f"unknown mode {mode!r} (choose: {', '.join(tasks.MODES)})")
        if mode == "chat" or mode == "rewrite":
            if not getattr(self.engine.info, "has_chat_template", True):
                raise MorphError(f"{self.model_name} has no chat template: only `continue` works")
        self.mode = mode

    def steering(self) -> ControlVector | None:
        return self.features.vector()

    def rebind(self, engine, catalog, model_name: str) -> list[str]:
        """Another model: re-resolve the features against its catalog; returns what was dropped."""
        kept = dict(self.features.items)
        self.engine, self.catalog, self.model_name = engine, catalog, model_name
        self.features = Profile(catalog, engine.info, experimental=self.experimental)
        return self.features.load(kept, strict=False)

    def label(self) -> str:
        """What the prompt shows, e.g. `[formal=0.3] > ` or `rewrite> `."""
        feats = self.features.label()
        head = f"[{feats}] " if feats else ""
        return head + ("" if self.mode == "chat" else self.mode) + "> "

    # --- requests ---------------------------------------------------------------------

    def _count(self, req: Request) -> int:
        if req.messages is None and req.prompt is None:
            return 0
        return len(self.engine.prepare_tokens(req))  # what the engine will evaluate

    def prepare(self, text: str) -> Prepared:
        """The request for `text` in the current mode, bounded to the context window."""
        kw = dict(self.sampling, max_tokens=self.max_tokens, steering=self.steering())
        n_ctx = self.engine.n_ctx
        dropped = 0
        while True:
            req = tasks.build_request(self.mode, text, defaults=self.defaults,
                                      history=self.context if self.mode == "chat" else None, **kw)
            n = self._count(req)
            if self.mode != "chat" or n + self.max_tokens <= n_ctx or not self.context:
                break
            self._drop_oldest()
            dropped += 1
        room = n_ctx - n
        if room < MIN_REPLY_TOKENS:
            raise MorphError(f"input is {n} tokens; the context holds {n_ctx}: shorten it")
        req.max_tokens = min(self.max_tokens, room)
        return Prepared(req, dropped, n)

    def _drop_oldest(self) -> None:
        """Drop the oldest exchange (a user message and the reply after it)."""
        del self.context[0]
        while self.context and self.context[0]["role"] != "user":
            del self.context[0]

    # --- recording --------------------------------------------------------------------

    def commit(self, text: str, reply: str, finish: str | None, timings: dict | None, dropped: int = 0,
               chosen: dict | None = None) -> None:
        """Record a finished (or cancelled) exchange in context, transcript and log."""
        feats = dict(self.profile)
        rows = []
        if dropped:
            msg = f"dropped {dropped} oldest exchange{'s' if dropped > 1 else ''} to fit the context"
            self.transcript.append(Turn("note", msg, self.mode, feats))
            rows.append(("note", msg, feats, {"event": "drop", "n": dropped}, None))
        self.transcript.append(Turn("user", text, self.mode, feats))
        self.transcript.append(Turn("assistant", reply, self.mode, feats, finish, timings, chosen))
        if self.mode == "chat" and (reply or finish != "cancelled"):
            self.context += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        rows.append(("user", text, feats, {"mode": self.mode}, None))
        rows.append(("assistant", reply, feats,
                     {"mode": self.mode, "finish_reason": finish, **(timings or {})}, chosen))
        if self.log:
            self.log.turns(rows, self.mode, feats)

    def clear(self) -> None:
        self.context = []
        self.transcript.append(Turn("note", "context cleared", self.mode, dict(self.profile)))
        if self.log and self.log.session_id is not None:
            self.log.turns([("note", "context cleared", dict(self.profile), {"event": "clear"}, None)],
                           self.mode, dict(self.profile))

    def last_reply(self) -> str | None:
        for t in reversed(self.transcript):
            if t.role == "assistant":
                return t.content
        return None

    def transcript_text(self) -> str:
        out = []
        for t in self.transcript:
            if t.role == "user":
                out.append(f"## you ({t.mode})\n\n{t.content.strip()}\n")
            elif t.role == "assistant":
                feats = ", ".join(f"{k}={v:g}" for k, v in t.features.items()) or "no features"
                mark = " [cancelled]" if t.finish_reason == "cancelled" else ""
                out.append(f"## morph ({feats}){mark}\n\n{t.content.strip()}\n")
            else:
                out.append(f"_({t.content})_\n")
        return "\n".join(out)

    # --- resume -----------------------------------------------------------------------

    def restore(self, info: SessionInfo, turns: list[StoredTurn]) -> list[str]:
        """Rebuild mode, features, context and transcript from a logged session.

        Returns warnings (features that no longer exist are skipped, not fatal).
        """
        warnings = []
        last_feats = info.features
        for t in turns:
            mode = t.meta.get("mode", "chat")
            if t.role == "note":
                ev = t.meta.get("event")
                if ev == "clear":
                    self.context = []
                elif ev == "drop":
                    for _ in range(int(t.meta.get("n", 1))):
                        if self.context:
                            self._drop_oldest()
                self.transcript.append(Turn("note", t.content, mode, t.features))
                continue
            finish = t.meta.get("finish_reason")
            self.transcript.append(Turn(t.role, t.content, mode, t.features, finish, None))
            if mode == "chat" and t.role == "user":
                self.context.append({"role": "user", "content": t.content})
            elif mode == "chat" and t.role == "assistant":
                if t.content or finish != "cancelled":  # as in commit()
                    self.context.append({"role": "assistant", "content": t.content})
                elif self.context and self.context[-1]["role"] == "user":
                    self.context.pop()
            last_feats = t.features
        try:
            self.set_mode(info.mode)
        except MorphError as e:
            warnings.append(str(e))
        self.features.clear()
        warnings += [f"feature not restored: {w}" for w in self.features.load(last_feats, strict=False)]
        if self.log is not None:
            self.log.session_id = info.id
        return warnings

