"""Checkpoints on disk: safetensors weights, a JSON config, optimizer state, written atomically.

Layout of one run:

    runs/<run_name>/
        latest                      a one-line text file naming the newest complete checkpoint
        checkpoints/step_0000300/
            model.safetensors       weights (the tied embedding / lm_head matrix stored once)
            config.json             ModelConfig, step, sha256 of the weights, and whatever the trainer adds
            optimizer.pt            optimizer state, for resume=true (absent in inference-only exports)

A checkpoint is first written to a temporary folder (`.step_<step>.tmp-<pid>`) and renamed into place, and
`latest` is replaced by rename too, so a crash (or a NaN that stops training) never leaves a half-written
checkpoint behind `latest`. A process killed mid-write leaves its temporary folder behind; the next run removes
those of processes that are gone (`remove_stale_temporaries`), never a live writer's.
Loading verifies the weights' checksum and every tensor's shape, and names the file and the mismatch when
something is off.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from toymodel.config import ModelConfig

WEIGHTS, CONFIG, OPTIMIZER, LATEST = "model.safetensors", "config.json", "optimizer.pt", "latest"
TIED = "lm_head.weight"
TEMPORARY = re.compile(r"\..+\.tmp-(\d+)")  # .step_0000300.tmp-<pid>, .latest.tmp-<pid>: being written by <pid>


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    config: ModelConfig,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict | None = None,
    keep: int = 0,
) -> Path:
    """Write checkpoints/step_<step>/ under run_dir atomically, point `latest` at it, keep the newest `keep`.

    keep=0 keeps every checkpoint. Returns the checkpoint folder.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".step_{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights_to_save(model), str(tmp / WEIGHTS))
    meta = {"model": config.to_dict(), "step": step, "sha256": _sha256(tmp / WEIGHTS), **(extra or {})}
    (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    shutil.rmtree(final, ignore_errors=True)  # a checkpoint of the same step from an earlier, abandoned attempt
    os.replace(tmp, final)
    _write_atomic(Path(run_dir) / LATEST, final.name + "\n")
    if keep > 0:
        # Newest by the time they were written, not by step: a fresh run in the folder of a longer, earlier run
        # must not delete the checkpoint it has just written (whose step number is the smallest).
        written = sorted((p for p in ckpt_root.glob("step_*") if p != final), key=lambda p: p.stat().st_mtime)
        for old in written[: max(len(written) - (keep - 1), 0)]:
            shutil.rmtree(old)
    return final


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 checks without signalling)."""
    if os.name != "posix":  # elsewhere os.kill ends the process: call every writer alive, delete nothing
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        pass
    return True


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what killed writers left in run_dir: temporary checkpoint folders and `latest` files whose pid no
    longer runs. Call it when a run starts, before it writes. A pid equal to ours is stale too: this process has
    written nothing yet, so an earlier process with the same id (containers reuse small ids) left it. Returns the
    paths removed."""
    run_dir = Path(run_dir)
    removed = []
    for path in [*run_dir.glob(f".{LATEST}.tmp-*"), *(run_dir / "checkpoints").glob(".step_*.tmp-*")]:
        match = TEMPORARY.fullmatch(path.name)
        if match is None or (int(match[1]) != os.getpid() and process_alive(int(match[1]))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def weights_to_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without lm_head.weight: it is the embedding matrix (tied), stored once."""
    return {k: v.contiguous() for k, v in model.state_dict().items() if k != TIED}


# Models shipped with kvlab, so that infer.py, the engine and analyze.py run on a fresh clone before any training;
# `ckpt=<name>` names one, and each folder's README.md says how it was made. tiny-mha is what `python train.py`
# trains by default (600 steps, bf16, val loss 3.919); ctx1k-keys a 1,024-token model that retrieves two-digit keys
# (docs/experiments/long_context.md).
SHIPPED = {name: Path(__file__).resolve().parent / "pretrained" / name for name in ("tiny-mha", "ctx1k-keys")}
PRETRAINED = SHIPPED["tiny-mha"]
TRAINED = Path("runs") / "tiny-mha"  # where `python train.py` writes that model, relative to the working folder


def default_checkpoint() -> Path:
    """ckpt=auto: the run `python train.py` wrote (runs/tiny-mha) once there is one, else the shipped model."""
    return TRAINED if TRAINED.exists() else PRETRAINED


def run_folder(ckpt_dir: Path) -> Path:
    """The run a checkpoint folder belongs to, where reports about it go: the folder above checkpoints/, or the
    checkpoint folder itself; for a shipped model runs/<name>-pretrained (never inside the installed package)."""
    for name, folder in SHIPPED.items():
        if Path(ckpt_dir).resolve() == folder:
            return Path("runs") / f"{name}-pretrained"
    return ckpt_dir.parent.parent if ckpt_dir.parent.name == "checkpoints" else ckpt_dir


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a shipped model's name (SHIPPED), a run folder (follows `latest`), a checkpoint folder, or its
    model.safetensors; return the folder."""
    path = Path(path) if Path(path).exists() else SHIPPED.get(str(path), Path(path))  # a folder first, then a name
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    if (path / LATEST).is_file():
        path = path / "checkpoints" / (path / LATEST).read_text().strip()
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path} (expected {WEIGHTS} there, or a run folder with a '{LATEST}' file); "
            f"train one with `python train.py`, or pass the path of an existing run or checkpoint, or the name of "
            f"a shipped model ({', '.join(SHIPPED)})"
        )
    return path


def read_meta(ckpt_dir: Path) -> dict:
    """The checkpoint's config.json as a dict, with a clear error if it is missing or unreadable."""
    path = Path(ckpt_dir) / CONFIG
    try:
        meta = json.loads(path.read_text())
        ModelConfig(**meta["model"])
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {ckpt_dir} has no {CONFIG}; it is incomplete, retrain or pick another")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"checkpoint config {path} is corrupt or from an incompatible version: {e}") from e
    return meta


def load_model_config(ckpt_dir: Path) -> ModelConfig:
    return ModelConfig(**read_meta(ckpt_dir)["model"])


def load_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The weights as a dict, after checking the file against the checksum recorded when it was written."""
    path = Path(ckpt_dir) / WEIGHTS
    expected = read_meta(ckpt_dir).get("sha256")
    if expected is not None and _sha256(path) != expected:
        raise ValueError(f"checkpoint weights {path} are corrupt: their sha256 does not match {CONFIG}")
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"checkpoint weights {path} are corrupt or not a safetensors file: {e}") from e


def load_weights(model: torch.nn.Module, ckpt_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Copy a checkpoint's weights into `model`, naming the file and every mismatch if they do not fit."""
    path = Path(ckpt_dir) / WEIGHTS
    state = load_state_dict(ckpt_dir) if state_dict is None else state_dict
    expected = weights_to_save(model)
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise ValueError(f"checkpoint {path} does not fit this model: " + "; ".join(problems[:6]))
    model.load_state_dict(state, strict=False)  # strict=False only for the tied lm_head, checked above


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt_dir: Path) -> None:
    path = Path(ckpt_dir) / OPTIMIZER
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this checkpoint cannot resume training (weights only)")
    optimizer.load_state_dict(torch.load(path, weights_only=True))
