"""Typed schemas for `train.py`'s Hydra config: one config group, one dataclass.

Hydra composes YAML files from `conf/`; `train.py` then merges the result into these dataclasses, so a misspelled
key or a value of the wrong type fails at once, with the key's full name, instead of deep inside training.
Nothing outside `train.py` / `infer.py` sees Hydra: the rest of kvlab receives these plain objects.
"""

from dataclasses import dataclass, field, fields, make_dataclass
from typing import get_type_hints

from corpus.splits import DataConfig
from tracking.logger import LoggerConfig
from toymodel.config import ModelConfig


def _model_schema() -> type:
    """The model group's schema (conf/model/*.yaml), read off ModelConfig so that no size is declared twice: every
    ModelConfig field but n_kv_head, which the attn group sets (model_config() joins the two), plus the preset's
    `name`, which run names use. It checks nothing itself: ModelConfig does, in model_config(), once both are known."""
    hints = get_type_hints(ModelConfig)
    sizes = [(f.name, hints[f.name], f.default) for f in fields(ModelConfig) if f.name != "n_kv_head"]
    doc = "Sizes of the network (conf/model/*.yaml): ModelConfig's fields but n_kv_head, and the preset's name."
    return make_dataclass("ModelSchema", [("name", str, "tiny"), *sizes], namespace={"__module__": __name__,
                                                                                     "__doc__": doc})


ModelSchema = _model_schema()  # ModelSchema(name="tiny", vocab_size=4096, n_layer=4, ...): what YAML merges into


@dataclass
class AttnConfig:
    """How heads share keys and values (conf/attn/*.yaml), and which attention implementation runs."""

    name: str = "mha"
    n_kv_head: int = 8
    backend: str = "sdpa"  # reference | sdpa | triton


@dataclass
class OptimConfig:
    """The optimization recipe (conf/train/*.yaml): AdamW, linear warmup then cosine decay."""

    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 300
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 20
    ckpt_interval: int = 100
    keep_checkpoints: int = 2
    seed: int = 1337
    compile: bool = False


@dataclass
class TrainConfig:
    """The whole of `python train.py ...`."""

    model: ModelSchema = field(default_factory=ModelSchema)
    attn: AttnConfig = field(default_factory=AttnConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run_name: str = "tiny-mha"
    out_dir: str = "runs"
    resume: bool = False
    init_from: str | None = None  # a checkpoint (file, step dir, or run dir) to start from, e.g. MHA -> GQA
    device: str = "auto"  # auto | cpu | cuda


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The ModelConfig a TrainConfig describes: sizes from the model group, KV heads from the attn group.

    Raises ValueError for a combination ModelConfig refuses (e.g. n_head not divisible by n_kv_head)."""
    sizes = {k: v for k, v in vars(cfg.model).items() if k != "name"}
    return ModelConfig(**sizes, n_kv_head=cfg.attn.n_kv_head)
