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

# Context window in tokens.
# n_ctx = 4096

# Features applied when none are given on the command line, name = scale
# (scale is a fraction of the layer's residual norm; omit it with `features.formal = "default"`).
[features]
# formal = 0.3

[gpu]
# tensor_parallel_size = 1   # GPUs per model for --gpu (vLLM tensor parallelism)

[editor]
# keys = "vi"          # or "emacs"
# debounce_ms = 250    # pause before a suggestion starts
# suggestion_tokens = 32
"""


@dataclass
class Config:
    model: str | None = None
    threads: int | None = None
    n_ctx: int = 4096
    features: dict[str, float | None] = field(default_factory=dict)
    editor_keys: str = "vi"
    debounce_ms: int = 250
    suggestion_tokens: int = 32
    tensor_parallel_size: int = 1


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
    ed = raw.get("editor")
    if isinstance(ed, dict):
        if ed.get("keys") in ("vi", "emacs"):
            cfg.editor_keys = ed["keys"]
        if isinstance(ed.get("debounce_ms"), int) and ed["debounce_ms"] >= 0:
            cfg.debounce_ms = ed["debounce_ms"]
        if isinstance(ed.get("suggestion_tokens"), int) and ed["suggestion_tokens"] > 0:
            cfg.suggestion_tokens = ed["suggestion_tokens"]
    return cfg
