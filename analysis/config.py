"""Typed schema for `analyze.py`'s Hydra config (as serving/config.py is infer.py's): the composed YAML is merged
into `AnalyzeConfig` once, so a misspelled key or a value out of its range fails at once with the key's name."""

from dataclasses import dataclass, field

from analysis.length import LengthConfig
from analysis.length_predictor import LengthPredictorConfig
from analysis.negatives import NegativesConfig
from analysis.predictor import PredictorConfig
from analysis.sweeps import SweepsConfig
from toymodel.ranges import NON_NEGATIVE, check_ranges
from tracking.logger import LoggerConfig

# In the order `analysis=all` runs them: length_predictor and useful read the reports of length and negatives.
ANALYSES = ("sweeps", "predictor", "length", "length_predictor", "negatives", "useful")


@dataclass
class AnalyzeConfig:
    """The whole of `python analyze.py ...`."""

    analysis: str = "all"  # all, or one of ANALYSES
    quick: bool = False  # about a minute: tiny shapes (each analysis's QUICK), for tests and a first look
    ckpt: str = "auto"  # as infer.py's: runs/tiny-mha, else the shipped model; or a run or checkpoint folder
    device: str = "auto"  # auto | cpu | cuda
    threads: int = field(default=0, metadata=NON_NEGATIVE)  # torch threads; 0: torch's default
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # W&B, offline unless WANDB_MODE says otherwise
    sweeps: SweepsConfig = field(default_factory=SweepsConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    length: LengthConfig = field(default_factory=LengthConfig)
    length_predictor: LengthPredictorConfig = field(default_factory=LengthPredictorConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.analysis != "all" and self.analysis not in ANALYSES:
            raise ValueError(f"analysis={self.analysis!r}; choose all or one of {', '.join(ANALYSES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}; choose auto, cpu or cuda")
