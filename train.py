"""Train a toy Llama-style model on Shakespeare (or your own text).

    python train.py                                  # tiny MHA model, ~4M params, < 10 min on 2 CPU cores
    python train.py attn=gqa                         # the same with 2 K/V heads (attn=mqa: 1)
    python train.py attn=gqa init_from=runs/tiny-mha # MHA -> GQA by mean-pooling K/V heads, then up-train
    python train.py resume=true                      # continue runs/<run_name> from its latest checkpoint
    python train.py data=textfile data.path=my.txt   # any text file or folder
    torchrun --nproc_per_node=2 train.py             # data-parallel (gloo on CPU, nccl on GPU)

This file is the only training code that knows Hydra: it turns the composed config into the typed dataclasses
of training/config.py once, builds plain objects, and hands them down.
"""

import json
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from corpus.splits import load_splits
from corpus.tokenizer import VOCAB_SIZE, get_tokenizer, tokenizer_id
from toymodel.allocator import keep_freed_memory
from training.config import TrainConfig, model_config
from training.distributed import init_distributed, shutdown_distributed
from tracking.logger import make_logger
from training.loop import Trainer


# What a user can cause (a bad value, a path that is not a folder, a full disk, a missing corpus package): one line
# on stderr and exit status 1, no traceback. Anything else is a bug in kvlab, and its traceback is the report.
USER_ERRORS = (ValueError, OSError, FloatingPointError, ModuleNotFoundError)


def to_typed(cfg: DictConfig) -> TrainConfig:
    """Check the composed config against the dataclass schema (types, and each number's declared range) and
    return the typed object; a bad key or value exits with one line naming it."""
    try:
        typed: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))
        model_config(typed)  # raises on e.g. n_head not divisible by n_kv_head
    except OmegaConfBaseException as e:
        first = str(e).splitlines()[0]  # the value and the type expected; the lines after it repeat the key
        raise SystemExit(f"invalid config: {e.full_key}: {first}" if e.full_key else f"invalid config: {first}")
    except ValueError as e:
        raise SystemExit(f"invalid config: {e}")
    if typed.model.vocab_size != VOCAB_SIZE:
        raise SystemExit(f"invalid config: model.vocab_size={typed.model.vocab_size}, but the tokenizer has {VOCAB_SIZE}")
    if typed.device not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"invalid config: device={typed.device!r}; choose auto, cpu or cuda")
    if typed.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("invalid config: device=cuda but no CUDA GPU is available; use device=auto or device=cpu")
    return typed


def save_run_config(cfg: DictConfig, run_dir: Path) -> None:
    """Create the run folder and record how the run was launched in <run_dir>/hydra/: the composed config and the
    command line's overrides. train.py writes them itself (Hydra writes nothing, conf/train.yaml), so an out_dir
    that cannot hold the run folder is reported in one line, like any other bad path."""
    folder = run_dir / "hydra"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the run folder {run_dir} ({e.strerror}): out_dir and run_name must name a "
                      f"folder that can be created") from e
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(HydraConfig.get().overrides.task, folder / "overrides.yaml")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    typed = to_typed(cfg)
    device = pick_device(typed.device)
    dist = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    run_dir = Path(typed.out_dir) / typed.run_name
    kept = typed.keep_freed_memory and keep_freed_memory()  # before the first large tensor is made
    try:
        if dist.is_main:
            save_run_config(cfg, run_dir)
        enc = get_tokenizer()
        train_tokens, val_tokens = load_splits(typed.data, enc)
        plain = OmegaConf.to_container(OmegaConf.structured(typed))
        logger = make_logger(typed.logger.kind, typed.logger.project, typed.run_name, run_dir,
                             {**plain, "kv_bytes_per_token_fp16": model_config(typed).kv_bytes_per_token()}, dist.rank)
        meta = {"run": plain, "tokenizer": tokenizer_id(enc), "eos_token_id": enc.eot_token}
        trainer = Trainer(typed, train_tokens, val_tokens, run_dir, device, dist, logger, extra_meta=meta)
        if dist.is_main:
            print(f"model: {trainer.model.num_params():,} parameters, {typed.attn.name} "
                  f"({typed.attn.n_kv_head} KV heads), KV cache {model_config(typed).kv_bytes_per_token()} B/token "
                  f"in fp16; data: {len(train_tokens):,} train / {len(val_tokens):,} val tokens; device {device}, "
                  f"{trainer.dtype}; threads {'fixed ' + str(typed.threads) if typed.threads else 'by the governor'}"
                  f"{', malloc keeps freed memory' if kept else ''}")
        summary = trainer.run()
        logger.finish()
        if dist.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}")
    finally:
        shutdown_distributed(dist)
    if dist.is_main:
        print(f"done: val loss {summary.get('val_loss', float('nan')):.4f}, checkpoint {summary.get('checkpoint')}")
        print(f"next: python infer.py ckpt={run_dir}")


if __name__ == "__main__":
    sys.exit(main())
