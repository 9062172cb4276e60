"""Typed schema for `infer.py`'s Hydra config: one config group, one dataclass (as training/config.py for train.py).

`infer.py` merges the composed YAML into `InferConfig`, so a misspelled key or a value of the wrong type fails at
once with the key's full name. The cache group is `cache.presets.CacheSpec` itself, the memhier group is
`memhier.cache.MemhierSpec` and the sampling group is `serving.generate.Sampling`: the objects the code builds
from are the schema, so no field is declared twice.
"""

from dataclasses import dataclass, field

from cache.presets import CacheSpec
from memhier.cache import MemhierSpec
from serving.generate import Sampling
from tracking.logger import LoggerConfig

MODES = ("generate", "ppl")
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

    length: int = 1024  # tokens scored per window; may be several times the training context (block_size)
    windows: int = 4  # evenly spaced through the validation split, decoded together as one batch


@dataclass
class InferConfig:
    """The whole of `python infer.py ...`."""

    cache: CacheSpec = field(default_factory=CacheSpec)
    memhier: MemhierSpec = field(default_factory=MemhierSpec)  # where the cache's sealed blocks live
    sampling: Sampling = field(default_factory=Sampling)
    ppl: PplConfig = field(default_factory=PplConfig)
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(kind="none"))
    mode: str = "generate"  # generate | ppl
    ckpt: str = "runs/tiny-mha"  # a run folder (follows its `latest`), a checkpoint folder, or its weights file
    prompt: str | None = DEFAULT_PROMPT  # None: no prompt (then prompt_file is needed)
    prompt_file: str | None = None  # one prompt per line, used instead of prompt; blank lines are skipped
    max_new_tokens: int = 200
    max_context: int | None = None  # the longest prompt accepted; None: the checkpoint's block_size
    backend: str = "sdpa"  # attention implementation: reference | sdpa | triton
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # the model's (and a full cache's) dtype: float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not a mode; choose one of {MODES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; choose one of {DTYPES}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}; choose auto, cpu or cuda")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.max_context is not None and self.max_context < 1:
            raise ValueError(f"max_context={self.max_context} must be at least 1 (or null: the model's block_size)")
        if self.ppl.length < 2 or self.ppl.windows < 1:
            raise ValueError(f"ppl.length={self.ppl.length} must be >= 2 and ppl.windows={self.ppl.windows} >= 1")
