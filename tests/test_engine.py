"""LlamaEngine on the real embedded model: steering, KV reuse, cancellation, capture."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from morph.engine import Engine, Request, collect
from morph.engine.llama import LlamaEngine
from morph.errors import MorphError
from morph.steering.vector import ControlVector

TEXT = "The meeting is moved to Thursday afternoon because the"


def _random_cv(engine, layers, scale, seed=0):
    rng = np.random.default_rng(seed)
    dirs = {}
    for il in layers:
        v = rng.standard_normal(engine.n_embd).astype(np.float32)
        dirs[il] = (v / np.linalg.norm(v) * scale).astype(np.float32)
    return ControlVector(dirs, model_hint="llama")


def _raw_cvec(engine, buf):
    """Set a buffer through llama.cpp directly (bypassing the engine's zero shortcut)."""
    import llama_cpp

    engine._cvec_key = object()  # the engine no longer knows what is set
    if buf is None:
        rc = llama_cpp.llama_set_adapter_cvec(engine.llm._ctx.ctx, None, 0, engine.n_embd, 1, engine.n_layer - 1)
    else:
        rc = llama_cpp.llama_set_adapter_cvec(
            engine.llm._ctx.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buf.size,
            engine.n_embd, 1, engine.n_layer - 1)
    assert rc == 0
    engine._reset_kv()


def test_zero_and_cleared_vector_equal_no_vector(engine):
    """Exact: every logits call here evaluates the whole prompt from an empty cache (a
    vector change drops the cells; reset_cache before the cached cases), same kernels."""
    engine.set_steering(None)
    engine.reset_cache()
    base = engine.logits(TEXT)
    zero = np.zeros((engine.n_layer - 1) * engine.n_embd, dtype=np.float32)
    _raw_cvec(engine, zero)
    with_zero = _logits_now(engine, TEXT)
    assert np.array_equal(base, with_zero)
    _raw_cvec(engine, None)
    engine._cvec_key = None
    # A real vector, then cleared: back to identical logits.
    engine.set_steering(_random_cv(engine, [12], 60.0))
    steered = engine.logits(TEXT, _random_cv(engine, [12], 60.0))
    assert not np.allclose(steered, base)
    engine.set_steering(None)
    assert np.array_equal(engine.logits(TEXT), base)
    # The engine also treats an all-zero ControlVector as "no vector".
    engine.reset_cache()
    assert np.array_equal(engine.logits(TEXT, _random_cv(engine, [12], 0.0)), base)


def _logits_now(engine, text):
    """Logits with whatever llama.cpp has set now (does not touch steering)."""
    engine._prime(engine.tokenize(text), threading.Event())
    return engine._last_logits()


def test_vector_changes_logits_and_scales_with_strength(engine):
    base = engine.logits(TEXT)
    d_small = np.abs(engine.logits(TEXT, _random_cv(engine, [16], 15.0)) - base).max()
    d_big = np.abs(engine.logits(TEXT, _random_cv(engine, [16], 60.0)) - base).max()
    assert 0 < d_small < d_big


def test_steering_change_gives_fresh_context_output(engine, model_info, threads):
    """Exact: the steering change drops the warm engine's cells, so it evaluates the whole
    prompt as the fresh context does, then both take the same steps: same kernels."""
    cv = _random_cv(engine, [10, 14], 40.0, seed=3)
    req = dict(prompt=TEXT, max_tokens=12, temperature=0)
    # Warm the cache without steering, then change steering and extend the prompt.
    collect(engine.stream(Request(**req)))
    warm = collect(engine.stream(Request(**req, steering=cv)))
    assert warm.timings.evaluated_tokens == warm.timings.prompt_tokens
    fresh_engine = LlamaEngine(model_info, n_ctx=512, threads=threads)
    try:
        fresh = collect(fresh_engine.stream(Request(**req, steering=cv)))
        assert warm.token_ids == fresh.token_ids
        assert np.array_equal(engine.logits(TEXT, cv), fresh_engine.logits(TEXT, cv))
    finally:
        fresh_engine.close()
    # The check can fail: keeping the KV cache across a change gives other logits.
    engine.set_steering(None)
    clean = engine.logits(TEXT)
    properly = engine.logits(TEXT, cv)
    engine.set_steering(None)
    engine.logits(TEXT)
    buf = cv.to_buffer(engine.n_embd, engine.n_layer)
    import llama_cpp

    llama_cpp.llama_set_adapter_cvec(engine.llm._ctx.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                     buf.size, engine.n_embd, 1, engine.n_layer - 1)
    stale = _logits_now(engine, TEXT)  # only the last token is re-evaluated: stale KV
    assert not np.allclose(stale, properly, atol=1e-3)
    assert not np.allclose(stale, clean, atol=1e-3)
    _raw_cvec(engine, None)
    engine._cvec_key = None


def test_appending_evaluates_only_new_tokens(engine):
    cv = _random_cv(engine, [12], 20.0)
    first = collect(engine.stream(Request(prompt=TEXT, max_tokens=4, temperature=0, steering=cv)))
    assert first.timings.evaluated_tokens == first.timings.prompt_tokens
    longer = TEXT + first.text + " and then"
    n_cached = len(engine.tokenize(TEXT)) + len(first.token_ids)
    second = collect(engine.stream(Request(prompt=longer, max_tokens=4, temperature=0, steering=cv)))
    n_new = second.timings.prompt_tokens - second.timings.evaluated_tokens
    # Everything that was already in the cache (prompt + generated tokens) is reused,
    # up to BPE merges at the join, which can re-split the last cached token.
    assert n_new >= n_cached - 1
    assert second.timings.evaluated_tokens <= 4


def test_cancel_mid_stream(engine):
    cancel = threading.Event()
    pieces, done = [], []
    for ev in engine.stream(Request(prompt="Once upon a time", max_tokens=200, temperature=0, cancel=cancel)):
        if ev.text:
            pieces.append(ev.text)
            if len(pieces) == 3:
                cancel.set()
        if ev.done:
            done.append(ev)
    # The stream ends with exactly one done event, which says it was cancelled.
    assert len(done) == 1 and done[0].finish_reason == "cancelled", done
    assert done[0].timings.gen_tokens <= 4 and len(pieces) <= 4
    # The engine is usable right after a cancellation.
    again = collect(engine.stream(Request(prompt="Once upon a time", max_tokens=3, temperature=0)))
    assert again.finish_reason == "length" and again.timings.gen_tokens == 3


def test_a_cancel_between_requests_never_leaves_stale_logits(engine, model_info, threads):
    """`cancel()` stops the stream running now; a scoring call after it still evaluates its
    own text (it used to return the previous prompt's logits, silently). Exact: the two
    texts share no first token, so both engines evaluate the whole text (same kernels)."""
    from morph.engine.llama import LlamaEngine

    engine.reset_cache()
    engine.logits("The weather today is")
    engine.cancel()
    assert engine.tokenize("The weather today is")[0] != engine.tokenize("My favourite fruit is the")[0]
    got = engine.logits("My favourite fruit is the")
    fresh = LlamaEngine(model_info, n_ctx=512, threads=threads)
    try:
        assert np.array_equal(got, fresh.logits("My favourite fruit is the"))
    finally:
        fresh.close()


def test_stop_strings_and_seed(engine):
    """Exact: each run from an empty cache (same kernels), so a seed repeats its sample."""
    def run(**kw):
        engine.reset_cache()
        return collect(engine.stream(Request(prompt="List: 1. apples\n2.", max_tokens=30, temperature=0.9, seed=7, **kw)))

    a, b = run(), run()
    assert a.text == b.text and a.text.split()
    # A stop string taken from that text: the same sample is cut right before it.
    words = a.text.split()
    stop = words[len(words) // 2]
    cut = run(stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == a.text[: a.text.index(stop)]
    assert run(stop=["\n"]).text == a.text.split("\n")[0]


@pytest.mark.parametrize("stop", ["\n\n", "@" * 30])
def test_stop_string_that_never_occurs_changes_nothing_when_the_model_ends(engine, stop):
    """Issue 9.4: text held back while it could still start a stop string is delivered
    when the model ends with end-of-generation (ghost text has a stop string always)."""
    msgs = [{"role": "user", "content": "What is 2+2? Answer with a number only."}]
    engine.reset_cache()  # exact: both runs from an empty cache, same kernels
    plain = collect(engine.stream(Request(messages=msgs, max_tokens=40, temperature=0)))
    assert plain.finish_reason == "stop" and plain.timings.gen_tokens < 40  # ended by EOG
    assert plain.text.strip()
    engine.reset_cache()
    held = collect(engine.stream(Request(messages=msgs, max_tokens=40, temperature=0, stop=[stop])))
    assert held.text == plain.text
    assert held.token_ids == plain.token_ids and held.finish_reason == "stop"


def test_chat_messages_use_template(engine):
    text = engine.format_chat([{"role": "user", "content": "hi"}])
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    out = collect(engine.stream(Request(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)))
    assert out.text.strip()


def test_capture_shapes_and_edit_equals_control_vector(engine, logit_atol):
    acts = engine.capture(["Hello there, how are you today?", "Short."], 12)
    n0 = len(engine.tokenize("Hello there, how are you today?"))
    assert acts[0].shape == (n0 - 1, engine.n_embd)  # position 0 (attention sink) dropped
    norms = np.linalg.norm(acts[0], axis=1)
    assert norms.max() < 10 * np.median(norms)  # the sink's huge norm is gone
    # Capture does not depend on the generation context's steering.
    engine.set_steering(_random_cv(engine, [5], 80.0))
    again = engine.capture(["Hello there, how are you today?"], 12)
    assert np.array_equal(acts[0], again[0])
    engine.set_steering(None)

    cv = _random_cv(engine, [12], 50.0, seed=11)
    v = cv.directions[12]
    # The capture context against the generation context: other contexts, so within
    # LOGIT_ATOL (conftest; bit for bit on the project's machine).
    edited = engine.logits_with_edit(TEXT, 12, lambda a: a + v)
    steered = engine.logits(TEXT, cv)
    assert np.allclose(edited, steered, rtol=0, atol=logit_atol), np.abs(edited - steered).max()
    assert not np.allclose(edited, engine.logits(TEXT), rtol=0, atol=logit_atol)


def test_engine_implements_the_protocol(engine):
    assert isinstance(engine, Engine)
    assert engine.n_vocab == 49152 and engine.n_embd == 576 and engine.n_layer == 30
    im_end = engine.tokenize("<|im_end|>", add_bos=False, special=True)
    assert len(im_end) == 1 and engine.is_eog(im_end[0])
    assert not engine.is_eog(engine.tokenize(" the", add_bos=False)[0])
    assert engine.detokenize(im_end, special=True) == "<|im_end|>" and engine.detokenize(im_end) == ""


def test_ggml_abi_assumptions_hold(engine):
    """Capture reads ggml tensors through ctypes (morph/engine/ggml.py). A llama-cpp-python
    whose ggml ABI moved fails here with a message naming the assumption that broke."""
    from morph.engine import ggml

    ggml.check_abi()  # the type field at offset 0, ne[] at 16, nbytes/nelements, callback signature
    # The check can fail, and names what changed:
    with pytest.raises(MorphError, match="type at offset 8"):
        ggml.check_abi(type_offset=8)
    with pytest.raises(MorphError, match=r"ne\[\] is not at offset 24"):
        ggml.check_abi(ne_offset=24)
    # On a live graph: a block's output read in the eval callback is (n_tokens, n_embd) F32
    # (tensor_rows checks type, ne[0], nbytes == 4 * nelements, contiguity), the same rows
    # the capture API gives, and an edit written back reaches everything downstream.
    tokens = engine.tokenize(TEXT)
    n = len(tokens)
    v = _random_cv(engine, [12], 50.0, seed=4).directions[12]
    with engine.batch_runner(n_seq=1, n_ctx=256, n_batch=256) as runner:
        _, clean = runner.decode(tokens, list(range(n)), [0] * n, [False] * (n - 1) + [True], layers=[12, 14])
        runner.clear()
        _, edited = runner.decode(tokens, list(range(n)), [0] * n, [False] * (n - 1) + [True], layers=[12, 14],
                                  edit=lambda layer, a: a + v if layer == 12 else None)
    assert clean[12].shape == (n, engine.n_embd) and clean[12].dtype == np.float32
    assert np.array_equal(clean[12], engine.capture([TEXT], 12, drop_first=False)[0])
    assert np.array_equal(clean[14][1:], engine.capture([TEXT], 14)[0])
    assert np.array_equal(edited[12], clean[12] + v)
    assert not np.allclose(edited[14], clean[14], atol=1e-2)


# --- where steering applies (Request.apply; issue 10.2 and 10.7c) -----------------------


@pytest.fixture(scope="module")
def fresh(model_info, threads):
    """A second engine; `_fresh(fresh)` drops its cache (`reset_cache`) so that it is a fresh context."""
    eng = LlamaEngine(model_info, n_ctx=1024, threads=threads)
    yield eng
    eng.close()


def _fresh(eng):
    eng.reset_cache()
    return eng


def _greedy(engine, steering=None, apply="all", prompt=TEXT, n=10):
    return collect(engine.stream(Request(prompt=prompt, max_tokens=n, temperature=0, steering=steering, apply=apply)))


def _edit_rows(vector, n_prompt, prompt_f, gen_f):
    """An eval-callback edit adding prompt_f * vector to the prompt's rows, gen_f * vector after."""

    def edit(_layer, acts):
        acts[:n_prompt] += np.float32(prompt_f) * vector
        acts[n_prompt:] += np.float32(gen_f) * vector
        return acts

    return edit


def _reference_greedy(engine, tokens, layer, vector, prompt_f, gen_f, n):
    """Greedy tokens with the vector written into block `layer`'s output through the capture
    machinery (a context of its own, no control vector): the whole sequence re-evaluated
    from scratch at every step, so no KV cache of any kind is involved."""
    seq, out = list(tokens), []
    with engine.batch_runner(n_seq=1, n_ctx=256, n_batch=256) as runner:
        for _ in range(n):
            runner.clear()
            m = len(seq)
            logits, _ = runner.decode(seq, list(range(m)), [0] * m, [False] * (m - 1) + [True], layers=[layer],
                                      edit=_edit_rows(vector, len(tokens), prompt_f, gen_f))
            out.append(int(np.argmax(logits[-1])))
            seq.append(out[-1])
    return out


def test_generated_only_steering_keeps_the_prompt_cache_unsteered(engine, fresh, greedy_agrees):
    """Warm runs (cached prefix: only the tail evaluated) against a fresh context and the
    eval-callback reference (whole sequence at every step): other kernels, so greedy
    tokens agree up to the first near-tie (conftest)."""
    cv = _random_cv(engine, [12], 60.0, seed=5)
    plain = _greedy(engine)
    out = _greedy(engine, cv, "generated")
    every = _greedy(engine, cv, "all")
    assert out.finish_reason == "length"
    # It steers, but only from the generated tokens on: the first token is chosen from the
    # unsteered prompt's logits, then the text departs from the unsteered and "all" ones.
    greedy_agrees(engine, TEXT, plain.token_ids[:1], out.token_ids[:1])
    assert out.token_ids != plain.token_ids and out.token_ids != every.token_ids
    # Same text as a fresh context doing the same, and as the vector written at the
    # generated positions only through the eval callback (no cache, no control vector).
    greedy_agrees(engine, TEXT, _greedy(_fresh(fresh), cv, "generated").token_ids, out.token_ids, cv, "generated")
    ref = _reference_greedy(engine, engine.tokenize(TEXT), 12, cv.directions[12], 0.0, 1.0, len(out.token_ids))
    greedy_agrees(engine, TEXT, ref, out.token_ids, cv, "generated")
    # The prompt's cache stayed valid for an unsteered request: only the last prompt token
    # (always re-evaluated for fresh logits) is evaluated, and the text is the unsteered one.
    _greedy(engine, cv, "generated")
    again = _greedy(engine)
    assert again.timings.evaluated_tokens == 1
    greedy_agrees(engine, TEXT, plain.token_ids, again.token_ids)
    # A prompt that runs on into the generated text re-evaluates the steered cells unsteered.
    _greedy(engine, cv, "generated")
    ext = TEXT + out.text
    n_text = len(engine.tokenize(TEXT))
    assert engine.tokenize(ext)[:n_text] == engine.tokenize(TEXT)
    cont = _greedy(engine, None, prompt=ext, n=6)
    assert cont.timings.evaluated_tokens == cont.timings.prompt_tokens - n_text
    greedy_agrees(engine, ext, _greedy(_fresh(fresh), None, prompt=ext, n=6).token_ids, cont.token_ids)


def test_switching_where_steering_applies_never_reuses_stale_cache(engine, fresh, greedy_agrees, logit_atol):
    """Requests that alternate vectors and `apply` over a growing prompt (each one's prefix
    is the last one's cache) give what a fresh context gives, and the next-token logits
    after each equal a fresh context's. The warm engine evaluates only each prompt's tail,
    the fresh one the whole prompt: other kernels, so greedy tokens agree up to the first
    near-tie and logits within LOGIT_ATOL (conftest); a stale cell is far outside both."""
    from morph.engine.llama import _digest

    cv = _random_cv(engine, [10, 14], 40.0, seed=7)
    w = _random_cv(engine, [16], 50.0, seed=8)
    steps = [(cv, "all"), (cv, "generated"), (None, "all"), (cv, "generated"), (w, "generated"),
             (cv, "prompt-scaled"), (cv, "all"), (None, "generated"), (cv, "prompt-scaled:0.25"), (cv, "generated")]
    prompt = TEXT
    for vec, apply in steps:
        got = _greedy(engine, vec, apply, prompt=prompt, n=5)
        want = _greedy(_fresh(fresh), vec, apply, prompt=prompt, n=5)
        greedy_agrees(engine, prompt, want.token_ids, got.token_ids, vec, apply)
        prompt += got.text
    for vec, apply in steps:
        got = engine.logits(prompt, vec, apply)
        assert np.allclose(got, _fresh(fresh).logits(prompt, vec, apply), rtol=0, atol=logit_atol), apply
    # The check can fail: were the cells' tags ignored, a steered request after a
    # "generated" one would reuse the prompt cells computed unsteered.
    _greedy(engine, cv, "generated", prompt=prompt)
    engine._kv_tag[: engine.llm.n_tokens] = engine._tags.setdefault(_digest(cv), len(engine._tags))
    stale = engine.logits(prompt, cv)
    assert not np.allclose(stale, _fresh(fresh).logits(prompt, cv), rtol=0, atol=logit_atol)
    engine.reset_cache()


def test_apply_factors_and_their_limits(engine, greedy_agrees):
    """Placements that must coincide, each run from an empty cache: same kernels, exact.
    Against the eval-callback reference (whole sequence each step): up to a near-tie."""
    cv = _random_cv(engine, [12], 60.0, seed=5)

    def cold(*a, **kw):
        return _greedy(_fresh(engine), *a, **kw).token_ids

    gen = cold(cv, "generated")
    assert cold(cv, "prompt-scaled:0") == gen
    assert cold(cv, "prompt-scaled:1") == cold(cv, "all")
    assert cold(None, "generated") == cold()
    # prompt-scaled (0.5 by default) is what the callback gives with half the vector on the prompt
    half = cold(cv, "prompt-scaled", n=8)
    ref = _reference_greedy(engine, engine.tokenize(TEXT), 12, cv.directions[12], 0.5, 1.0, 8)
    greedy_agrees(engine, TEXT, ref, half, cv, "prompt-scaled")
    for bad in ("everywhere", "prompt-scaled:2", "prompt-scaled:x", "generated:0.5"):
        with pytest.raises(MorphError, match="steering applies to"):
            _greedy(engine, cv, bad)


def test_continuation_logprobs_follow_apply(engine, logit_atol):
    """Teacher-forced log-probs: the prompt as a request's prompt, the continuation as its
    generated tokens, against the eval-callback reference (no control vector, no cache):
    other kernels, so within LOGIT_ATOL (conftest)."""
    cv = _random_cv(engine, [12], 60.0, seed=9)
    cont = " the weather was bad and the roads were closed."
    p_tok, c_tok = engine.tokenize(TEXT), engine.tokenize(cont, add_bos=False)
    toks = p_tok + c_tok
    m = len(toks)
    got_plain = engine.continuation_logprobs(TEXT, cont)
    for apply, (pf, gf) in (("all", (1, 1)), ("generated", (0, 1)), ("prompt-scaled", (0.5, 1)), (None, (0, 0))):
        with engine.batch_runner(n_seq=1, n_ctx=256, n_batch=256) as runner:
            logits, _ = runner.decode(toks, list(range(m)), [0] * m, [i >= len(p_tok) - 1 for i in range(m - 1)] + [False],
                                      layers=[12], edit=_edit_rows(cv.directions[12], len(p_tok), pf, gf))
            lg = np.asarray(logits, np.float64)
        lse = lg.max(axis=1) + np.log(np.exp(lg - lg.max(axis=1, keepdims=True)).sum(axis=1))
        ref = lg[np.arange(len(c_tok)), c_tok] - lse
        got = got_plain if apply is None else engine.continuation_logprobs(TEXT, cont, cv, apply)
        assert got.shape == (len(c_tok),)
        if apply is not None:  # token ids score the same (the cached prompt: near, see below)
            assert np.allclose(engine.continuation_logprobs(p_tok, c_tok, cv, apply), got, rtol=0, atol=logit_atol)
        assert np.allclose(got, ref, rtol=0, atol=logit_atol), (apply, np.abs(got - ref).max())
    # The same prompt scored again reuses its cache and gives the same numbers, within
    # LOGIT_ATOL: its last token is evaluated alone then, in a batch the first time.
    assert np.allclose(engine.continuation_logprobs(TEXT, cont), got_plain, rtol=0, atol=logit_atol)
    assert np.allclose(engine.continuation_logprobs(TEXT, cont, None, "generated"), got_plain, rtol=0, atol=logit_atol)
