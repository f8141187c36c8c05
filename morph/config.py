"""User configuration: $XDG_DATA_HOME/tinymorph/config.toml.

A commented default file is written on first use so that the keys are discoverable.
Unknown keys are ignored; a malformed file is reported (one line) and defaults are used.
"""

from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass, field

from morph import paths

DEFAULT_TOML = """\
# morph configuration. Every key is optional; delete a line to get the default back.

# Model: "smollm2" (the embedded default), a file name under models/, or a path to a GGUF.
# model = "smollm2"

# CPU threads for generation (default: the cores this process may use).
# threads = 2

# Fewer threads while other programs keep the CPUs busy (llama.cpp's threads wait for each
# other after every step, so one that is off the CPU stalls the rest). Default: on.
# adaptive_threads = true

# Context window in tokens.
# n_ctx = 4096

# llama.cpp's extra buffer types (weights repacked for other kernels; AMX on CPUs that
# have it). Default: off on CPUs with AMX, where they crash (llama.cpp#20824), on elsewhere.
# extra_buffer_types = false

# Features applied when none are given on the command line, name = scale
# (scale is a fraction of the layer's residual norm; omit it with `features.formal = "default"`).
[features]
# formal = 0.3

# Sampling defaults for every command (a command's flags override them).
[generation]
# temperature = 0.7
# top_p = 0.95
# top_k = 40
# repeat_penalty = 1.1   # 1.0 turns it off; the 135M model loops without it
# repeat_last_n = 64

# Where a feature's vector is added, per mode: "all" positions, only "generated" tokens
# (the prompt is read unsteered), or "prompt-scaled:F" (F x the vector on the prompt).
# The defaults below were chosen on morph eval's tuning half.
[steering.apply]
# rewrite = "prompt-scaled:0.25"
# continue = "all"
# chat = "prompt-scaled:0.25"
# ghost = "all"

[gpu]
# tensor_parallel_size = 1   # GPUs per model for --gpu (vLLM tensor parallelism)
# compile = false            # torch.compile + CUDA graphs: faster decoding, slower start, no capture

[editor]
# keys = "vi"          # or "emacs"
# debounce_ms = 250    # pause before a suggestion starts
# suggestion_tokens = 32
# kv_cache_mb = 256    # saved suggestion state per document (kvcache/, ~20 MB each); 0: none
# choose = true        # expand/compress at the features' default strengths: the strongest of a
#                      # ladder of candidates that keeps the meaning; false: one generation
# alternatives = 3     # more suggestions decoded together after the first (Alt-] / Alt-[
#                      # cycle, the best by fluency and repetition shows); 0: none; at most 7
"""


MAX_ALTERNATIVES = 7  # the engine's scratch sequences (engine/llama.ALT_SEQS) hold these and the first


@dataclass
class Config:
    model: str | None = None
    threads: int | None = None
    n_ctx: int = 4096
    extra_buffer_types: bool | None = None  # None: off on AMX CPUs, on elsewhere (engine/llamacpp.py)
    adaptive_threads: bool = True  # engine/llamacpp.ThreadGovernor
    features: dict[str, float | None] = field(default_factory=dict)
    generation: dict[str, float | int] = field(default_factory=dict)  # tasks.Sampling fields
    apply: dict[str, str] = field(default_factory=dict)  # framing -> "all" | "generated"
    editor_keys: str = "vi"
    debounce_ms: int = 250
    suggestion_tokens: int = 32
    kv_cache_mb: int = 256
    editor_choose: bool = True  # telescope at default strengths: choose among a ladder (morph/choose.py)
    alternatives: int = 3  # ghost text: suggestions decoded after the first, to cycle through (editor/alternatives.py)
    tensor_parallel_size: int = 1
    gpu_compile: bool = False


def load_config(create: bool = True) -> Config:
    path = paths.config_path()
    if not path.exists():
        if create:
            try:
                path.write_text(DEFAULT_TOML, encoding="utf-8")
            except OSError:
                pass
        return Config()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        print(f"morph: warning: ignoring {path}: {e}", file=sys.stderr)
        return Config()
    cfg = Config()
    if isinstance(raw.get("model"), str):
        cfg.model = raw["model"]
    if isinstance(raw.get("threads"), int) and raw["threads"] > 0:
        cfg.threads = raw["threads"]
    if isinstance(raw.get("n_ctx"), int) and raw["n_ctx"] >= 256:
        cfg.n_ctx = raw["n_ctx"]
    if isinstance(raw.get("extra_buffer_types"), bool):
        cfg.extra_buffer_types = raw["extra_buffer_types"]
    if isinstance(raw.get("adaptive_threads"), bool):
        cfg.adaptive_threads = raw["adaptive_threads"]
    feats = raw.get("features")
    if isinstance(feats, dict):
        for name, val in feats.items():
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                cfg.features[name] = float(val)
            elif val == "default":
                cfg.features[name] = None
    gpu = raw.get("gpu")
    if isinstance(gpu, dict):
        tp = gpu.get("tensor_parallel_size")
        if isinstance(tp, int) and not isinstance(tp, bool) and tp >= 1:
            cfg.tensor_parallel_size = tp
        if isinstance(gpu.get("compile"), bool):
            cfg.gpu_compile = gpu["compile"]
    _load_generation(raw, cfg, path)
    ed = raw.get("editor")
    if isinstance(ed, dict):
        if ed.get("keys") in ("vi", "emacs"):
            cfg.editor_keys = ed["keys"]
        if isinstance(ed.get("debounce_ms"), int) and ed["debounce_ms"] >= 0:
            cfg.debounce_ms = ed["debounce_ms"]
        if isinstance(ed.get("suggestion_tokens"), int) and ed["suggestion_tokens"] > 0:
            cfg.suggestion_tokens = ed["suggestion_tokens"]
        if isinstance(ed.get("kv_cache_mb"), int) and not isinstance(ed["kv_cache_mb"], bool) and ed["kv_cache_mb"] >= 0:
            cfg.kv_cache_mb = ed["kv_cache_mb"]
        if isinstance(ed.get("choose"), bool):
            cfg.editor_choose = ed["choose"]
        alts = ed.get("alternatives")
        if isinstance(alts, int) and not isinstance(alts, bool) and 0 <= alts <= MAX_ALTERNATIVES:
            cfg.alternatives = alts
        elif alts is not None:
            print(f"morph: warning: {path}: ignoring editor.alternatives = {alts!r} "
                  f"(a whole number 0..{MAX_ALTERNATIVES})", file=sys.stderr)
    return cfg


_GENERATION = {  # key: (type, lowest, highest)
    "temperature": (float, 0.0, 5.0),
    "top_p": (float, 0.0, 1.0),
    "top_k": (int, 0, 100_000),
    "repeat_penalty": (float, 1.0, 3.0),
    "repeat_last_n": (int, 0, 4096),
    "seed": (int, -(2**63), 2**63 - 1),
}


def _load_generation(raw: dict, cfg: Config, path) -> None:
    """[generation] and [steering.apply]; a bad value is a warning and keeps the default
    (apply values are checked where the modes are known: tasks.defaults)."""
    gen = raw.get("generation")
    for key, val in (gen.items() if isinstance(gen, dict) else ()):
        spec = _GENERATION.get(key)
        ok = spec is not None and isinstance(val, (int, float)) and not isinstance(val, bool)
        if ok and spec[0] is int and not isinstance(val, int):
            ok = False
        if ok and spec[1] <= val <= spec[2]:
            cfg.generation[key] = spec[0](val)
        else:
            print(f"morph: warning: {path}: ignoring generation.{key} = {val!r}", file=sys.stderr)
    steering = raw.get("steering")
    apply = steering.get("apply") if isinstance(steering, dict) else None
    for key, val in (apply.items() if isinstance(apply, dict) else ()):
        if isinstance(val, str):
            cfg.apply[key] = val
