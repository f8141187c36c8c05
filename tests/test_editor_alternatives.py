"""Alternatives to a ghost suggestion: the checks, and the editor's keys, panel line and log.

The editor tests use a fake engine whose `alternatives` returns known continuations per
seed (with the stop rule and cancellation a real one has), so which one shows, cycling
and what is logged are checked exactly. The real model decodes them in
test_engine_alternatives.py and drives Alt-] in tmux (test_editor_tmux.py).
"""

from __future__ import annotations

import json
import threading
import time
from typing import NamedTuple

from prompt_toolkit.formatted_text import fragment_list_to_text

from morph.editor import alternatives
from morph.editor.alternatives import Alternative, Scores, rank, score
from test_editor import CTRL_RIGHT, ESC, F2, REPLY, TAB, FakeEngine, db_rows, session, wait  # noqa: F401

ALT_NEXT, ALT_PREV = "\x1b]", "\x1b["
SEEDS = [alternatives.SEED + i for i in range(3)]


class Alt(NamedTuple):
    text: str
    ids: list
    finish: str
    logprobs: list


class AltEngine(FakeEngine):
    """A FakeEngine with the editor engine's `alternatives`: `texts[seed]` per seed, at the
    log-prob `lp[seed]`; the streamed one (given) at `given_lp`. `hold`: wait for it (or a
    cancel) before answering."""

    alt_seqs = 8

    def __init__(self, texts: dict, lp: dict, given_lp: float = -1.5, hold: threading.Event | None = None, **kw):
        super().__init__(**kw)
        self.texts, self.lp, self.given_lp, self.hold = texts, lp, given_lp, hold
        self.alt_calls: list[tuple] = []
        self.alt_cancelled = 0

    def alternatives(self, req, seeds, cancel=None, known=()):
        self.alt_calls.append((req, list(seeds), [list(k) for k in known]))
        self._cancel.clear()
        while self.hold is not None and not self.hold.is_set():
            if (cancel is not None and cancel.is_set()) or self._cancel.is_set():
                self.alt_cancelled += 1
                return [Alt("", [], "cancelled", []) for _ in [*known, *seeds]]
            time.sleep(0.005)
        out = [Alt("?", list(k), "given", [self.given_lp] * len(k)) for k in known]
        for sd in seeds:
            text = self.texts[sd]
            cut = min((text.find(s) for s in req.stop if s in text), default=-1)
            text = text[:cut] if cut >= 0 else text
            out.append(Alt(text, list(range(len(text.split()))), "stop", [self.lp[sd]] * max(1, len(text.split()))))
        return out


SAT = " sat by the door and waited."
RAN = " ran off into the garden.\n\nA new paragraph the stop rule cuts."


def alt_engine(**kw) -> AltEngine:
    # Seed order 101, 102, 103: the most fluent first; the third repeats the streamed reply.
    return AltEngine({SEEDS[0]: SAT, SEEDS[1]: RAN, SEEDS[2]: REPLY}, {SEEDS[0]: -0.5, SEEDS[1]: -1.0, SEEDS[2]: -0.1},
                     **kw)


# --- the checks ------------------------------------------------------------------------------


def test_scores_catch_loops_copies_and_invented_names():
    before = "The harbour was quiet in the early morning, and the boats rocked gently."
    ok = score(before, " A gull landed on the wall.", [-1.0, -2.0])
    assert ok == Scores(-1.5, 0.0, 0.0, ()) and ok.passes
    loop = score(before, " and then the boat and then the boat and then the boat", [-0.2])
    assert loop.repeats > 0.5 and not loop.passes
    copy = score(before, " the boats rocked gently in the early morning", [-0.2])
    assert copy.copied == 0.4 and not copy.passes  # 2 of its 5 4-grams are in the text before
    made_up = score(before, " Captain Ahab arrived in 1851.", [-0.2])
    assert made_up.invented == ("ahab", "1851") and not made_up.passes  # "Captain" starts the text: not a name
    assert score("Boats: 3 of them.", " Then 3 more", [-1]).invented == ()


def test_rank_puts_passing_then_fluent_first_and_blank_last():
    a = Alternative("fluent but loops", Scores(-0.1, 0.9, 0.0))
    b = Alternative("fine", Scores(-1.0, 0.0, 0.0))
    c = Alternative("finer", Scores(-0.8, 0.0, 0.0))
    d = Alternative("   ", Scores(-0.01, 0.0, 0.0))
    assert [x.text for x in rank([a, b, c, d])] == ["finer", "fine", "fluent but loops", "   "]


# --- the editor ------------------------------------------------------------------------------


def ready(s):
    wait(lambda: s.ed.suggest.position() is not None, what="alternatives")
    return s.ed.suggest


def test_the_best_alternative_shows_and_alt_brackets_cycle_and_tab_accepts_it(session):
    eng = alt_engine()
    s = session(text="", engine=eng)
    s.send("iThe cat")
    s.wait_ghost()
    sg = ready(s)
    req, seeds, known = eng.alt_calls[-1]
    # One call after the suggestion: the same prompt at the alternatives' temperature, the
    # streamed suggestion's token ids scored with them.
    assert req.prompt == "The cat" and req.temperature == alternatives.TEMPERATURE and req.stop == ["\n\n"]
    assert seeds == SEEDS and known == [list(range(len(REPLY.split())))]
    # The duplicate of the streamed reply is dropped; the blank-line stop cut RAN.
    assert [a.text for a in sg.current.alts] == [SAT, " ran off into the garden.", REPLY]
    assert sg.position() == (1, 3) and sg.text == SAT  # the most fluent replaced what showed
    s.send(ALT_NEXT)
    wait(lambda: sg.text == " ran off into the garden.", what="Alt-]")
    s.send(ALT_NEXT)
    wait(lambda: sg.text == REPLY and sg.position() == (3, 3), what="Alt-] again")
    s.send(ALT_NEXT)
    wait(lambda: sg.text == SAT, what="Alt-] wraps")
    s.send(ALT_PREV)
    wait(lambda: sg.text == REPLY, what="Alt-[")
    s.send(ALT_PREV)
    wait(lambda: sg.position() == (2, 3), what="Alt-[ again")
    assert s.ed.buffer.text == "The cat" and s.ed.mode_name() == "INSERT"  # cycling types nothing
    s.send(TAB)
    wait(lambda: s.ed.buffer.text == "The cat ran off into the garden.", what="accept the alternative")
    wait(lambda: db_rows("SELECT action FROM suggestions"), what="suggestion log")
    row = db_rows("SELECT action, text, accepted, chosen FROM suggestions")[-1]
    assert row["action"] == "accepted" and row["accepted"] == " ran off into the garden."
    chosen = json.loads(row["chosen"])
    assert chosen["alternative"] == 2 and chosen["of"] == 3 and chosen["seed"] == SEEDS[1]
    assert chosen["streamed"] is False and chosen["fluency"] == -1.0 and chosen["passes"] is True


def test_the_panel_shows_the_scores_of_the_suggestion_that_shows(session):
    s = session(text="", engine=alt_engine())
    s.send("iThe cat")
    s.wait_ghost()
    sg = ready(s)
    s.send(ALT_NEXT + ALT_NEXT)
    wait(lambda: sg.position() == (3, 3), what="third")
    n_req = len(s.engine.requests)
    s.send(F2)
    wait(lambda: s.ed.panel.is_open, what="panel")
    text = fragment_list_to_text(s.ed.panel._fragments())
    assert ("suggestion 3/3 (the first): fluency -1.50, repeats 0.00, copied 0.00, invented none"
            in text), text
    assert sg.current is not None and not sg.visible()  # hidden while the panel is open, not dropped
    s.send(ESC)
    wait(lambda: not s.ed.panel.is_open and sg.visible(), what="panel closed, ghost back")
    assert sg.text == REPLY and sg.position() == (3, 3)
    time.sleep(0.1)
    assert len(s.engine.requests) == n_req  # no new suggestion replaced it


def test_after_accepting_a_word_what_shows_stays_and_cycling_keeps_the_accepted_part(session):
    hold = threading.Event()
    eng = AltEngine({SEEDS[0]: " sat by the door.", SEEDS[1]: " ran away.", SEEDS[2]: " sat still."},
                    {SEEDS[0]: -0.2, SEEDS[1]: -0.3, SEEDS[2]: -0.4}, hold=hold)
    s = session(text="", engine=eng)
    s.send("iThe cat")
    s.wait_ghost()
    s.send(CTRL_RIGHT)
    wait(lambda: s.ed.buffer.text == "The cat sat", what="accept word")
    hold.set()
    sg = ready(s)
    assert sg.text == REPLY[len(" sat"):]  # part was taken: the streamed one keeps showing
    s.send(ALT_NEXT)  # only those that go on from " sat": the two seeds that start with it
    wait(lambda: sg.text == " by the door.", what="next after a word")
    s.send(ALT_NEXT)
    wait(lambda: sg.text == " still.", what="and the next")
    s.send(ALT_NEXT)
    wait(lambda: sg.text == REPLY[len(" sat"):], what="back to the streamed one")
    assert " ran away." not in [sg.text]
    s.send(ALT_NEXT + TAB)
    wait(lambda: s.ed.buffer.text == "The cat sat by the door.", what="accept")


def test_typing_cancels_alternatives_and_a_new_suggestion_follows(session):
    hold = threading.Event()  # never set: the alternatives run until cancelled
    eng = alt_engine(hold=hold)
    s = session(text="", engine=eng, debounce_ms=600)
    s.send("iThe cat")
    s.wait_ghost()
    wait(lambda: eng.alt_calls, what="alternatives asked for")
    n_req = len(eng.requests)
    s.send("s")
    wait(lambda: eng.alt_cancelled == 1, what="alternatives cancelled")
    assert len(eng.requests) == n_req  # by the keystroke itself, not by the next suggestion
    wait(lambda: len(eng.requests) > n_req and eng.requests[-1].prompt == "The cats", what="new request")
    s.send(ALT_NEXT)  # nothing to cycle yet: it types nothing and changes nothing
    time.sleep(0.1)
    assert s.ed.buffer.text == "The cats"


def test_emacs_mode_cycles_too(session):
    s = session(text="", keys="emacs", engine=alt_engine())
    s.send("The cat")
    s.wait_ghost()
    sg = ready(s)
    s.send(ALT_NEXT)
    wait(lambda: sg.position() == (2, 3), what="Alt-] in emacs mode")
    s.send(ALT_PREV)
    wait(lambda: sg.position() == (1, 3) and sg.text == SAT, what="Alt-[ in emacs mode")


def test_alternatives_off(session):
    eng = alt_engine()
    s = session(text="", engine=eng, alternatives=0)
    s.send("iThe cat")
    assert s.wait_ghost() == REPLY
    time.sleep(0.1)
    assert not eng.alt_calls and s.ed.suggest.position() is None
    s.send(ALT_NEXT)
    time.sleep(0.05)
    assert s.ed.suggest.text == REPLY and s.ed.buffer.text == "The cat"


def test_the_config_key(data_dir, capsys):
    from morph.config import load_config

    assert load_config().alternatives == 3
    for value, want in (("0", 0), ("7", 7), ("8", 3), ('"two"', 3), ("true", 3)):
        (data_dir / "config.toml").write_text(f"[editor]\nalternatives = {value}\n")
        assert load_config().alternatives == want, value
    err = capsys.readouterr().err
    assert err.count("ignoring editor.alternatives") == 3
