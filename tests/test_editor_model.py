"""The editor with the real model through the real engine (pipe input, dummy output).

Generation is short (a few tokens). Checks what the fake engine cannot: KV prefix reuse
after a typing pause, steering reaching the model, and the seed UX producing text.
"""

from __future__ import annotations

import numpy as np
import pytest

from morph import choose, paths, tasks
from morph.editor import seed
from morph.engine.base import collect
from morph.steering.catalog import Catalog, Feature, write_entries
from morph.steering.vector import ControlVector, residual_relative

from test_editor import ESC, Session, wait

DOC = (
    "# Harbour notes\n\n"
    + " ".join(
        "The fishing boats came back to the harbour at dusk, and the nets were hung to dry "
        "along the stone wall while the gulls argued over what was left."
        for _ in range(5)
    )
    + "\n\nIn the morning the"
)


@pytest.fixture()
def catalog(data_dir, model_info):
    d = paths.user_vectors_dir() / model_info.model_id
    rng = np.random.default_rng(1)
    v = residual_relative(rng.standard_normal(model_info.n_embd).astype(np.float32), 153.0)
    ControlVector({16: v}, model_info.hint, {"name": "testfeat"}).save(d / "testfeat.gguf")
    write_entries(d, [Feature(name="testfeat", description="a random test direction", method="diffmean",
                              file="testfeat.gguf", layer=16, default_scale=0.1, residual_norm=153.0)],
                  model_info.model_id)
    return Catalog(model_info.model_id)


@pytest.fixture()
def real(data_dir, tmp_path, engine, catalog):
    made = []

    def start(text=DOC, **kw):
        p = tmp_path / "doc.md"
        p.write_text(text, encoding="utf-8")
        s = Session(p, engine=engine, catalog=catalog, debounce_ms=30, **kw)
        s.ed.config.suggestion_tokens = 6
        made.append(s)
        return s

    yield start
    for s in made:
        s.close()


def _suggest_done(s):
    wait(lambda: s.ed.suggest.current is not None and s.ed.suggest.current.done, timeout=90, what="suggestion")
    return s.ed.suggest.current


def test_pause_after_typing_evaluates_only_new_tokens(real):
    s = real()
    s.send("GA")  # end of the document, insert mode
    first = _suggest_done(s)
    assert first.timings.prompt_tokens > 100
    assert first.text.strip()  # the model continued the text as ghost text
    s.send(" sun")
    wait(lambda: s.ed.buffer.text.endswith("the sun"), what="typing")
    second = _suggest_done(s)
    assert second is not first and second.anchor_text.endswith("the sun")
    t = second.timings
    # Only the typed tokens (and the last token re-evaluated for fresh logits) are new.
    assert t.evaluated_tokens <= 6, t.as_dict()
    assert t.prompt_tokens > 100


def test_steering_reaches_the_model(real):
    s = real()
    s.send("GA")
    plain = _suggest_done(s).full
    s.send(ESC + ":feature testfeat 0.8\r")
    wait(lambda: s.ed.profile.get("testfeat@diffmean") == 0.8, what="feature on")
    s.send("A")
    steered = _suggest_done(s)
    assert steered.features == {"testfeat@diffmean": 0.8}
    assert steered.full != plain  # same prompt and seed: only the vector differs


def test_explain_and_expand_use_the_model(real, monkeypatch):
    monkeypatch.setattr(tasks, "EXPLAIN_TOKENS", 10)
    monkeypatch.setattr(tasks, "TELESCOPE_TOKENS", 24)
    s = real(text="The quay was quiet. Boats slept in the dark water.\n")
    s.send("wK")
    wait(lambda: s.ed.seed.popup is not None and s.ed.seed.popup.done, timeout=60, what="explanation")
    assert len(s.ed.seed.popup.text.split()) >= 2
    s.send(ESC)
    wait(lambda: s.ed.seed.popup is None, what="popup closed")
    s.send("\\e")
    wait(lambda: s.ed.seed.preview is not None and s.ed.seed.preview.done, timeout=60, what="expansion")
    new = s.ed.seed.preview.text
    assert new.strip()
    s.send("y")
    wait(lambda: s.ed.buffer.text == new + " Boats slept in the dark water.\n", what="accepted")


@pytest.fixture(scope="module")
def emb(threads):
    from morph.engine.embed import Embedder

    e = Embedder(threads=threads)
    yield e
    e.close()


def test_telescope_at_default_strength_shows_the_ladders_choice(real, engine, emb, choose_calls, stream_calls,
                                                               monkeypatch):
    """\\c with `formal` at its default strength previews the choice of a ladder run on the
    sentence in the compress framing (5 candidates: the unsteered one is the meaning
    reference, not a candidate); `[editor] choose = false`, or a strength given, previews
    the one generation."""
    monkeypatch.setattr(tasks, "TELESCOPE_TOKENS", 40)
    monkeypatch.setitem(tasks.FRAMING_SAMPLING, "compress", {"temperature": 0.0})  # greedy
    sentence = "hey, can u send me the report by friday, we need the 3 budget numbers before the call with Dana."
    greedy = tasks.Defaults(tasks.Sampling(temperature=0.0))
    s = real(text=sentence + "\n", profile=["formal"], embedder=lambda: emb)
    s.ed.defaults = greedy
    formal = s.ed.catalog.get("formal")

    def preview(keys):
        s.send(keys)
        wait(lambda: s.ed.seed.preview is not None and s.ed.seed.preview.done, timeout=120, what="compression")
        pv = s.ed.seed.preview
        title = s.ed.seed._preview_title()
        s.send("n")
        wait(lambda: s.ed.seed.preview is None, what="rejected")
        return pv, title

    def single(pv):
        """The preview is the one request's text: compress, formal at its default strength."""
        req, text = stream_calls[-1]
        want = tasks.build_request("compress", sentence, scope="sentence", defaults=greedy)
        assert req.messages == want.messages and req.temperature == 0.0
        np.testing.assert_array_equal(req.steering.directions[formal.layer],
                                      formal.load_vector().directions[formal.layer] * formal.default_scale)
        return pv.text == seed.clean_reply(text) and not pv.chosen

    asked = len(stream_calls)  # the ghost text's own requests
    pv, title = preview("\\c")
    assert len(stream_calls) == asked  # the ladder does not stream
    [(args, kw, want)] = choose_calls
    assert args[0] is engine and args[1] is emb and args[2:4] == ("compress", sentence)
    assert [f.key for f in args[4]] == [formal.key] and kw["scope"] == "sentence"
    assert kw["defaults"] is greedy and kw["cancel"] is not None
    assert len(want.candidates) == len(choose.RUNGS) and choose.PLAIN not in [c.rung for c in want.candidates]
    assert pv.text == seed.clean_reply(want.text) and pv.chosen.startswith(want.chosen.rung.name)
    assert f"chose {want.chosen.rung.name}" in title
    s.ed.config.editor_choose = False
    pv, title = preview("\\c")
    assert single(pv) and "chose" not in title
    s.ed.config.editor_choose = True
    s.send(ESC + ":feature formal 0.1\r")  # the default strength, given: honoured exactly
    wait(lambda: "formal@diffmean" in s.ed.features.explicit, what="explicit strength")
    assert s.ed.profile == {formal.key: formal.default_scale}
    pv, _ = preview("\\c")
    assert single(pv) and len(choose_calls) == 1


def test_editor_choose_config_key(data_dir):
    from morph.config import load_config

    assert load_config().editor_choose is True
    (data_dir / "config.toml").write_text("[editor]\nchoose = false\n")
    assert load_config().editor_choose is False
