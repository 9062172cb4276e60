"""Typed schema for `infer.py`'s Hydra config: one config group, one dataclass (as training/config.py for train.py).

`infer.py` merges the composed YAML into `InferConfig`, so a misspelled key, a value of the wrong type or a number
outside the range its field declares (toymodel/ranges.py) fails at once with the key's full name. The cache group
is `cache.presets.CacheSpec` itself, the memhier group is `memhier.cache.MemhierSpec` and the sampling group is
`serving.generate.Sampling`: the objects the code builds from are the schema, so no field is declared twice.
"""

from dataclasses import dataclass, field

from cache.presets import CacheSpec
from memhier.cache import MemhierSpec
from serving.generate import Sampling
from serving.serve import ServeConfig
from corpus.tasks import TASK_TYPES
from toymodel.ranges import NON_NEGATIVE, POSITIVE, SEED, check_ranges
from tracking.logger import LoggerConfig

MODES = ("generate", "ppl", "tasks", "serve", "http")
DTYPES = ("float32", "bfloat16", "float16")
# The default prompt: the opening of Hamlet's soliloquy, formatted as the corpus formats a speech (the speaker in
# bold, then verse lines ending in two spaces). Hamlet is held out (corpus.tokenizer.HELD_OUT_PLAYS), so the
# model has to continue it rather than recite it.
DEFAULT_PROMPT = ("**HAMLET**  \n"
                  "To be, or not to be: that is the question:  \n"
                  "Whether 'tis nobler in the mind to suffer  \n")


@dataclass
class PplConfig:
    """mode=ppl: score `windows` stretches of `length` held-out tokens, fed one token at a time through the cache."""

    # tokens scored per window (each predicts the next); may be several times the training context (block_size)
    length: int = field(default=1024, metadata={"range": "[2, inf)"})
    windows: int = field(default=4, metadata=POSITIVE)  # evenly spaced through the validation split, one batch


@dataclass
class TasksConfig:
    """mode=tasks: the long-context task suite (corpus/tasks.py) on held-out text, through the cache."""

    names: list[str] = field(default_factory=lambda: list(TASK_TYPES))  # passkey, multikey, vartrack, recall, ...
    lengths: list[int] | None = None  # prompt tokens; None: 256, then doubling, up to the model's block_size
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle depths in [0, 1]
    samples: int = field(default=2, metadata=POSITIVE)  # per (task, length, depth)
    seed: int = field(default=2024, metadata=SEED)  # evaluation seeds; data=mix training draws its own
    batch_size: int = field(default=8, metadata=POSITIVE)
    key_digits: int = field(default=5, metadata={"range": "[1, 9]"})  # digits of pass keys and magic numbers

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError(f"tasks.names is empty; name at least one of {', '.join(TASK_TYPES)}")
        if not self.depths:
            raise ValueError("tasks.depths is empty; give at least one needle depth in [0, 1], e.g. [0.5]")


@dataclass
class InferConfig:
    """The whole of `python infer.py ...`."""

    cache: CacheSpec = field(default_factory=CacheSpec)
    memhier: MemhierSpec = field(default_factory=MemhierSpec)  # where the cache's blocks live
    sampling: Sampling = field(default_factory=Sampling)
    ppl: PplConfig = field(default_factory=PplConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(kind="none"))
    mode: str = "generate"  # generate | ppl | tasks | serve | http
    ckpt: str = "auto"  # a run folder (follows `latest`), a checkpoint folder, its weights, or a shipped model's name
    # (toymodel.checkpoint.SHIPPED: tiny-mha, ctx1k-keys); auto: runs/tiny-mha,
    # or the model shipped with kvlab until python train.py has written one (toymodel.checkpoint.default_checkpoint)
    prompt: str | None = DEFAULT_PROMPT  # None: no prompt (then prompt_file is needed)
    prompt_file: str | None = None  # one prompt per line, used instead of prompt; blank lines are skipped
    max_new_tokens: int = field(default=200, metadata=POSITIVE)
    max_context: int | None = field(default=None, metadata=POSITIVE)  # the longest prompt; None: the block_size
    backend: str = "sdpa"  # attention implementation: reference | sdpa | triton
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # the model's (and a full cache's) dtype: float32 | bfloat16 | float16
    threads: int = field(default=0, metadata=NON_NEGATIVE)  # 0: one or all, chosen per step (toymodel/threads.py)
    keep_freed_memory: bool = True  # malloc reuses freed blocks: fewer page faults (toymodel/allocator.py)

    def __post_init__(self) -> None:
        check_ranges(self)  # every number of every group, by its declared range: cache.budget, ppl.length, ...
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not a mode; choose one of {MODES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; choose one of {DTYPES}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}; choose auto, cpu or cuda")
