"""Shared fixtures: the real embedded model through the real engine, and a private data dir.

MORPH_TEST_THREADS sets the llama.cpp threads of every engine the tests make (default 1:
on a shared 2-core machine, 2 llama.cpp threads stall badly under load, FACTS). Running
the suite again with another count checks that nothing depends on one CPU configuration.

Comparing two computations of the same request: where both take the same kernels (the
same tokens evaluated in the same batches from the same cache state), results are equal
bit for bit and the tests say so. Where they do not (a cached prefix evaluates only the
tail, a fresh context the whole prompt; the eval callback re-evaluates the whole
sequence; another engine), logits agree within LOGIT_ATOL and greedy tokens up to the
first near-tie (`greedy_agrees`).
"""

from __future__ import annotations

import os

import pytest

from morph import models, paths

THREADS = int(os.environ.get("MORPH_TEST_THREADS") or 1)
# Logits of one request computed by different kernels differ by float rounding; observed
# 0 on the project's AVX machine (every path is bit-exact there), assumed under this
# bound elsewhere. Two tokens can swap places only where their logits are within twice it.
LOGIT_ATOL = 0.05
NEAR_TIE = 2 * LOGIT_ATOL


@pytest.fixture(scope="session")
def model_info():
    return models.check(models.resolve(None))


@pytest.fixture(scope="session")
def threads() -> int:
    """llama.cpp threads for every engine a test makes (MORPH_TEST_THREADS, default 1)."""
    return THREADS


@pytest.fixture(scope="session")
def engine(model_info, threads):
    """One warm LlamaEngine for the whole session (loading costs ~0.3 s, but contexts add up)."""
    from morph.engine.llama import LlamaEngine

    eng = LlamaEngine(model_info, n_ctx=2048, threads=threads)
    yield eng
    eng.close()


@pytest.fixture()
def choose_calls(monkeypatch) -> list:
    """Records each morph.choose.run call as (args, kwargs, Choice). Tests compare what a
    frontend shows with that Choice, not with a second run: a ladder's steered rungs are
    not reproducible bit for bit from one batch to the next (near-ties flip)."""
    from morph import choose

    calls, real = [], choose.run

    def spy(*args, **kw):
        calls.append((args, kw, real(*args, **kw)))
        return calls[-1][2]

    monkeypatch.setattr(choose, "run", spy)
    return calls


@pytest.fixture()
def stream_calls(engine, monkeypatch) -> list:
    """Records each engine.stream call as [request, text streamed]."""
    calls, real = [], engine.stream

    def spy(req):
        calls.append([req, ""])
        for ev in real(req):
            calls[-1][1] += ev.text
            yield ev

    monkeypatch.setattr(engine, "stream", spy)
    return calls


@pytest.fixture(scope="session")
def logit_atol() -> float:
    """The tolerance for logits (and log-probs) of one request computed by other kernels."""
    return LOGIT_ATOL


@pytest.fixture(scope="session")
def near_tie() -> float:
    """Two tokens whose log-probs are closer than this may swap under other kernels."""
    return NEAR_TIE


def first_divergence(want: list[int], got: list[int]) -> int | None:
    """Index of the first token where two greedy generations differ (None: identical)."""
    k = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
    if k is None and len(want) != len(got):
        k = min(len(want), len(got))
    return k


@pytest.fixture(scope="session")
def greedy_agrees():
    """check(engine, prompt, want, got, steering=None, apply="all") for two greedy
    generations of one request by paths whose kernels differ: the token ids must be
    equal up to the first near-tie. Where they first differ, `engine` scores both tokens
    after the common prefix (teacher-forced, with the request's steering and placement);
    their log-probs must be within NEAR_TIE, else the paths disagree for real. Returns
    the number of tokens compared exactly (len(want) when identical)."""

    def check(engine, prompt, want, got, steering=None, apply="all") -> int:
        want, got = list(want), list(got)
        k = first_divergence(want, got)
        if k is None:
            return len(want)
        assert k < len(want) and k < len(got), f"one generation stopped at token {k}, the other went on: {want} vs {got}"
        lp = [float(engine.continuation_logprobs(prompt, want[:k] + [t], steering, apply)[-1]) for t in (want[k], got[k])]
        assert abs(lp[0] - lp[1]) < NEAR_TIE, (
            f"greedy tokens differ at {k} ({want[k]} vs {got[k]}) where their log-probs are {lp}: not a near-tie")
        return k

    return check


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    """Keep every test out of the user's real $XDG_DATA_HOME/tinymorph."""
    d = tmp_path / "data"
    monkeypatch.setenv("MORPH_DATA_DIR", str(d))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    paths.set_data_dir(None)
    yield d
    paths.set_data_dir(None)


@pytest.fixture(autouse=True, scope="session")
def _no_user_state(tmp_path_factory):
    """Even tests that forget `data_dir` never touch the real data dir."""
    root = tmp_path_factory.mktemp("session-data")
    old = os.environ.get("MORPH_DATA_DIR")
    os.environ["MORPH_DATA_DIR"] = str(root)
    yield
    if old is None:
        os.environ.pop("MORPH_DATA_DIR", None)
    else:
        os.environ["MORPH_DATA_DIR"] = old


SHIFT_FRACTION = 0.5  # of the stored style shift a feature must reproduce


def build_scale(feature) -> float:
    """The scale the build measured `style_shift_at_default` at: `scores.build_scale` once
    `morph eval` tuned default_scale; for an SAE build tuned before that key existed, the
    swept scale whose extra NLL it stored with the shift; else default_scale."""
    s = feature.scores
    if s.get("build_scale"):
        return s["build_scale"]
    swept = [r["scale"] for r in s.get("sweep", []) if r.get("extra_nll") == s.get("extra_nll_at_default")]
    return swept[0] if len(swept) == 1 else feature.default_scale


@pytest.fixture(scope="session")
def pole_shift_failures():
    """check(engine, {name: Feature}) -> the features that, as real control vectors, fall
    short on the held-out contrast pairs the build scored: at the build's scale each must
    raise its own pole's wording over the other pole's by at least SHIFT_FRACTION of the
    shift the build stored (a vector at a hundredth of its scale moves ~nothing and
    fails), and at its default scale at least the right way. Log-probs of fixed texts:
    no sampling, so another CPU moves these figures by float rounding only. Empty when
    every feature steers its way."""
    from morph.steering import diffmean as dm

    def check(engine, feats) -> list:
        failures = []
        for path in sorted(paths.recipes_dir().glob("*.json")):
            r = dm.load_recipe(path)
            test = dm.split_pairs(r)[1][:8]
            base = dm.style_shift(engine, test, None)
            for pole, sign in r.poles:
                f = feats.get(pole["name"])
                if f is None:
                    continue
                stored = f.scores["style_shift_at_default"]
                assert f.scores["heldout_pairs"] == len(test) and stored > 0, (f.key, f.scores)
                for scale, want in ((build_scale(f), SHIFT_FRACTION * stored), (f.default_scale, 0.0)):
                    got = sign * (dm.style_shift(engine, test, f.load_vector() * scale) - base)
                    if not got > want:
                        failures.append((f.key, scale, round(got, 4), ">", round(want, 4)))
        engine.set_steering(None)
        return failures

    return check
