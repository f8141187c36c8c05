"""Does a rewrite keep what its input says? The lexical half of morph's meaning check.

A steered rewrite may change *how* a text reads, never its facts: the numbers, the names
and most of the content words have to survive. This measures what share of each kind of
the input's words the output keeps (the embedding half, token alignment, is in
`morph.choose`). Plain text only: no model, so it is cheap enough to run on every
candidate of a ladder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Function words: keeping them says nothing about meaning. A short list is enough: what
# matters is that content words are counted, and a missed stop word only lowers the
# threshold's bite a little.
STOP_WORDS = frozenset("""
a an the and or but if then so than that this these those there here of to in on at by for from with
without into onto over under about above below after before during until while as is are was were be
been being am do does did doing have has had having will would shall should can could may might must
it its i me my mine we us our ours you your yours he him his she her hers they them their theirs what
which who whom whose when where why how all any both each few more most other some such no nor not
only own same too very just also again further once up down out off s t please thanks thank hi hello
hey dear yes ok okay oh well now get got go going let
""".split())
NUMBER_WORDS = frozenset("""
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen
seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand
million billion first second third fourth fifth sixth seventh eighth ninth tenth half dozen
""".split())
# Capitalised words a register change brings without naming anyone.
TITLES = frozenset("""
dear sir madam mr mrs ms dr regards sincerely best kind warm team all everyone monday tuesday wednesday
thursday friday saturday sunday january february march april may june july august september october
november december i
""".split())
_TOKEN = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?|\d+(?:[.,:]\d+)*", re.UNICODE)
_SUFFIXES = ("ingly", "edly", "ing", "ied", "ies", "ed", "es", "s", "ly")


def stem(word: str) -> str:
    """A crude suffix strip, so that "delayed" keeps "delay" and "meetings" "meeting"."""
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    for suf in _SUFFIXES:
        if len(w) > len(suf) + 3 and w.endswith(suf):
            return w[: -len(suf)]
    return w


@dataclass(frozen=True)
class Words:
    numbers: frozenset[str]  # digits as written ("2,450" -> "2450") and number words
    names: frozenset[str]  # capitalised words not at a sentence start, lower-cased
    content: frozenset[str]  # stems of the other words of 3+ letters that are not stop words


def words(text: str) -> Words:
    numbers, names, content = set(), set(), set()
    prev_end = 0
    for m in _TOKEN.finditer(text):
        tok, low = m.group(0), m.group(0).lower()
        gap = text[prev_end: m.start()]
        sentence_start = prev_end == 0 or any(c in gap for c in ".!?:\n")
        prev_end = m.end()
        if tok[0].isdigit():
            numbers.add(tok.replace(",", ""))
        elif low in NUMBER_WORDS:
            numbers.add(low)
        elif low not in STOP_WORDS:
            if tok[0].isupper() and not sentence_start:
                names.add(low)
            elif len(tok) > 2:
                content.add(stem(tok))
    return Words(frozenset(numbers), frozenset(names), frozenset(content))


@dataclass(frozen=True)
class Retention:
    """Share of the input's numbers, names and content words found in the output (1.0 when
    the input has none of that kind), and the names the output brings that the input never
    mentions ("Dear Dr. Sarah Thompson", "[Your Name]": made up, not rewritten)."""

    numbers: float
    names: float
    content: float
    invented: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"numbers": round(self.numbers, 3), "names": round(self.names, 3), "content": round(self.content, 3),
                "invented": list(self.invented)}


def retention(source: str, output: str) -> Retention:
    src, out = words(source), words(output)
    low = output.lower()
    out_stems = out.content | {stem(n) for n in out.names}

    def share(have: frozenset[str], kept) -> float:
        return 1.0 if not have else sum(1 for w in have if kept(w)) / len(have)

    src_low = source.lower()
    return Retention(
        numbers=share(src.numbers, lambda n: n in out.numbers or n in low),
        names=share(src.names, lambda n: n in low),
        content=share(src.content, lambda w: w in out_stems),
        invented=tuple(sorted(n for n in out.names if n not in src_low and n not in TITLES)),
    )
