"""The vLLM engine's BatchRunner, logits_with_edit and capture: what the SAE pipeline uses."""

from __future__ import annotations

import numpy as np

from morph.steering.vector import ControlVector

TEXTS = ["The old lighthouse keeper climbed the stairs and", "Dear team, I wanted to follow up on"]


def lsm(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_batch_runner_prompt_step_and_edit(vengine, formal):
    toks = [vengine.tokenize(t) for t in TEXTS]
    with vengine.batch_runner(n_seq=4, n_ctx=1024, n_batch=256) as r:
        r.clear()
        flat, pos, seq, want = [], [], [], []
        for s, t in enumerate(toks):
            flat += t
            pos += range(len(t))
            seq += [s] * len(t)
            want += [False] * (len(t) - 1) + [True]
        lg, cap = r.decode(flat, pos, seq, want, layers=[16])
        assert lg.shape == (2, vengine.n_vocab) and cap[16].shape == (len(flat), vengine.n_embd)
        ref = vengine.capture_tokens(toks, 16)
        a = 0
        for s, t in enumerate(toks):
            np.testing.assert_allclose(cap[16][a:a + len(t)], ref[s], rtol=1e-3, atol=1e-3)
            a += len(t)
            np.testing.assert_allclose(lg[s], vengine.logits(TEXTS[s]), rtol=1e-3, atol=1e-3)
        # One decode step per sequence, as the corpus stage runs: the next token's logits
        # equal scoring the extended token list from scratch.
        nxt = [int(np.argmax(lg[s])) for s in range(2)]
        lg2, cap2 = r.decode(nxt, [len(t) for t in toks], [0, 1], [True, True], layers=[16])
        for s, t in enumerate(toks):
            after = vengine.continuation_logprobs(t + [nxt[s]], [int(np.argmax(lg2[s]))])
            assert abs(lsm(lg2[s])[int(np.argmax(lg2[s]))] - after[0]) < 1e-3
        # An edit adding v at block 16 to every row = the control vector on block 16.
        v = formal.directions[16]
        r.clear()

        def add(layer, acts):
            return acts + v

        lg3, _ = r.decode(flat, pos, seq, want, layers=[16], edit=add)
        for s in range(2):
            np.testing.assert_allclose(lg3[s], vengine.logits(TEXTS[s], formal), rtol=1e-3, atol=2e-3)


def test_logits_with_edit_equals_steering(vengine, formal):
    v = formal.directions[16]
    got = vengine.logits_with_edit(TEXTS[0], 16, lambda acts: acts + v)
    np.testing.assert_allclose(got, vengine.logits(TEXTS[0], formal), rtol=1e-3, atol=2e-3)
    # Editing only the last position changes the logits, and less than editing every position.
    one = vengine.logits_with_edit(TEXTS[0], 16, lambda acts: np.concatenate([acts[:-1], acts[-1:] + v]))
    plain = vengine.logits(TEXTS[0])
    d_one, d_all = np.linalg.norm(one - plain), np.linalg.norm(got - plain)
    assert 0 < d_one < d_all, (d_one, d_all)
    assert isinstance(formal, ControlVector)
