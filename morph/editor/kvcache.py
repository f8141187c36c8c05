"""Suggestion state per document on disk, so the first suggestion after reopening needs no prefill.

When the editor closes, the KV cells of the prompt window at the end of the document (what
the next session's first suggestion continues) go to `<data>/kvcache/<hash of the path>.kv`.
On the next open they are loaded back only if every part of the key still holds; otherwise
the file is deleted:

- the engine's `state_key`: the model file (path, size, mtime), the llama.cpp version and
  cell layout, the steering vector, its placement and the vector the prompt gets;
- the document path, and the token ids: the saved ones must be a prefix of the window's
  tokens now (the text before the cursor is what it was);
- a checksum over the tokens and cells, so a torn or corrupt file never reaches llama.cpp
  (which checks the layout again; the engine then checks the positions it read back).

Files are written atomically (fsutil). The directory is kept under `kv_cache_mb`
(`[editor]` in config.toml, default 256 MB; a 4,000-character window is ~20 MB), the least
recently used going first; 0 turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from morph import fsutil, paths

MAGIC = b"MORPHKV1"
SUFFIX = ".kv"
MIN_TOKENS = 64  # a shorter prefix is cheaper to evaluate than to store


def cache_file(doc_path: Path) -> Path:
    key = hashlib.sha256(str(doc_path).encode("utf-8")).hexdigest()[:24]
    return paths.kvcache_dir() / f"{key}{SUFFIX}"


def _checksum(tokens: bytes, payload: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(tokens)
    h.update(payload)
    return h.hexdigest()


def save(engine, request, doc_path: Path, max_bytes: int) -> int:
    """Store the cached cells of `request`'s prompt for `doc_path`; returns the tokens saved
    (0: nothing worth saving, or the cache is off). OSError propagates."""
    if max_bytes <= 0:
        return 0
    got = engine.export_state(request)
    if got is None or len(got[0]) < MIN_TOKENS:
        return 0
    tokens, payload = got
    tok = struct.pack(f"<{len(tokens)}i", *tokens)
    header = json.dumps({
        "doc": str(doc_path), "key": engine.state_key(request), "n_tokens": len(tokens),
        "payload_bytes": len(payload), "checksum": _checksum(tok, payload),
    }).encode("utf-8")
    target = cache_file(doc_path)
    fsutil.atomic_write(target, MAGIC + struct.pack("<I", len(header)) + header + tok + payload, mode=0o600)
    evict(target.parent, max_bytes, keep=target)
    return len(tokens)


def _read(path: Path) -> tuple[dict, list[int], bytes] | None:
    """(header, tokens, payload) of a well-formed file, else None."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    n0 = len(MAGIC) + 4
    if len(data) < n0 or not data.startswith(MAGIC):
        return None
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    try:
        header = json.loads(data[n0 : n0 + hlen].decode("utf-8"))
        n, m = int(header["n_tokens"]), int(header["payload_bytes"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    start = n0 + hlen
    if n <= 0 or m <= 0 or len(data) != start + 4 * n + m:
        return None
    tok, payload = data[start : start + 4 * n], data[start + 4 * n :]
    if header.get("checksum") != _checksum(tok, payload):
        return None
    return header, list(struct.unpack(f"<{n}i", tok)), payload


def restore(engine, request, doc_path: Path) -> int:
    """Load `doc_path`'s saved state if it was made for exactly this model, vector, placement
    and window start (its tokens a prefix of `request`'s prompt); returns the tokens now
    cached (0: none; a file that does not fit is deleted)."""
    path = cache_file(doc_path)
    if not path.exists():
        return 0
    got = _read(path)
    n = 0
    if got is not None:
        header, tokens, payload = got
        if header.get("doc") == str(doc_path) and header.get("key") == engine.state_key(request):
            n = engine.import_state(request, tokens, payload)
    if n:
        try:
            os.utime(path)  # recently used
        except OSError:
            pass
    else:
        path.unlink(missing_ok=True)
    return n


def evict(directory: Path, max_bytes: int, keep: Path | None = None) -> None:
    """Delete the least recently used files until the directory holds at most `max_bytes`
    (the file just written last, if it alone is too large)."""
    files = []
    for p in directory.glob(f"*{SUFFIX}"):
        try:
            st = p.stat()
        except OSError:
            continue
        files.append((p == keep, st.st_mtime_ns, st.st_size, p))
    files.sort(key=lambda f: (f[0], f[1]))  # oldest first, the one to keep last
    total = sum(f[2] for f in files)
    for _, _, size, p in files:
        if total <= max_bytes:
            break
        p.unlink(missing_ok=True)
        total -= size
