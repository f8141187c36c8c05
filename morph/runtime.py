"""Open what a command needs: config, model, engine and feature catalog, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from morph import models, tasks
from morph.config import Config, load_config
from morph.engine import Engine, load_engine
from morph.steering.catalog import Catalog


@dataclass
class Runtime:
    config: Config
    info: models.ModelInfo
    engine: Engine
    catalog: Catalog

    @property
    def defaults(self) -> tasks.Defaults:
        return tasks.defaults(self.config)

    @property
    def model_name(self) -> str:
        return self.info.file.name

    def close(self) -> None:
        self.engine.close()


def open_runtime(model: str | None = None, gpu: bool = False, n_ctx: int | None = None) -> Runtime:
    cfg = load_config()
    info = models.check(models.resolve(model or cfg.model))
    engine = load_engine(info, gpu=gpu, n_ctx=n_ctx or cfg.n_ctx, threads=cfg.threads)
    return Runtime(cfg, info, engine, Catalog(info.model_id))
