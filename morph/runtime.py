"""Open what a command needs: config, model, engine and feature catalog, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from morph import models, tasks
from morph.config import Config, load_config
from morph.engine import Engine, load_engine
from morph.errors import MorphError
from morph.steering.catalog import Catalog


@dataclass
class Runtime:
    config: Config
    info: models.ModelInfo
    engine: Engine
    catalog: Catalog
    _embedder: object | None = None

    @property
    def embedder(self):
        """The sentence embedder (the meaning check's), opened on first use."""
        if self._embedder is None:
            from morph.engine.embed import Embedder

            self._embedder = Embedder(threads=self.config.threads)
        return self._embedder

    @property
    def defaults(self) -> tasks.Defaults:
        return tasks.defaults(self.config)

    @property
    def model_name(self) -> str:
        return self.info.file.name

    def close(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        self.engine.close()


def model_info(spec: str | None, gpu: bool = False) -> models.ModelInfo:
    """The model a command names; with --gpu also a Hugging Face folder (config.json)."""
    mf = models.resolve(spec)
    if mf.path.is_dir():
        from morph import convert

        if not convert.is_hf_folder(mf.path):
            raise MorphError(f"{mf.path}: a folder is not a model (a Hugging Face folder has config.json)")
        if not gpu:
            raise MorphError(f"{mf.path} is a Hugging Face folder: only the GPU engine reads it (add --gpu)")
        return convert.hf_info(mf.path)
    return models.check(mf)


def open_runtime(model: str | None = None, gpu: bool = False, n_ctx: int | None = None,
                 tensor_parallel_size: int | None = None) -> Runtime:
    cfg = load_config()
    info = model_info(model or cfg.model, gpu)
    engine = load_engine(info, gpu=gpu, n_ctx=n_ctx or cfg.n_ctx, threads=cfg.threads,
                         tensor_parallel_size=tensor_parallel_size or cfg.tensor_parallel_size,
                         compile=cfg.gpu_compile)
    return Runtime(cfg, info, engine, Catalog(info.model_id))
