"""The single-file executable's payload: what is unpacked once, not on every start.

`dist/morph` (built by `python3 -m morph._bundle.build`) is a PyInstaller one-file
executable. PyInstaller unpacks everything in its archive into a fresh temp directory on
*every* start: for the 98 MB model that alone costs 0.5-3.5 s (zlib, measured here), and
even uncompressed, numpy's and llama.cpp's libraries cost ~0.25 s per start. So the
large, read-only parts travel in a second ELF section of the executable,
`morphpayload`: an uncompressed tar of `site/` (the numpy and llama_cpp packages, with
the libraries they load), `ggml/` (llama.cpp's CPU backend variants), the embedded model
with its wheel's dist-info (so `morph.models` finds it through package metadata as
always), `embed/` (the sentence embedder's GGUF, converted at build time) and `vectors/`. The entry point unpacks it on the first run into
`<data dir>/bundle/<payload id>/` (a temp dir, then an atomic rename) and puts it on
sys.path; later runs only check that the directory is complete.

Outside a bundle (`pip install`), `unpacked()` is None and nothing here runs.
"""

from __future__ import annotations

import os
import struct
import sys
import tarfile
import tempfile
from pathlib import Path

SECTION = "morphpayload"
EMBED_DIR = "embed"  # the embedder's GGUF in the payload (engine/minilm.py looks there first)
_DONE = ".complete"
_unpacked: Path | None = None


def frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def elf_section(path: str | os.PathLike, name: str) -> tuple[int, int] | None:
    """(file offset, size) of the named section of a 64-bit little-endian ELF file."""
    with open(path, "rb") as fh:
        eh = fh.read(64)
        if len(eh) < 64 or eh[:4] != b"\x7fELF" or eh[4] != 2 or eh[5] != 1:
            return None
        shoff, = struct.unpack_from("<Q", eh, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", eh, 0x3A)
        fh.seek(shoff)
        table = fh.read(shentsize * shnum)
        if len(table) < shentsize * shnum or shstrndx >= shnum:
            return None

        def header(i):  # sh_name, sh_offset, sh_size
            b = i * shentsize
            return struct.unpack_from("<I", table, b)[0], *struct.unpack_from("<QQ", table, b + 0x18)

        _, str_off, str_size = header(shstrndx)
        fh.seek(str_off)
        names = fh.read(str_size)
        want = name.encode()
        for i in range(shnum):
            n, off, size = header(i)
            if names[n:names.find(b"\0", n)] == want:
                return off, size
    return None


def _payload() -> tuple[str, int, int] | None:
    found = elf_section(sys.executable, SECTION)
    if found is None:
        return None
    off, size = found
    with open(sys.executable, "rb") as fh:  # the id: a digest the build wrote first in the section
        fh.seek(off)
        head = fh.read(64)
    ident = head.split(b"\n", 1)[0].decode("ascii", "replace")
    return ident, off + len(ident) + 1, size - len(ident) - 1


def activate(argv: list[str]) -> Path | None:
    """At start-up, before numpy or llama_cpp is imported: unpack if needed, then import
    from the payload. The data dir comes from `--data-dir` (looked for before the
    subcommand, as click will parse it), MORPH_DATA_DIR or the XDG default."""
    if not frozen():
        return None
    from morph import paths

    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            break  # the subcommand: its options are its own
        if arg == "--data-dir" and i + 1 < len(argv):
            paths.set_data_dir(argv[i + 1])
        elif arg.startswith("--data-dir="):
            paths.set_data_dir(arg.split("=", 1)[1])
    return unpacked()


def unpacked() -> Path | None:
    """The unpacked payload directory (unpacking it on first use), or None outside a bundle."""
    global _unpacked
    if _unpacked is not None or not frozen():
        return _unpacked
    found = _payload()
    if found is None:
        return None
    ident, off, size = found
    from morph import paths
    from morph.errors import MorphError

    try:
        root = paths.data_dir() / "bundle"
        target = root / ident
        if not (target / _DONE).is_file():
            _unpack(off, size, root, target)
    except OSError as e:
        raise MorphError(f"cannot unpack the embedded model and libraries into {paths.data_dir()} "
                         f"({e.strerror or e}); give a writable --data-dir") from None
    sys.path.insert(0, str(target / "site"))  # numpy, llama_cpp: imported from here
    sys.path.append(str(target))  # the model's dist-info: found through package metadata
    paths.set_bundle_dir(target)  # the shipped vectors are in the payload
    _unpacked = target
    return target


def _unpack(off: int, size: int, root: Path, target: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    print(f"morph: unpacking the embedded model and libraries into {target} (first run only)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
    try:
        with open(sys.executable, "rb") as fh:
            fh.seek(off)
            with tarfile.open(fileobj=_Window(fh, size), mode="r|") as tar:
                tar.extractall(tmp, filter="data")
        (tmp / _DONE).write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _DONE).is_file():  # not a concurrent first run that won the race
                raise
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    # Payloads of other builds stay: another version may be running from one right now.
    others = [p for p in root.iterdir() if p.name != target.name and not p.name.startswith(".")]
    if others:
        print(f"morph: {len(others)} payload(s) of other morph builds remain in {root}; remove the ones "
              "no longer used", file=sys.stderr)


class _Window:
    """A read-only file object over bytes [start, start+size) of an open file."""

    def __init__(self, fh, size: int):
        self.fh, self.left = fh, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n)
        self.left -= len(data)
        return data


def backends_dir() -> Path | None:
    """llama.cpp's CPU backend variants (libggml-cpu-*.so), chosen at run time by ggml."""
    d = unpacked()
    return d / "ggml" if d is not None and (d / "ggml").is_dir() else None
