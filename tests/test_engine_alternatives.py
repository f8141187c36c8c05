"""LlamaEngine.alternatives: a suggestion's alternatives decoded together in scratch
sequences of the editor's engine (slots=2), on the real model with one thread.

What must hold: one llama_decode per step advances every live sequence by one token; the
seeds make the difference (and only they); greedy alternatives are `stream`'s greedy text;
a given continuation is scored as `continuation_logprobs` scores it; the scratch sequences
are gone afterwards, also after a cancel or an error; and the slot's cache stays right, so
a later stream reuses the prompt and gives what a fresh engine gives.
"""

from __future__ import annotations

import threading

import llama_cpp
import numpy as np
import pytest

from morph import tasks
from morph.engine.base import Request
from morph.engine.llama import LlamaEngine
from morph.errors import MorphError
from morph.steering.vector import ControlVector

PROMPT = ("The harbour was quiet in the early morning, and the boats rocked gently against the pier. "
          "She had kept the letters in a tin box for years, and")


@pytest.fixture(scope="module")
def eng(model_info):
    e = LlamaEngine(model_info, n_ctx=2048, threads=1, slots=2)
    yield e
    e.close()


class Decodes:
    """Records every llama_decode of an engine: the (sequence, position) of each batch row."""

    def __init__(self, engine, monkeypatch, fail_at: int | None = None, cancel_at: tuple | None = None):
        self.calls: list[list[tuple[int, int]]] = []
        ctx = engine.llm._ctx
        orig = ctx.decode

        def decode(batch):
            b = batch.batch
            self.calls.append([(b.seq_id[i][0], b.pos[i]) for i in range(b.n_tokens)])
            if fail_at is not None and len(self.calls) == fail_at:
                raise RuntimeError("decode failed (test)")
            if cancel_at is not None and len(self.calls) == cancel_at[0]:
                cancel_at[1].set()
            return orig(batch)

        monkeypatch.setattr(ctx, "decode", decode)

    def scratch(self, engine) -> list[list[tuple[int, int]]]:
        """The calls that decoded scratch sequences (not the slot's prompt)."""
        return [c for c in self.calls if any(s >= engine.slots for s, _ in c)]


def ghost(prompt=PROMPT, **kw) -> Request:
    kw.setdefault("max_tokens", 12)
    return tasks.build_request("ghost", prompt, **kw)


def scratch_empty(engine) -> bool:
    mem = llama_cpp.llama_get_memory(engine.llm._ctx.ctx)
    return all(llama_cpp.llama_memory_seq_pos_max(mem, s) == -1
               for s in range(engine.slots, engine.slots + engine.alt_seqs))


def test_one_decode_per_step_advances_every_live_sequence(eng, monkeypatch):
    req = ghost(temperature=0.8, stop=[])  # no stop: every sequence runs max_tokens
    list(eng.stream(req))  # the prompt is cached, as in the editor
    rec = Decodes(eng, monkeypatch)
    alts = eng.alternatives(req, [1, 2, 3])
    assert [len(a.ids) for a in alts] == [12, 12, 12] and all(a.finish == "length" for a in alts)
    steps = rec.scratch(eng)
    # The first token of each comes from the prompt's logits; then one call per step, each
    # with one token of every sequence, at that sequence's next position.
    assert len(steps) == 11
    base = eng.reusable(req)[0]
    for j, call in enumerate(steps):
        assert sorted(call) == [(s, base + j) for s in range(eng.slots, eng.slots + 3)]
    assert scratch_empty(eng)
    assert all(np.isfinite(a.logprobs).all() and len(a.logprobs) == 12 and a.mean_logprob < 0 for a in alts)


def test_seeds_make_the_difference(eng):
    req = ghost(temperature=0.8)
    a = eng.alternatives(req, [1, 2, 3, 1])
    texts = [x.text for x in a]
    assert len(set(texts[:3])) >= 2, texts  # different seeds: different continuations
    assert texts[3] == texts[0] and a[3].ids == a[0].ids  # the same seed again: the same one
    again = eng.alternatives(req, [2])
    assert again[0].text == texts[1]  # a sequence's text does not depend on its neighbours


def test_greedy_alternatives_are_streams_greedy_text(eng, model_info, greedy_agrees):
    fresh = LlamaEngine(model_info, n_ctx=2048, threads=1, slots=2)
    try:
        req = ghost(temperature=0.0, max_tokens=24, stop=[])
        want = [t for ev in fresh.stream(req) for t in ev.token_ids]
        text = "".join(ev.text for ev in fresh.stream(req))
        eng.reset_cache()
        alts = eng.alternatives(req, [5, 6])
        for a in alts:
            assert greedy_agrees(eng, PROMPT, want, a.ids) == len(want), (text, a.text)
            assert a.text == text
    finally:
        fresh.close()


def test_stop_rules_are_streams(eng):
    """The ghost's blank-line stop and end-of-generation end a sequence as they end a stream."""
    req = ghost("Shopping list:\n- milk\n- eggs\n- bread\n\nNotes:", temperature=0.0, max_tokens=40)
    streamed = [ev for ev in eng.stream(req)]
    text = "".join(ev.text for ev in streamed)
    alt = eng.alternatives(req, [1])[0]
    assert alt.text == text and alt.finish == streamed[-1].finish_reason
    assert "\n\n" not in alt.text


def test_a_given_continuation_is_scored_like_continuation_logprobs(eng, logit_atol):
    req = ghost(temperature=0.0, max_tokens=10, stop=[])
    ids = [t for ev in eng.stream(req) for t in ev.token_ids]
    given, alt = eng.alternatives(req, [1], known=[ids])
    assert given.finish == "given" and given.ids == ids and given.text == eng.detokenize(ids)
    want = eng.continuation_logprobs(PROMPT, ids)
    np.testing.assert_allclose(given.logprobs, want, atol=logit_atol)
    assert alt.ids == ids  # greedy: the same tokens, sampled beside it


def test_a_stream_after_alternatives_reuses_the_prompt_and_gives_a_fresh_engines_text(eng, model_info,
                                                                                       greedy_agrees):
    req = ghost(temperature=0.0, max_tokens=16, stop=[])
    eng.reset_cache()
    first = list(eng.stream(req))
    eng.alternatives(req, [1, 2, 3], known=[[t for ev in first for t in ev.token_ids]])
    n = eng.reusable(req)[0]
    assert eng.reusable(req) == (n, n)  # the slot holds the whole prompt still
    again = list(eng.stream(req))
    assert again[-1].timings.evaluated_tokens <= 1, again[-1].timings.as_dict()
    fresh = LlamaEngine(model_info, n_ctx=2048, threads=1, slots=2)
    try:
        want = [t for ev in fresh.stream(req) for t in ev.token_ids]
    finally:
        fresh.close()
    got = [t for ev in again for t in ev.token_ids]
    assert greedy_agrees(eng, PROMPT, want, got) == len(want)


def test_steering_placement_is_streams(eng, greedy_agrees):
    """Under "generated" the prompt's cells stay unsteered and every decoded token is steered,
    as in a stream: greedy alternatives give its text."""
    rng = np.random.default_rng(3)
    unit = {L: rng.standard_normal(eng.n_embd).astype(np.float32) for L in (12, 16)}
    cv = ControlVector({L: v / np.linalg.norm(v) * 40.0 for L, v in unit.items()}, "llama")  # ~0.3 x the residual
    plain = [t for ev in eng.stream(ghost(temperature=0.0, max_tokens=16, stop=[])) for t in ev.token_ids]
    for apply in ("generated", "all"):
        req = ghost(temperature=0.0, max_tokens=16, stop=[], steering=cv, apply=apply)
        eng.reset_cache()
        want = [t for ev in eng.stream(req) for t in ev.token_ids]
        assert want != plain  # the vector changes the text (else this test would show nothing)
        eng.reset_cache()
        got = eng.alternatives(req, [1])[0].ids
        assert greedy_agrees(eng, PROMPT, want, got, steering=cv, apply=apply) == len(want)


def test_cancel_and_errors_leave_no_scratch_sequences(eng, monkeypatch):
    req = ghost(temperature=0.8, max_tokens=30, stop=[])
    list(eng.stream(req))
    cancel = threading.Event()
    rec = Decodes(eng, monkeypatch, cancel_at=(3, cancel))
    out = eng.alternatives(req, [1, 2], cancel=cancel)
    assert all(a.finish == "cancelled" and len(a.ids) < 30 for a in out)
    assert len(rec.calls) <= 3 and scratch_empty(eng)
    monkeypatch.undo()
    Decodes(eng, monkeypatch, fail_at=2)
    with pytest.raises(RuntimeError):
        eng.alternatives(req, [1, 2])
    assert scratch_empty(eng)
    monkeypatch.undo()
    n = eng.reusable(req)[0]
    assert eng.reusable(req) == (n, n)
    assert [ev for ev in eng.stream(req)][-1].timings.evaluated_tokens <= 1


def test_limits(eng, engine):
    with pytest.raises(MorphError, match="at most"):
        eng.alternatives(ghost(), list(range(eng.alt_seqs + 1)))
    assert eng.alternatives(ghost(), []) == []
    assert engine.alt_seqs == 0  # a one-slot engine keeps no scratch sequences
    with pytest.raises(MorphError):
        engine.alternatives(ghost(), [1])
