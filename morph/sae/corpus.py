"""The SAE training corpus: morph's own prompts plus the model's continuations of them.

Openings from `morph/data/corpus/prompts.jsonl` (18 genres, written for morph) are
continued by the model itself, many sequences at a time (`engine.batch_runner`), and the
residual stream `l_out-L` of every token is captured during generation: prompt and
continuation tokens alike, so no second capture pass is needed.

Generation is the slow part (~250 tokens/s batched on 2 cores), so text the model
generated once can be shipped with morph (`morph/data/corpus/text/<model-id>.jsonl.gz`,
written by `morph vectors corpus`) and only read again: a build then spends its time on
distinct text instead of re-reading the same text many times (`capture_text`).

Instruct models see each opening in three framings (raw continuation, the `rewrite` task
exactly as `morph steer` sends it, and a chat "continue this"), so the SAE learns the
activations steering will meet; base models (no chat template) get raw continuations.
Excluded: position 0 (attention sink, ~160x the median norm) and the chat template's
shared prefix (the same system prompt in every chat job would be thousands of identical
rows). Everything is deterministic given the seed: jobs are scheduled in a fixed order
and each sequence samples from its own generator.
"""

from __future__ import annotations

import gzip
import itertools
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from morph import fsutil, tasks
from morph.engine import generate as engine_generate
from morph.errors import MorphError

PROMPTS = Path(__file__).resolve().parent.parent / "data" / "corpus" / "prompts.jsonl"
TEXT_DIR = PROMPTS.parent / "text"
OUTLIER = 4.0  # rows whose norm exceeds this multiple of the median are sinks, not text
CONTINUE_USER = "Continue this text:\n\n{text}"


def load_prompts(path: Path = PROMPTS) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if line.strip():
                d = json.loads(line)
                if not d.get("text"):
                    raise MorphError(f"{path}:{i + 1}: prompt without text")
                out.append({"genre": d.get("genre", "?"), "text": d["text"]})
    if not out:
        raise MorphError(f"{path}: no prompts")
    return out


@dataclass
class CorpusConfig:
    tokens: int = 300_000  # activation rows to collect (after exclusions)
    seed: int = 0
    n_seq: int = 32  # sequences decoded together
    max_new: int = 256  # continuation length cap per job
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    max_prompt: int = 240  # prompt tokens kept per job (a chat prompt is ~150)
    # Share of rows taken by re-capturing generated text in another framing (see reframe).
    reframe: float = 0.65


@dataclass
class Job:
    id: int
    prompt: int  # index into the prompts
    genre: str
    kind: str  # "raw" | "rewrite" | "chat"
    tokens: list[int]
    skip: int  # positions before this are not collected


@dataclass
class Corpus:
    """Activations per layer with, for every row, the document and position it came from."""

    acts: dict[int, np.ndarray]  # layer -> (N, n_embd) float32
    doc: np.ndarray  # (N,) int32, index into docs
    pos: np.ndarray  # (N,) int32, position in the document's tokens
    docs: list[dict] = field(default_factory=list)  # genre, kind, n_prompt, tokens
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.doc)

    def groups(self) -> np.ndarray:
        """Per row, the generated document it derives from (reframed copies share their
        source's id), so a held-out split never sees a copy of a training text."""
        src = np.array([d.get("src", i) for i, d in enumerate(self.docs)], np.int32)
        return src[self.doc]

    def token_ids(self) -> np.ndarray:
        return np.array([self.docs[d]["tokens"][p] for d, p in zip(self.doc, self.pos)], np.int32)

    def save(self, path: Path) -> Path:
        """npz cache (activations as float16 halve the size; training re-casts to float32),
        written atomically at exactly `path` (a half-written cache would be loaded later)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"acts_{L}": a.astype(np.float16) for L, a in self.acts.items()}
        meta = json.dumps({"docs": self.docs, "stats": self.stats})
        with fsutil.replacing(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, doc=self.doc, pos=self.pos, meta=np.frombuffer(meta.encode(), np.uint8), **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> "Corpus":
        z = np.load(path)
        meta = json.loads(bytes(z["meta"]).decode())
        acts = {int(k[5:]): z[k].astype(np.float32) for k in z.files if k.startswith("acts_")}
        return cls(acts, z["doc"], z["pos"], meta["docs"], meta["stats"])


def chat_kinds(engine) -> list[str]:
    return ["raw", "rewrite", "chat"] if engine.info.has_chat_template else ["raw"]


def job_tokens(engine, kind: str, text: str) -> list[int]:
    if kind == "raw":
        return engine.tokenize(text)
    if kind == "rewrite":
        msgs = tasks.rewrite_messages(text)
    elif kind == "chat":
        msgs = [{"role": "system", "content": tasks.CHAT_SYSTEM},
                {"role": "user", "content": CONTINUE_USER.format(text=text)}]
    else:
        raise ValueError(kind)
    return engine.tokenize(engine.format_chat(msgs), add_bos=False, special=True)


def shared_prefix(engine, kind: str) -> int:
    """How many leading tokens every job of this kind shares (template + system prompt)."""
    if kind == "raw":
        return 1  # position 0: BOS or the first word, the attention sink either way
    a = job_tokens(engine, kind, "Alpha beta.")
    b = job_tokens(engine, kind, "Zulu yankee.")
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return max(n, 1)


def iter_jobs(engine, prompts: list[dict], max_prompt: int) -> Iterator[Job]:
    """Endless fixed-order job stream: every prompt in every framing, rotating framings."""
    kinds = chat_kinds(engine)
    skips = {k: shared_prefix(engine, k) for k in kinds}
    jid = 0
    for rep in itertools.count():
        for i, p in enumerate(prompts):
            kind = kinds[(i + rep) % len(kinds)]
            toks = job_tokens(engine, kind, p["text"])[:max_prompt]
            yield Job(jid, i, p["genre"], kind, toks, min(skips[kind], len(toks) - 1))
            jid += 1


def _n_seq(cfg: CorpusConfig, rows: int) -> int:
    """Sequences decoded together for a generation pass of `rows` rows: small budgets get
    fewer, else the prompts alone (~100 rows each) would fill them."""
    return max(1, min(cfg.n_seq, rows // 400))


def _looping(gen: list[int]) -> bool:
    """A degenerate repetition loop (few distinct tokens in the last 64)."""
    return len(gen) >= 64 and len(set(gen[-64:])) < 10


class _Rows:
    """The corpus rows being filled: activations per layer, each row's document and position."""

    def __init__(self, layers: list[int], total: int, n_embd: int, progress: Callable[[int], None] | None):
        self.acts = {L: np.empty((total, n_embd), np.float32) for L in layers}
        self.doc = np.empty(total, np.int32)
        self.pos = np.empty(total, np.int32)
        self.n = 0
        self.progress = progress

    def add(self, captured: dict[int, np.ndarray], batch_rows: np.ndarray, doc, pos) -> None:
        """Append the captured batch rows `batch_rows`, from documents `doc` at positions `pos`."""
        m = len(batch_rows)
        for L, a in self.acts.items():
            a[self.n : self.n + m] = captured[L][batch_rows]
        self.doc[self.n : self.n + m] = doc
        self.pos[self.n : self.n + m] = pos
        self.n += m
        if self.progress:
            self.progress(m)


class _Generation:
    """The generation pass: up to `n_seq` jobs at a time through engine/generate.py, their
    rows captured as they are evaluated, until the row budget is reached."""

    def __init__(self, engine, layers: list[int], cfg: CorpusConfig, jobs: Iterator[Job], docs: list[dict],
                 rows: _Rows, n_seq: int):
        self.engine, self.layers, self.cfg, self.jobs, self.docs, self.rows = engine, layers, cfg, jobs, docs, rows
        self.n_seq = n_seq
        self.per_seq = -(-(cfg.max_prompt + cfg.max_new + 8) // 256) * 256  # llama.cpp pads n_ctx to 256
        self.counts: Counter = Counter()

    def run(self, limit: int) -> None:
        """Decode until `limit` rows; jobs still running at the end stop where they are."""
        if self.rows.n >= limit:
            return
        cfg, full = self.cfg, threading.Event()
        taken: list[Job] = []  # generate's job index -> the corpus job
        doc_of: dict[int, int] = {}  # generate's job index -> its document

        def jobs():
            for job in self.jobs:
                taken.append(job)
                yield engine_generate.Job(job.tokens, max_tokens=cfg.max_new + 1, temperature=cfg.temperature,
                                          top_p=cfg.top_p, top_k=cfg.top_k, seed=[cfg.seed, job.id],
                                          capture=self.layers, until=lambda ids: _looping(ids[:-1]))

        def on_rows(i: int, pos: np.ndarray, acts: dict[int, np.ndarray]) -> None:
            job = taken[i]
            if i not in doc_of:  # its prompt: the document starts
                self.docs.append({"genre": job.genre, "kind": job.kind, "n_prompt": len(job.tokens),
                                  "tokens": list(job.tokens), "prompt": job.prompt})
                doc_of[i] = len(self.docs) - 1
            keep = np.flatnonzero(pos >= job.skip)[: limit - self.rows.n]
            if len(keep):
                self.rows.add(acts, keep, doc_of[i], pos[keep])
            if self.rows.n >= limit:
                full.set()

        def on_done(i: int, out) -> None:
            doc = self.docs[doc_of[i]]
            # The last sampled token was evaluated (and captured) unless the job ended on it.
            gen = out.ids[:-1] if out.finish in ("length", "until") else out.ids
            doc["tokens"] = doc["tokens"][: doc["n_prompt"]] + gen
            if out.finish != "cancelled":
                self.counts[{"stop": "stop_eog", "length": "stop_length", "until": "stop_loop"}[out.finish]] += 1

        with self.engine.batch_runner(n_seq=self.n_seq, n_ctx=self.n_seq * self.per_seq,
                                      n_batch=max(cfg.max_prompt, self.n_seq), unified=False) as runner:
            engine_generate.generate(runner, jobs(), cancel=full, on_rows=on_rows, on_done=on_done,
                                     prompt_chunk=None)


def build_corpus(
    engine,
    layers: list[int],
    cfg: CorpusConfig,
    prompts: list[dict] | None = None,
    progress: Callable[[int], None] | None = None,
    text: list[dict] | None = None,
) -> Corpus:
    """Generate continuations and capture `l_out-L` for each layer until cfg.tokens rows.

    With `text` (documents from `load_text`, generated once by this model), those are read
    first; generation then only makes up what they lack of the generation pass's share.

    Each sequence has its own KV stream (no cross-sequence attention cost); a new job's
    prompt is evaluated in a call of its own, then every running sequence advances by one
    token per call (consecutive sequence ids, so llama.cpp keeps the batch order). Then the
    generated text is re-read in other framings (`_reframe`) up to the requested rows.
    """
    prompts = prompts if prompts is not None else load_prompts()
    total = int(cfg.tokens)
    rows = _Rows(layers, total, engine.n_embd, progress)
    docs: list[dict] = []
    target = total - int(round(cfg.reframe * total))  # rows from the generation pass
    if text:
        capture_text(engine, prompts, text, docs, rows, total, cfg.max_prompt)
    n_text = rows.n
    gen = _Generation(engine, layers, cfg, iter_jobs(engine, prompts, cfg.max_prompt), docs, rows,
                      n_seq=_n_seq(cfg, target - n_text))
    if rows.n < target:
        gen.run(target)
    _reframe(engine, docs, rows, total)
    if rows.n < total:  # too little generated text to re-read (small budgets): generate the rest
        gen.run(total)
    n_generated = sum(1 for d in docs if not d["kind"].startswith(("reframe", "text")))
    stats = {
        "documents_generated": n_generated,
        "text_documents": sum(1 for d in docs if d["kind"].startswith("text")),
        "stops": {k: v for k, v in gen.counts.items() if k.startswith("stop_")},
        "excluded": "position 0 of every document; the shared chat-template prefix of chat jobs; "
                    f"rows above {OUTLIER}x the median norm",
        "seed": cfg.seed,
        "requested": total,
        "sampling": {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
                     "max_new": cfg.max_new, "n_seq": gen.n_seq} if n_generated else None,
        "reframe": cfg.reframe,
    }
    n = rows.n
    corp = Corpus({L: a[:n] for L, a in rows.acts.items()}, rows.doc[:n], rows.pos[:n], docs, stats)
    return drop_outliers(corp)


def _reframings(engine, src: dict, rnd: int) -> tuple[list[int], int, str] | None:
    """Round `rnd` of re-framing one generated document: (tokens, rows to skip, kind).

    Chat models: a raw continuation (opening + generated text) goes into the rewrite
    request exactly as `morph steer` sends user text, and its generated part alone becomes
    a plain document; a chat or rewrite answer becomes a plain document, then the text of
    a rewrite request. Later rounds (and base models) use the generated text from a later
    start, i.e. with less context.
    """
    gen = src["tokens"][src.get("n_head", src["n_prompt"]):]  # text docs: after the opening
    if len(gen) < 16:
        return None
    chat = engine.info.has_chat_template
    kind = src["kind"].removeprefix("text:")
    if chat and rnd < 2:
        if (kind == "raw") == (rnd == 0):
            text = engine.detokenize(src["tokens"] if kind == "raw" else gen)
            return job_tokens(engine, "rewrite", text), shared_prefix(engine, "rewrite"), f"reframe:{kind}>rewrite"
        return engine.tokenize(engine.detokenize(gen)), 1, f"reframe:{kind}>raw"
    cut = len(gen) * (rnd - (1 if chat else 0)) // 4  # chat: 1/4; base: 0, 1/4, 2/4
    if len(gen) - cut < 16:
        return None
    return engine.tokenize(engine.detokenize(gen[cut:])), 1, f"reframe:{kind}>raw@{cut}"


class _Capture:
    """Read whole documents (no sampling) in batches of up to `n_batch` tokens, capture
    stopping at the deepest layer (no logits needed: ~2.3x cheaper per row than generating),
    and add their rows from position `docs[d]["n_prompt"]` on, up to `total` rows."""

    n_batch = 1024

    def __init__(self, runner, docs: list[dict], rows: _Rows, total: int):
        self.runner, self.docs, self.rows, self.total = runner, docs, rows, total
        self.pending: list[tuple[list[int], int]] = []  # (tokens, doc index)

    def add(self, doc: dict) -> None:
        self.docs.append(doc)
        toks = doc["tokens"]
        if sum(len(t) for t, _ in self.pending) + len(toks) > self.n_batch or len(self.pending) == 16:
            self.flush()
        self.pending.append((toks, len(self.docs) - 1))

    def flush(self) -> None:
        if not self.pending or self.rows.n >= self.total:
            self.pending.clear()
            return
        toks, pos, seq = [], [], []
        for s, (t, _) in enumerate(self.pending):
            toks += t; pos += range(len(t)); seq += [s] * len(t)
        self.runner.clear()
        _, cap = self.runner.decode(toks, pos, seq, [False] * len(toks), layers=list(self.rows.acts),
                                    stop_after=True)
        off = 0
        for t, d in self.pending:
            skip = self.docs[d]["n_prompt"]
            r = np.asarray(list(range(off + skip, off + len(t)))[: self.total - self.rows.n], dtype=np.int64)
            if len(r):
                self.rows.add(cap, r, d, r - off)
            off += len(t)
        self.pending.clear()


def _reframe(engine, docs: list[dict], rows: _Rows, total: int) -> None:
    """Fill rows up to `total` with the model's own text seen in other framings.

    The tokens are the model's own, the contexts new.
    """
    if rows.n >= total:
        return
    sources = [d for d in range(len(docs))]
    with engine.batch_runner(n_seq=16, n_ctx=_Capture.n_batch, n_batch=_Capture.n_batch, unified=True) as runner:
        cap = _Capture(runner, docs, rows, total)
        for rnd in range(3):
            for d in sources:
                if rows.n >= total:
                    break
                got = _reframings(engine, docs[d], rnd)
                if got is None:
                    continue
                toks, skip, kind = got
                toks = toks[: _Capture.n_batch // 2]
                if len(toks) <= skip:
                    continue
                cap.add({"genre": docs[d]["genre"], "kind": kind, "n_prompt": skip, "tokens": toks, "src": d})
        cap.flush()


def capture_text(engine, prompts: list[dict], text: list[dict], docs: list[dict], rows: _Rows, total: int,
                 max_prompt: int) -> None:
    """Read shipped generated text in the framing it was generated in: the opening's job
    tokens (as generation saw them), then the generated text. Rows from the end of the
    template's shared prefix on, as in generation."""
    kinds = set(chat_kinds(engine))
    skips = {k: shared_prefix(engine, k) for k in kinds}
    with engine.batch_runner(n_seq=16, n_ctx=_Capture.n_batch, n_batch=_Capture.n_batch, unified=True) as runner:
        cap = _Capture(runner, docs, rows, total)
        for t in text:
            if rows.n >= total:
                break
            kind = t["kind"] if t["kind"] in kinds else "raw"
            if not 0 <= t["prompt"] < len(prompts):
                raise MorphError(f"corpus text names opening {t['prompt']}, which is not in the prompts")
            head = job_tokens(engine, kind, prompts[t["prompt"]]["text"])[:max_prompt]
            toks = (head + engine.tokenize(t["text"], add_bos=False))[: _Capture.n_batch // 2]
            n_prompt = min(len(head), len(toks) - 1)
            cap.add({"genre": t["genre"], "kind": f"text:{kind}", "n_prompt": min(skips[kind], n_prompt),
                     "n_head": n_prompt, "tokens": toks, "prompt": t["prompt"]})
        cap.flush()


def generate_text(engine, cfg: CorpusConfig, prompts: list[dict] | None = None,
                  progress: Callable[[int], None] | None = None) -> tuple[list[dict], dict]:
    """The generation pass alone (nothing captured): `cfg.tokens` tokens (openings plus
    continuations) as documents {genre, kind, prompt, text} for `save_text`, and stop counts."""
    prompts = prompts if prompts is not None else load_prompts()
    rows = _Rows([], int(cfg.tokens), engine.n_embd, progress)
    docs: list[dict] = []
    gen = _Generation(engine, [], cfg, iter_jobs(engine, prompts, cfg.max_prompt), docs, rows,
                      n_seq=_n_seq(cfg, int(cfg.tokens)))
    gen.run(int(cfg.tokens))
    out = [{"genre": d["genre"], "kind": d["kind"], "prompt": d["prompt"],
            "text": engine.detokenize(d["tokens"][d["n_prompt"]:])} for d in docs]
    return [d for d in out if d["text"].strip()], dict(gen.counts)


def text_path(model_id: str) -> Path:
    return TEXT_DIR / f"{model_id}.jsonl.gz"


def save_text(path: Path, docs: list[dict], meta: dict) -> Path:
    """gzip JSONL, a header line {"meta": ...} then one document per line; atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"meta": meta})] + [json.dumps(d, ensure_ascii=False) for d in docs]
    with fsutil.replacing(path) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def load_text(path: Path) -> tuple[list[dict], dict]:
    """(documents, meta) from `save_text`'s file; a malformed one is a MorphError."""
    docs, meta = [], {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                d = json.loads(line)
                if i == 0 and "meta" in d:
                    meta = d["meta"]
                    continue
                if not isinstance(d.get("text"), str) or not isinstance(d.get("prompt"), int):
                    raise MorphError(f"{path}:{i + 1}: a corpus text needs 'text' and 'prompt'")
                docs.append({"genre": str(d.get("genre", "?")), "kind": str(d.get("kind", "raw")),
                             "prompt": d["prompt"], "text": d["text"]})
    except (OSError, EOFError, ValueError) as e:
        raise MorphError(f"{path}: not a corpus text file ({e})") from None
    return docs, meta


def drop_outliers(c: Corpus, factor: float = OUTLIER) -> Corpus:
    """Drop rows with a giant norm at any layer. Without a BOS token the attention sink
    sometimes sits at position 1 or on a lone space (norms of 3,000-24,000 against a
    median of ~175 at block 16); a handful of such rows would dominate the SAE's loss."""
    keep = np.ones(len(c), bool)
    for a in c.acts.values():
        n = np.linalg.norm(a, axis=1)
        keep &= n <= factor * np.median(n)
    c.stats["outliers_dropped"] = int((~keep).sum())
    if not keep.all():
        c = Corpus({L: a[keep] for L, a in c.acts.items()}, c.doc[keep], c.pos[keep], c.docs, c.stats)
    c.stats.update(row_stats(c))
    return c


def row_stats(c: Corpus) -> dict:
    """Where the rows come from: prompt text, generated text, generated text reframed."""
    src = Counter()
    kinds, genres = Counter(), Counter()
    for d, p in zip(c.doc.tolist(), c.pos.tolist()):
        doc = c.docs[d]
        kinds[doc["kind"].split("@")[0]] += 1  # "reframe:raw>raw@64": the tail from token 64
        genres[doc["genre"]] += 1
        if doc["kind"].startswith("reframe"):
            src["reframed_rows"] += 1
        elif doc["kind"].startswith("text"):
            src["text_rows"] += 1
        else:
            src["prompt_rows" if p < doc["n_prompt"] else "generated_rows"] += 1
    return {"rows": len(c), "prompt_rows": src["prompt_rows"], "generated_rows": src["generated_rows"],
            "reframed_rows": src["reframed_rows"], "text_rows": src["text_rows"], "documents": len(c.docs),
            "rows_by_kind": dict(sorted(kinds.items())), "rows_by_genre": dict(sorted(genres.items()))}
