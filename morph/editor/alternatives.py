"""Alternatives to a ghost suggestion: more continuations, checked and ranked like a ladder.

After a suggestion has streamed (its time to first token is untouched), the engine decodes
`[editor] alternatives` more continuations of the same prompt in one batch
(LlamaEngine.alternatives) and scores the streamed one in that batch too. Each is checked
the way morph/choose.py checks a ladder, adapted to a continuation, where there is no input
whose meaning must be kept:

- **fluency**: the mean log-probability of its tokens under the model as it ran (the logits
  the batch computed anyway);
- **repeats**: the share of its word 3-grams it already said (a loop);
- **copied**: the share of its word 4-grams found in the text before the cursor (parroting);
- **invented**: names and numbers the text before never mentions (morph.meaning), which a
  135M model makes up rather than knows.

A candidate passes with no invented name or number and repeats and copied at most
MAX_REPEATS and MAX_COPIED (set by hand: they catch a loop or a copied sentence, not style);
the most fluent that passes is shown, else the most fluent. There is no style read: it
needs the feature's block output (choose.py), which the generation context does not capture
(a callback there costs every decode), so a second pass would be needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from morph import meaning

# The alternatives' sampling: ghost text's (tasks.FRAMING_SAMPLING) at a higher temperature.
# At ghost's 0.2, 3 seeded alternatives to 6 suggestions (bench/editor.py's prose, 32
# tokens) differed from the first one and each other only late: 1.83 of 4 distinct first
# five words; at 0.5, 3.83 of 4, for 0.16 nats/token less fluency (-1.56 vs -1.40).
TEMPERATURE = 0.5
SEED = 101  # the first alternative's seed (then +1 each): the same context gives the same alternatives
MAX_REPEATS = 0.2
MAX_COPIED = 0.3
_WORDS = re.compile(r"\w+(?:['’]\w+)?")
_DIGITS = re.compile(r"\d+(?:[.,:]\d+)*")


@dataclass(frozen=True)
class Scores:
    fluency: float  # mean log-probability per token
    repeats: float
    copied: float
    invented: tuple[str, ...] = ()

    @property
    def passes(self) -> bool:
        return not self.invented and self.repeats <= MAX_REPEATS and self.copied <= MAX_COPIED

    def as_dict(self) -> dict:
        return {"fluency": round(self.fluency, 3), "repeats": round(self.repeats, 3), "copied": round(self.copied, 3),
                "invented": list(self.invented), "passes": self.passes}

    def describe(self) -> str:
        inv = ", ".join(self.invented) if self.invented else "none"
        return (f"fluency {self.fluency:+.2f}, repeats {self.repeats:.2f}, copied {self.copied:.2f}, "
                f"invented {inv}{'' if self.passes else ' (fails the checks)'}")


@dataclass
class Alternative:
    """One suggestion the user can cycle to: the text as shown, its scores, where it came from."""

    text: str
    scores: Scores
    streamed: bool = False  # the suggestion that streamed first
    seed: int | None = None


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def score(before: str, text: str, logprobs) -> Scores:
    """The checks for `text` continuing `before` (the prompt window), with its tokens' log-probs."""
    words = [w.lower() for w in _WORDS.findall(text)]
    tri = _ngrams(words, 3)
    seen: set = set()
    again = 0
    for g in tri:
        again += g in seen
        seen.add(g)
    quad = _ngrams(words, 4)
    before_quads = set(_ngrams([w.lower() for w in _WORDS.findall(before)], 4)) if quad else set()
    copied = sum(g in before_quads for g in quad) / len(quad) if quad else 0.0
    names = meaning.retention(before, text).invented
    numbers = tuple(sorted(_numbers(text) - _numbers(before)))
    fluency = float(sum(logprobs) / len(logprobs)) if len(logprobs) else float("-inf")
    return Scores(fluency, again / len(tri) if tri else 0.0, copied, names + numbers)


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _DIGITS.findall(text)}


def rank(alts: list[Alternative]) -> list[Alternative]:
    """Best first: those that pass the checks before those that fail, then by fluency (a
    blank one last)."""
    return sorted(alts, key=lambda a: (not a.text.strip(), not a.scores.passes, -a.scores.fluency))


def cut_blanks(text: str, n: int) -> str:
    """`text` without up to `n` leading blanks (the prompt lost as many: ghost.py)."""
    lead = len(text) - len(text.lstrip(" \t"))
    return text[min(lead, n):]
