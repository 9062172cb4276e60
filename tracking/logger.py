"""Experiment logging: Weights & Biases (offline unless the user says otherwise), or nothing; the `logger` config
group of train.py and infer.py alike.

W&B must never need an account or the network here, so unless WANDB_MODE is already set we run it offline:
the run is written under `<run_dir>/wandb/offline-run-*` and can be uploaded later with `wandb sync`.
Only rank 0 of a distributed job logs; the others get a NullLogger.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LoggerConfig:
    """Experiment tracking (conf/logger/*.yaml). A number's metadata declares its valid range, which the config
    holding this group checks (toymodel/ranges.py)."""

    kind: str = "wandb"  # wandb | none
    project: str = "kvlab"
    log_interval: int = field(default=10, metadata={"range": "[1, inf)"})  # training steps between logged metrics


class NullLogger:
    """Logs nothing; the same methods as WandbLogger."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def images(self, paths: dict) -> None:
        pass

    def table(self, name: str, rows: list[dict]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    def __init__(self, project: str, run_name: str, run_dir: Path, config: dict):
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # imported here: a user with logger=none never pays for it

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run_name, dir=str(run_dir), config=config)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def images(self, paths: dict) -> None:
        """Log pictures: {name: PNG path}."""
        import wandb

        self.run.log({name: wandb.Image(str(path)) for name, path in paths.items()})

    def table(self, name: str, rows: list[dict]) -> None:
        """Log rows of one shape (the same keys) as a W&B table."""
        import wandb

        columns = list(rows[0])
        self.run.log({name: wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])})

    def finish(self) -> None:
        self.run.finish()


def make_logger(kind: str, project: str, run_name: str, run_dir: Path, config: dict, rank: int = 0):
    if kind not in ("wandb", "none"):
        raise ValueError(f"unknown logger {kind!r}; choose logger=wandb or logger=none")
    if kind == "none" or rank != 0:
        return NullLogger()
    return WandbLogger(project, run_name, run_dir, config)
