"""Typed schemas for `train.py`'s Hydra config: one config group, one dataclass.

Hydra composes YAML files from `conf/`; `train.py` then merges the result into these dataclasses, so a misspelled
key, a value of the wrong type or a number outside the range its field declares (toymodel/ranges.py) fails at
once, with the key's full name, instead of deep inside training.
Nothing outside `train.py` / `infer.py` sees Hydra: the rest of kvlab receives these plain objects.
"""

from dataclasses import dataclass, field, fields, make_dataclass
from typing import get_type_hints

from corpus.splits import DataConfig
from tracking.logger import LoggerConfig
from toymodel.config import ModelConfig
from toymodel.ranges import NON_NEGATIVE, POSITIVE, SEED, check_ranges


def _model_schema() -> type:
    """The model group's schema (conf/model/*.yaml), read off ModelConfig so that no size is declared twice: every
    ModelConfig field but n_kv_head, which the attn group sets (model_config() joins the two), plus the preset's
    `name`, which run names use. Its fields keep ModelConfig's declared ranges, which TrainConfig checks; what
    relates two fields ModelConfig checks, in model_config(), once both groups are known."""
    hints = get_type_hints(ModelConfig)
    sizes = [(f.name, hints[f.name], field(default=f.default, metadata=f.metadata)) for f in fields(ModelConfig)
             if f.name != "n_kv_head"]
    doc = "Sizes of the network (conf/model/*.yaml): ModelConfig's fields but n_kv_head, and the preset's name."
    return make_dataclass("ModelSchema", [("name", str, "tiny"), *sizes], namespace={"__module__": __name__,
                                                                                     "__doc__": doc})


ModelSchema = _model_schema()  # ModelSchema(name="tiny", vocab_size=4096, n_layer=4, ...): what YAML merges into


@dataclass
class AttnConfig:
    """How heads share keys and values (conf/attn/*.yaml), and which attention implementation runs."""

    name: str = "mha"
    n_kv_head: int = field(default=8, metadata=POSITIVE)
    backend: str = "sdpa"  # reference | sdpa | triton


@dataclass
class OptimConfig:
    """The optimization recipe (conf/train/*.yaml): AdamW, linear warmup then cosine decay. Every number declares
    its valid range (toymodel/ranges.py); TrainConfig checks them when the config is built."""

    batch_size: int = field(default=16, metadata=POSITIVE)
    grad_accum: int = field(default=1, metadata=POSITIVE)  # micro-batches per optimizer step
    max_steps: int = field(default=600, metadata=POSITIVE)
    lr: float = field(default=2e-3, metadata={"range": "(0, inf)"})
    min_lr_ratio: float = field(default=0.1, metadata={"range": "[0, 1]"})  # the cosine ends at min_lr_ratio * lr
    warmup_steps: int = field(default=60, metadata=NON_NEGATIVE)
    weight_decay: float = field(default=0.1, metadata=NON_NEGATIVE)
    beta1: float = field(default=0.9, metadata={"range": "[0, 1)"})  # AdamW's moment decays: below 1
    beta2: float = field(default=0.95, metadata={"range": "[0, 1)"})
    grad_clip: float = field(default=1.0, metadata={"range": "(0, inf]"})  # max gradient norm; inf: no clipping
    eval_interval: int = field(default=200, metadata=POSITIVE)  # steps between validations (and the last step)
    eval_batches: int = field(default=20, metadata=POSITIVE)
    ckpt_interval: int = field(default=200, metadata=POSITIVE)  # steps between checkpoints (and the last step)
    keep_checkpoints: int = field(default=2, metadata=NON_NEGATIVE)  # the newest ones; 0: all
    seed: int = field(default=1337, metadata=SEED)
    # Sequence length warmup (Li et al. 2022): rows grow linearly from seq_len_start tokens to block_size over the
    # first seq_warmup_steps steps, with more rows per step so a step holds the same tokens. Short rows first are
    # cheap, stable and many: a long-context model meets its tasks (data=mix) often before it meets their length.
    seq_warmup_steps: int = field(default=0, metadata=NON_NEGATIVE)  # 0: every row is block_size tokens
    seq_len_start: int = field(default=256, metadata=POSITIVE)
    dtype: str = "auto"  # auto (bfloat16 where the device computes it natively, else float32) | bfloat16 | float32
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
    threads: int = field(default=0, metadata=NON_NEGATIVE)  # 0: one or all, chosen per step (toymodel/threads.py)
    keep_freed_memory: bool = True  # glibc's malloc reuses freed blocks, not unmapping them (toymodel/allocator.py)

    def __post_init__(self) -> None:
        check_ranges(self)  # every group's declared ranges, named by full key: train.ckpt_interval, model.n_layer


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The ModelConfig a TrainConfig describes: sizes from the model group, KV heads from the attn group.

    Raises ValueError for a combination ModelConfig refuses (e.g. n_head not divisible by n_kv_head)."""
    sizes = {k: v for k, v in vars(cfg.model).items() if k != "name"}
    return ModelConfig(**sizes, n_kv_head=cfg.attn.n_kv_head)
