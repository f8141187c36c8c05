"""LlamaEngine with two KV sequences (the editor's): prefill, reuse from either sequence,
and a cached prompt's cells exported and imported, on the real model.

Logits are compared exactly where the same tokens meet the same kernels in the same chunks
(a prompt prefilled beside another against the same prompt prefilled alone; an imported
state against the engine it came from). Against a fresh context, which evaluates the prompt
in other chunk sizes, they differ by rounding (mean absolute logit difference ~0.08 on
this model, issue 23), so that comparison uses a tolerance that the wrong prompt is far
outside (~1.7; checked in the test itself).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from morph.engine import llama as llama_mod
from morph.engine.base import Request
from morph.engine.llama import LlamaEngine

HARBOUR = " ".join(
    "The fishing boats came back to the harbour at dusk, and the nets were hung to dry "
    "along the stone wall while the gulls argued over what was left."
    for _ in range(4)
)
LEDGER = " ".join(
    "The committee reviewed the quarterly ledger line by line and asked the treasurer "
    "to explain why the printing costs had doubled since the spring."
    for _ in range(4)
)


@pytest.fixture(scope="module")
def slots2(model_info):
    eng = LlamaEngine(model_info, n_ctx=2048, threads=1, slots=2)
    yield eng
    eng.close()


def _req(prompt: str, **kw) -> Request:
    return Request(prompt=prompt, max_tokens=kw.pop("max_tokens", 8), temperature=0.0, **kw)


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two logit vectors (each up to a constant)."""
    d = a.astype(np.float64) - b
    return float(np.abs(d - d.mean()).mean())


TOL = 0.3  # rounding from other chunk sizes stays well below this


class StopAfter(threading.Event):
    """A cancel flag that turns on after it was asked `n` times (a chunk boundary)."""

    def __init__(self, n: int):
        super().__init__()
        self.left = n

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_two_prompts_stay_cached_and_streams_reuse_either(slots2, engine):
    slots2.reset_cache()
    a, b = _req(HARBOUR), _req(LEDGER)
    assert slots2.prefill(a) and slots2.prefill(b)
    n_a, n_b = slots2.reusable(a)[0], slots2.reusable(b)[0]
    assert slots2.reusable(a) == (n_a, n_a) and slots2.reusable(b) == (n_b, n_b)
    # A stream continuing either one evaluates only its new tokens, and the other stays.
    for prompt, other in ((HARBOUR, b), (LEDGER, a)):
        done = [ev for ev in slots2.stream(_req(prompt + " Then")) if ev.done][0]
        assert done.timings.evaluated_tokens <= 3, done.timings.as_dict()
        assert slots2.reusable(other)[1] == slots2.reusable(other)[0]
    # The reused cells are the right ones. LEDGER prefilled beside HARBOUR gives the very
    # logits it gives prefilled alone; both are near a fresh context's, and the other
    # prompt's are nowhere near.
    beside = slots2.logits(LEDGER + " Then")
    slots2.reset_cache()
    assert slots2.prefill(b)
    assert np.array_equal(slots2.logits(LEDGER + " Then"), beside)
    engine.reset_cache()
    fresh_a, fresh_b = engine.logits(HARBOUR + " Then"), engine.logits(LEDGER + " Then")
    assert _dist(fresh_a, fresh_b) > 5 * TOL
    assert _dist(beside, fresh_b) < TOL
    assert slots2.prefill(a)
    assert _dist(slots2.logits(HARBOUR + " Then"), fresh_a) < TOL
    # A third prompt replaces the one used less recently (HARBOUR was used last).
    assert slots2.prefill(_req("A completely different opening about mountains and snow."))
    assert slots2.reusable(a)[1] == slots2.reusable(a)[0]
    assert slots2.reusable(b)[1] <= 1  # gone (only "The", HARBOUR's first token, matches)


def test_a_stopped_prefill_keeps_its_progress(slots2):
    slots2.reset_cache()
    n = slots2.reusable(_req(HARBOUR))[0]
    assert n > 3 * llama_mod.PREFILL_CHUNK
    stopped = _req(HARBOUR, cancel=StopAfter(2))
    assert not slots2.prefill(stopped)
    assert slots2.reusable(_req(HARBOUR))[1] == 2 * llama_mod.PREFILL_CHUNK
    assert slots2.prefill(_req(HARBOUR))  # goes on from there
    assert slots2.reusable(_req(HARBOUR)) == (n, n)


def test_prefill_never_cuts_a_longer_cached_prompt(slots2):
    slots2.reset_cache()
    long = HARBOUR + " " + LEDGER
    assert slots2.prefill(_req(long))
    n = slots2.reusable(_req(long))[0]
    assert slots2.prefill(_req(HARBOUR))  # a prefix of what is cached: nothing to do
    assert slots2.reusable(_req(long)) == (n, n)


def test_the_other_prompt_goes_when_both_do_not_fit(model_info):
    eng = LlamaEngine(model_info, n_ctx=256, threads=1, slots=2)
    try:
        a, b = _req(HARBOUR, max_tokens=16), _req(LEDGER + " " + LEDGER, max_tokens=16)
        assert eng.reusable(a)[0] + eng.reusable(b)[0] + 16 > eng.n_ctx
        assert eng.prefill(a) and eng.prefill(b)
        assert eng.reusable(a)[1] <= 1 and eng.reusable(b)[1] == eng.reusable(b)[0]  # "The" is shared
        done = [ev for ev in eng.stream(a) if ev.done][0]  # no "no KV slot" failure
        assert done.finish_reason in ("length", "stop") and done.timings.gen_tokens >= 1
    finally:
        eng.close()


def test_exported_cells_import_exactly_and_bad_ones_are_refused(slots2, model_info):
    slots2.reset_cache()
    req = _req(HARBOUR)
    assert slots2.export_state(req) is None  # nothing cached yet
    assert slots2.prefill(req)
    tokens, data = slots2.export_state(req)
    assert tokens == slots2.tokenize(HARBOUR) and len(data) > 1000
    other = LlamaEngine(model_info, n_ctx=2048, threads=1, slots=2)
    try:
        longer = _req(HARBOUR + " Then the")
        assert other.import_state(longer, tokens, data) == len(tokens)
        assert other.reusable(longer)[1] == len(tokens)
        # The same cells and the same kernels for what follows: the very same logits.
        assert np.array_equal(other.logits(HARBOUR + " Then the"), slots2.logits(HARBOUR + " Then the"))
        other.reset_cache()
        assert other.import_state(_req(LEDGER), tokens, data) == 0  # not a prefix of that prompt
        assert other.import_state(req, tokens, data[: len(data) // 2]) == 0  # truncated
        assert other.import_state(req, tokens[:-5], data) == 0  # cells for more tokens than named
        assert other.reusable(req)[1] == 0  # nothing half-loaded stays
    finally:
        other.close()


def test_state_key_names_model_vector_and_placement(slots2):
    from morph.steering.vector import ControlVector

    rng = np.random.default_rng(3)
    cv = ControlVector({12: rng.standard_normal(slots2.n_embd).astype(np.float32) * 10}, "llama", {})
    plain = slots2.state_key(_req(HARBOUR))
    steered = slots2.state_key(_req(HARBOUR, steering=cv))
    gen = slots2.state_key(_req(HARBOUR, steering=cv, apply="generated"))
    assert plain["vector"] is None and steered["vector"] and steered["vector"] == gen["vector"]
    assert steered["prompt_vector"] == steered["vector"] and gen["prompt_vector"] is None
    assert len({str(sorted(k.items())) for k in (plain, steered, gen)}) == 3
    assert plain["file"].endswith(".gguf") and plain["size"] > 0 and plain["llama_cpp"]


def test_a_stream_right_after_the_prefill_of_its_prompt_evaluates_nothing(slots2, engine):
    slots2.reset_cache()
    a, b = _req(HARBOUR, max_tokens=1), _req(LEDGER, max_tokens=1)
    assert slots2.prefill(a)
    # The prefill's last decode left the logits after HARBOUR: the stream samples from them.
    done = [ev for ev in slots2.stream(a)]
    assert done[-1].timings.evaluated_tokens == 0
    # They are the logits after HARBOUR: the same greedy token as a fresh context (the top
    # two are far apart here, so rounding cannot swap them).
    engine.reset_cache()
    fresh = engine.logits(HARBOUR)
    top2 = np.sort(fresh)[-2:]
    assert top2[1] - top2[0] > 1.0
    assert [t for ev in done for t in ev.token_ids] == [int(np.argmax(fresh))]
    # Only exactly then: after another decode (LEDGER into the other sequence) the stream on
    # HARBOUR evaluates its last token again.
    slots2.reset_cache()
    assert slots2.prefill(a) and slots2.prefill(b)
    done = [ev for ev in slots2.stream(a) if ev.done][0]
    assert done.timings.evaluated_tokens == 1
