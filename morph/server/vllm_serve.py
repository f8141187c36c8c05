"""morph's steering in a plain `vllm serve`: the `vllm.general_plugins` entry point.

With morph installed, vLLM calls `register()` in each of its processes: the worker and
engine-core patches of engine/vllm_plugin.py, and here the OpenAI server's request models,
so that a body's `"steering"` field (the openai client's `extra_body`), the same
extension as `morph serve`'s (steering/request.py), becomes the request's steering. The
features are resolved against the served folder's catalog (it must be a local folder,
e.g. from `morph models convert`); the placement defaults to "all".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morph.engine import vllm_plugin, wire
from morph.errors import MorphError

_served: dict[str, Any] = {}  # the served model, recorded when vLLM builds its config
_catalogs: dict[str, tuple] = {}


def register() -> None:
    """vLLM general-plugin entry point (safe to call many times, in any process)."""
    vllm_plugin.register()
    try:
        _patch_openai()
    except ImportError:  # a build without the OpenAI server
        pass


def _patch_openai() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    orig_cmc = EngineArgs.create_model_config
    if not getattr(orig_cmc, "_morph", False):
        def create_model_config(self, *a, **kw):
            mc = orig_cmc(self, *a, **kw)
            _served["model"] = mc.model
            return mc

        create_model_config._morph = True
        EngineArgs.create_model_config = create_model_config

    for cls in (ChatCompletionRequest, CompletionRequest):
        orig = cls.to_sampling_params
        if getattr(orig, "_morph", False):
            continue
        cls.to_sampling_params = _wrap_to_sampling_params(orig)


def _wrap_to_sampling_params(orig):
    def to_sampling_params(self, *args, **kwargs):
        sp = orig(self, *args, **kwargs)
        body = (self.model_extra or {}).get("steering")
        if body is not None:
            sp.extra_args = dict(sp.extra_args or {}) | {wire.EXTRA_KEY: api_steering(body)}
        return sp

    to_sampling_params._morph = True
    return to_sampling_params


def api_steering(body) -> dict:
    """A body's `steering` field -> the wire entry. Bad input raises ValueError, which
    vLLM's server answers with a 400 error object."""
    from morph.steering import request

    try:
        spec = request.parse(body)
        if spec.mode != "residual":
            raise MorphError("this server steers the residual stream only (steering.mode 'logits' is morph serve's)")
        if spec.choose:
            raise MorphError("this server generates once per request (steering.choose, the ladder, is morph serve's)")
        info, vector = _resolve(spec)
        return wire.encode(vector, spec.apply or "all", info.n_layer, info.n_embd) or {"apply": spec.apply or "all"}
    except MorphError as e:
        raise ValueError(str(e)) from None


def _resolve(spec):
    """(model info, the combined vector or None) for the request's features."""
    from morph.convert import hf_info
    from morph.steering import profile
    from morph.steering.catalog import Catalog

    model = _served.get("model")
    if not model or not Path(model).is_dir():
        raise MorphError("steering needs the served model to be a local folder (e.g. one from `morph models convert`)")
    if model not in _catalogs:
        info = hf_info(Path(model))
        _catalogs[model] = (info, Catalog(info.model_id))
    info, catalog = _catalogs[model]
    if not spec.features:
        return info, None
    return info, profile.resolve(catalog, info, spec.features, experimental=spec.experimental).vector
