"""GGUF -> Hugging Face safetensors folder, for the vLLM engine (`--gpu`).

vLLM cannot load our GGUF files on CPU (FACTS), so a model is converted once: transformers
reads the GGUF (dequantising every tensor), the weights go into a plain model built from the
same config without the GGUF quantization config, and `save_pretrained` writes safetensors
with the tokenizer (chat template included). The folder lives under the data dir,
`hf/<model-id>/`, and is written into a temp folder renamed into place at the end:
an interrupted conversion leaves nothing that looks finished. A user's own Hugging Face
folder (`--model DIR` with a config.json) is used as is.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from morph import paths
from morph.errors import MorphError
from morph.models import ModelFile, ModelInfo, model_id_for

MARKER = "morph-convert.json"  # written last inside the temp folder: provenance of the conversion
FORMAT = 2  # bump when a conversion made by an older morph must be redone
_INSTALL = "the GPU engine needs vLLM (and transformers): pip install 'morph[gpu]'"


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def hf_info(path: Path) -> ModelInfo:
    """ModelInfo for a Hugging Face folder (config.json), as `models.check` gives for a GGUF."""
    path = Path(path).resolve()
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MorphError(f"{path}: unreadable config.json ({e})") from None
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    try:
        n_layer = int(text_cfg["num_hidden_layers"])
        n_embd = int(text_cfg["hidden_size"])
    except (KeyError, TypeError, ValueError):
        raise MorphError(f"{path}: config.json lacks num_hidden_layers/hidden_size") from None
    tok_cfg = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file()
    if not has_template and tok_cfg.is_file():
        try:
            has_template = bool(json.loads(tok_cfg.read_text(encoding="utf-8")).get("chat_template"))
        except (OSError, ValueError):
            pass
    name = model_id_for(path)
    return ModelInfo(
        file=ModelFile(name, path, "hf"),
        arch=str(cfg.get("model_type", "")),
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=int(text_cfg.get("vocab_size", 0) or 0),
        n_ctx_train=int(text_cfg.get("max_position_embeddings", 0) or 0),
        general_name=name,
        has_chat_template=has_template,
    )


def _read_marker(folder: Path) -> dict:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def converted_dir(info: ModelInfo) -> Path:
    """Where the converted folder of a GGUF model lives: `hf/<model-id>`, so that the folder
    names the same model id (and vectors) as its GGUF, also for a plain `vllm serve`. Its
    marker records the source's size: another GGUF of that id converts again, replacing it."""
    return paths.data_dir() / "hf" / info.model_id


def _source_key(info: ModelInfo) -> dict:
    st = info.file.path.stat()
    return {"source": str(info.file.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_converted(info: ModelInfo) -> bool:
    d = converted_dir(info)
    m = _read_marker(d)
    return bool(m) and m.get("size") == info.file.path.stat().st_size and m.get("format") == FORMAT


@contextlib.contextmanager
def _lock(parent: Path, name: str):
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sweep_stale(parent: Path, name: str) -> None:
    """Temp folders left by a killed conversion (we hold the lock: nobody else is writing)."""
    for p in parent.glob(f".{name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def ensure_converted(info: ModelInfo, log: Callable[[str], None] | None = None) -> Path:
    """The safetensors folder for `info`: a Hugging Face folder as is, a GGUF converted once."""
    if info.file.path.is_dir():
        if not is_hf_folder(info.file.path):
            raise MorphError(f"{info.file.path}: a folder without config.json is not a Hugging Face model")
        return info.file.path
    if is_converted(info):
        return converted_dir(info)
    return convert(info, log=log)


def convert(info: ModelInfo, log: Callable[[str], None] | None = None, force: bool = False) -> Path:
    """Convert the GGUF of `info` into a safetensors folder; returns the folder."""
    log = log or (lambda s: print(f"morph: {s}", file=sys.stderr, flush=True))
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        raise MorphError(_INSTALL) from None
    final = converted_dir(info)
    parent, name = final.parent, final.name
    with _lock(parent, name):
        if not force and is_converted(info):
            return final
        _sweep_stale(parent, name)
        tmp = parent / f".{name}.tmp-{os.getpid()}"
        t0 = time.perf_counter()
        try:
            _write_folder(info, tmp, log, torch)
            if final.exists():
                old = parent / f".{name}.tmp-old-{os.getpid()}"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log(f"converted {info.file.path.name} -> {final} in {time.perf_counter() - t0:.1f} s")
    return final


def _write_folder(info: ModelInfo, tmp: Path, log, torch) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = info.file.path
    src_dir, src_name = str(gguf.parent), gguf.name
    hf_logging.set_verbosity_error()
    log(f"converting {src_name} for the GPU engine (once; dequantised to float32 safetensors)")
    log("[1/3] reading and dequantising the GGUF")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_name, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise MorphError(f"{src_name}: transformers cannot convert this GGUF ({_short(e)})") from None
    _bos_eos_like_llama_cpp(tokenizer, gguf)
    log("[2/3] building a plain model without the GGUF quantization config")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config = AutoConfig.for_model(**{k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    config.torch_dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    state = loaded.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not _is_tied(k, config)]
    if missing or unexpected:
        raise MorphError(f"{src_name}: converted weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    del loaded, state
    log("[3/3] writing safetensors")
    tmp.mkdir(parents=True)
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    meta = dict(_source_key(info), format=FORMAT, model_id=info.model_id, fingerprint=info.fingerprint,
                transformers=__import__("transformers").__version__)
    # The marker goes last: a folder holding it is complete.
    (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _bos_eos_like_llama_cpp(tokenizer, gguf: Path) -> None:
    """llama.cpp adds BOS when the GGUF says `tokenizer.ggml.add_bos_token` (Gemma does;
    SmolLM2 does not). transformers' GGUF tokenizer drops that flag, and Gemma without its
    BOS writes garbage: carry it over so both engines see the same token ids."""
    from morph.models import read_gguf_header

    kv, _ = read_gguf_header(gguf)
    for flag in ("add_bos_token", "add_eos_token"):
        val = kv.get(f"tokenizer.ggml.{flag}")
        if isinstance(val, bool) and hasattr(tokenizer, flag):
            setattr(tokenizer, flag, val)


def _is_tied(key: str, config) -> bool:
    return key == "lm_head.weight" and bool(getattr(config, "tie_word_embeddings", False))


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__
