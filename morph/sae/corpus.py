"""The SAE training corpus: morph's own prompts plus the model's continuations of them.

Openings from `morph/data/corpus/prompts.jsonl` (18 genres, written for morph) are
continued by the model itself, many sequences at a time (batch.BatchRunner), and the
residual stream `l_out-L` of every token is captured during generation: prompt and
continuation tokens alike, so no second capture pass is needed.

Instruct models see each opening in three framings (raw continuation, the `rewrite` task
exactly as `morph steer` sends it, and a chat "continue this"), so the SAE learns the
activations steering will meet; base models (no chat template) get raw continuations.
Excluded: position 0 (attention sink, ~160x the median norm) and the chat template's
shared prefix (the same system prompt in every chat job would be thousands of identical
rows). Everything is deterministic given the seed: jobs are scheduled in a fixed order
and each sequence samples from its own generator.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from morph import tasks
from morph.errors import MorphError

PROMPTS = Path(__file__).resolve().parent.parent / "data" / "corpus" / "prompts.jsonl"
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
    tokens: int = 320_000  # activation rows to collect (after exclusions)
    seed: int = 0
    n_seq: int = 32  # sequences decoded together
    max_new: int = 256  # continuation length cap per job
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    max_prompt: int = 240  # prompt tokens kept per job (a chat prompt is ~150)


@dataclass
class Job:
    id: int
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

    def token_ids(self) -> np.ndarray:
        return np.array([self.docs[d]["tokens"][p] for d, p in zip(self.doc, self.pos)], np.int32)

    def save(self, path: Path) -> Path:
        """npz cache (activations as float16 halve the size; training re-casts to float32)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"acts_{L}": a.astype(np.float16) for L, a in self.acts.items()}
        meta = json.dumps({"docs": self.docs, "stats": self.stats})
        np.savez(path, doc=self.doc, pos=self.pos, meta=np.frombuffer(meta.encode(), np.uint8), **arrays)
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
            yield Job(jid, p["genre"], kind, toks, min(skips[kind], len(toks) - 1))
            jid += 1


def _looping(gen: list[int]) -> bool:
    """A degenerate repetition loop (few distinct tokens in the last 64)."""
    return len(gen) >= 64 and len(set(gen[-64:])) < 10


def build_corpus(
    engine,
    layers: list[int],
    cfg: CorpusConfig,
    prompts: list[dict] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Corpus:
    """Generate continuations and capture `l_out-L` for each layer until cfg.tokens rows."""
    from morph.sae.batch import BatchRunner, sample_rows

    prompts = prompts if prompts is not None else load_prompts()
    d = engine.n_embd
    target = int(cfg.tokens)
    acts = {L: np.empty((target, d), np.float32) for L in layers}
    row_doc = np.empty(target, np.int32)
    row_pos = np.empty(target, np.int32)
    n_rows = 0
    docs: list[dict] = []
    jobs = iter_jobs(engine, prompts, cfg.max_prompt)
    eog = engine._lc.llama_vocab_is_eog
    vocab = engine.llm._model.vocab
    n_ctx = cfg.n_seq * (cfg.max_prompt + cfg.max_new + 8)
    n_batch = max(512, cfg.n_seq + cfg.max_prompt)
    # slot -> [job, doc index, tokens fed so far, generated ids, next token, rng]
    slots: list[list | None] = [None] * cfg.n_seq
    waiting: Job | None = None  # next job, drawn but not yet placed
    counts = Counter()
    with BatchRunner(engine, n_seq=cfg.n_seq, n_ctx=n_ctx, n_batch=n_batch) as runner:
        while n_rows < target:
            toks, pos, seq, want = [], [], [], []
            for s, st in enumerate(slots):  # one decode token per running sequence
                if st is not None:
                    toks.append(st[4]); pos.append(st[2]); seq.append(s); want.append(True)
            for s in range(cfg.n_seq):  # start new jobs in free slots while the batch has room
                if slots[s] is not None:
                    continue
                if waiting is None:
                    waiting = next(jobs)
                job = waiting
                if len(toks) + len(job.tokens) > n_batch:
                    break
                waiting = None
                runner.clear(s)
                docs.append({"genre": job.genre, "kind": job.kind, "n_prompt": len(job.tokens),
                             "tokens": list(job.tokens)})
                slots[s] = [job, len(docs) - 1, 0, [], None, np.random.default_rng([cfg.seed, job.id])]
                n = len(job.tokens)
                toks += job.tokens; pos += range(n); seq += [s] * n
                want += [False] * (n - 1) + [True]
            logits, captured = runner.decode(toks, pos, seq, want, layers=layers)
            # Rows to keep: past the job's excluded prefix.
            keep = []
            for i, (s, p) in enumerate(zip(seq, pos)):
                if p >= slots[s][0].skip:
                    keep.append(i)
            keep = keep[: target - n_rows]
            if keep:
                k = np.asarray(keep)
                for L in layers:
                    acts[L][n_rows : n_rows + len(k)] = captured[L][k]
                row_doc[n_rows : n_rows + len(k)] = [slots[seq[i]][1] for i in keep]
                row_pos[n_rows : n_rows + len(k)] = [pos[i] for i in keep]
                n_rows += len(k)
                for i in keep:
                    counts["prompt" if pos[i] < docs[slots[seq[i]][1]]["n_prompt"] else "generated"] += 1
                if progress:
                    progress(len(k))
            # Sample the next token of every sequence that produced logits.
            out_slots = [s for s, w in zip(seq, want) if w]
            nxt = sample_rows(np.asarray(logits), [slots[s][5] for s in out_slots],
                              cfg.temperature, cfg.top_k, cfg.top_p)
            for s, t in zip(out_slots, nxt.tolist()):
                st = slots[s]
                st[2] = len(docs[st[1]]["tokens"])  # everything in the doc has been fed
                if eog(vocab, t) or len(st[3]) >= cfg.max_new or _looping(st[3]):
                    counts["stop_eog" if eog(vocab, t) else "stop_len" if len(st[3]) >= cfg.max_new else "stop_loop"] += 1
                    slots[s] = None
                    continue
                st[3].append(t)
                docs[st[1]]["tokens"].append(t)
                st[4] = t
    n_docs = len(docs)
    stats = {
        "rows": n_rows,
        "prompt_rows": counts["prompt"],
        "generated_rows": counts["generated"],
        "documents": n_docs,
        "by_kind": dict(Counter(d["kind"] for d in docs)),
        "rows_by_kind": dict(Counter(docs[i]["kind"] for i in row_doc[:n_rows])),
        "rows_by_genre": dict(sorted(Counter(docs[i]["genre"] for i in row_doc[:n_rows]).items())),
        "stops": {k: v for k, v in counts.items() if k.startswith("stop_")},
        "seed": cfg.seed,
        "sampling": {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
                     "max_new": cfg.max_new, "n_seq": cfg.n_seq},
    }
    return Corpus({L: a[:n_rows] for L, a in acts.items()}, row_doc[:n_rows], row_pos[:n_rows], docs, stats)
