"""Latent evidence: how often each latent fires and the contexts where it fires hardest.

Stored beside the SAE as gzip JSON (`sae-L<layer>.evidence.json.gz`): per latent its
activation frequency over the corpus, mean activation when active, and the top contexts
(distinct texts) as token windows with the activating token's index. Token pieces
are stored once in a table and referenced by number, which keeps the file small.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from morph import fsutil
from morph.errors import MorphError
from morph.sae.train import SAE

BEFORE, AFTER = 12, 3  # tokens shown around the activating one


def encode_corpus(sae: SAE, x: np.ndarray, chunk: int = 8192,
                  progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """TopK codes for every row: (idx (N, k) int32, val (N, k) float32)."""
    idx = np.empty((len(x), sae.k), np.int32)
    val = np.empty((len(x), sae.k), np.float32)
    for i in range(0, len(x), chunk):
        idx[i : i + chunk], val[i : i + chunk] = sae.encode(x[i : i + chunk])
        if progress:
            progress(min(chunk, len(x) - i))
    return idx, val


def build_evidence(sae: SAE, idx: np.ndarray, val: np.ndarray, doc: np.ndarray, pos: np.ndarray,
                   docs: list[dict], piece: Callable[[int], str], top: int = 6) -> dict:
    """Frequencies and top contexts from the codes of a corpus."""
    n_rows, k = idx.shape
    lat = idx.ravel()
    act = val.ravel()
    row = np.repeat(np.arange(n_rows, dtype=np.int64), k)
    on = act > 0
    lat, act, row = lat[on], act[on], row[on]
    counts = np.bincount(lat, minlength=sae.width)
    sums = np.bincount(lat, weights=act, minlength=sae.width)
    order = np.lexsort((-act, lat))  # by latent, strongest first
    lat_s, act_s, row_s = lat[order], act[order], row[order]
    starts = np.searchsorted(lat_s, np.arange(sae.width + 1))
    table: dict[int, int] = {}  # token id -> index into pieces
    pieces: list[str] = []

    def ref(t: int) -> int:
        if t not in table:
            table[t] = len(pieces)
            pieces.append(piece(t))
        return table[t]

    latents = []
    for j in range(sae.width):
        a, b = starts[j], starts[j + 1]
        seen: set[tuple] = set()
        ctxs = []
        for r, v in zip(row_s[a:b], act_s[a:b]):
            d = int(doc[r])
            p = int(pos[r])
            toks = docs[d]["tokens"]
            lo, hi = max(0, p - BEFORE), min(len(toks), p + AFTER + 1)
            key = tuple(toks[max(lo, p - 4) : p + 1])  # reframed copies repeat a text: show it once
            if key in seen:
                continue
            seen.add(key)
            ctxs.append({"a": round(float(v), 3), "t": [ref(int(t)) for t in toks[lo:hi]],
                         "m": p - lo, "g": docs[d]["genre"]})
            if len(ctxs) >= top:
                break
        # The tokens it fires on most (over all its activations), for a cheap label.
        common = Counter(int(docs[int(doc[r])]["tokens"][int(pos[r])]) for r in row_s[a : min(b, a + 200)])
        latents.append({
            "id": j,
            "freq": round(float(counts[j]) / n_rows, 7),
            "mean": round(float(sums[j] / counts[j]), 4) if counts[j] else 0.0,
            "tokens": [ref(t) for t, _ in common.most_common(5)],
            "top": ctxs,
        })
    return {"n_tokens": int(n_rows), "width": sae.width, "before": BEFORE, "after": AFTER,
            "pieces": pieces, "latents": latents}


def dead_share(ev: dict) -> float:
    return sum(1 for l in ev["latents"] if l["freq"] == 0) / max(1, len(ev["latents"]))


def save_evidence(ev: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.replacing(path) as tmp:
        with gzip.GzipFile(tmp, "wb", mtime=0) as fh:  # mtime=0: same bytes for the same data
            fh.write(json.dumps(ev, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return path


def load_evidence(path: Path) -> dict:
    try:
        with gzip.open(path, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise MorphError(f"{path}: unreadable evidence file ({e})") from None


def context_text(ev: dict, ctx: dict, mark: tuple[str, str] = ("[[", "]]")) -> str:
    """A context as one line with the activating token wrapped in `mark`."""
    ps = ev["pieces"]
    parts = []
    for i, t in enumerate(ctx["t"]):
        s = ps[t]
        parts.append(f"{mark[0]}{s}{mark[1]}" if i == ctx["m"] else s)
    return "".join(parts).replace("\n", "\\n")


def latent_label(ev: dict, j: int) -> str:
    """The tokens latent j fires on most, e.g. `" regret", " sincerely"`."""
    ps = ev["pieces"]
    return ", ".join(json.dumps(ps[t]) for t in ev["latents"][j]["tokens"])


def find_evidence(model_id: str) -> tuple[dict, dict, Path] | None:
    """(evidence, the manifest's "sae" block, its directory) for a model: the user's
    build first, then the shipped one; None if neither has an SAE."""
    from morph import paths

    for d in (paths.user_vectors_dir() / model_id, paths.shipped_vectors_dir() / model_id):
        man = d / "features.json"
        if not man.is_file():
            continue
        try:
            raw = json.loads(man.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        sae = raw.get("sae") if isinstance(raw, dict) else None  # a hand-edited manifest: anything
        if isinstance(sae, dict) and isinstance(sae.get("evidence"), str) and (d / sae["evidence"]).is_file():
            return load_evidence(d / sae["evidence"]), sae, d
    return None


def parse_latent(spec: str) -> int | None:
    """`123` or `latent:123` -> 123; anything else -> None (a feature name)."""
    s = spec.strip()
    if s.lower().startswith("latent:"):
        s = s[7:]
    return int(s) if s.isdecimal() else None  # not isdigit(): int() refuses "¹"


def latent_record(ev: dict, j: int, mark: tuple[str, str] = ("[[", "]]")) -> dict:
    if not 0 <= j < len(ev["latents"]):
        raise MorphError(f"latent {j} does not exist (the SAE has {len(ev['latents'])})")
    lat = ev["latents"][j]
    return {
        "latent": j,
        "frequency": lat["freq"],
        "mean_activation": lat["mean"],
        "explanation": lat.get("explanation", ""),
        "self_explanation": lat.get("self_explanation"),  # the strength sweep (interpret.py), if stored
        "fires_on": [ev["pieces"][t] for t in lat["tokens"]],
        "contexts": [{"activation": c["a"], "genre": c["g"], "text": context_text(ev, c, mark),
                      "token": ev["pieces"][c["t"][c["m"]]]} for c in lat["top"]],
    }


def search_latents(ev: dict, query: str) -> list[int]:
    """Latents whose self-explanation or most frequent tokens mention `query`."""
    q = query.lower()
    hits = []
    for lat in ev["latents"]:
        text = lat.get("explanation", "") + " " + " ".join(ev["pieces"][t] for t in lat["tokens"])
        if q in text.lower():
            hits.append(lat["id"])
    return hits
