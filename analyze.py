"""The MLSys 2025 study's analyses on our model and kernels (Gao et al., "Rethinking Key-Value Cache Compression
Techniques for LLM Serving"), each written to <run>/analysis/<name>/ as JSON and PNG, logged to W&B (offline),
and summed up in a finding generated from its own numbers.

    python analyze.py                          # every analysis that exists, at the default scale
    python analyze.py analysis=sweeps          # one: throughput of every preset over lengths and batches
    python analyze.py analysis=predictor       # a Vidur-style predictor of throughput from operator profiles
    python analyze.py analysis=length          # finding (2): answer lengths and end-to-end latency per preset
    python analyze.py analysis=length_predictor   # an answer's length predicted from its prompt, per preset
    python analyze.py analysis=negatives       # finding (3): the samples compression breaks, by task type
    python analyze.py analysis=useful          # output tokens/s discounted for longer answers and broken samples
    python analyze.py quick=true               # about a minute, tiny shapes: a first look, and what tests run
    python analyze.py analysis=sweeps "sweeps.presets=[full,quant4,kivi2]" sweeps.lengths=[512,2048] logger=none

The model is `ckpt` (as infer.py's: runs/tiny-mha once python train.py wrote it, else the shipped model); <run> is
its run folder. This file is the only analysis code that knows Hydra: it merges the composed config into
analysis/config.py's dataclasses once and hands plain objects down.
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from analysis import findings, length, length_predictor, negatives, predictor, serving_view, sweeps, useful
from analysis.config import ANALYSES, AnalyzeConfig
from corpus.splits import validation_tokens
from corpus.tokenizer import get_tokenizer
from toymodel.checkpoint import default_checkpoint, read_meta, resolve_checkpoint, run_folder
from toymodel.decode_layout import pack_for_decode
from toymodel.export_hf import load_kvlab_model
from tracking.logger import make_logger
from tracking.machine import machine


def to_typed(cfg: DictConfig) -> AnalyzeConfig:
    """The composed config, checked against the dataclasses; a bad key or value exits with one line naming it."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AnalyzeConfig), cfg))
    except OmegaConfBaseException as e:
        line = str(e).splitlines()[0]
        raise SystemExit(f"invalid config: {e.full_key}: {line}" if e.full_key else f"invalid config: {line}")
    except ValueError as e:
        raise SystemExit(f"invalid config: {e}")


def device_name() -> str:
    """The device the numbers come from, as the findings name it."""
    return machine()["gpu"] or f"{machine()['processor']} CPU, {torch.get_num_threads()} thread(s)"


def run_sweeps(cfg: AnalyzeConfig, model: torch.nn.Module, ckpt: Path, out: Path) -> tuple[dict, list[Path], str]:
    """analysis=sweeps: the report, its pictures and its finding."""
    settings = cfg.sweeps
    if cfg.quick:
        settings = sweeps.SweepsConfig(**sweeps.QUICK, serving=serving_view.ServingViewConfig(**serving_view.QUICK))
    elif next(model.parameters()).is_cuda and settings == sweeps.SweepsConfig():  # defaults on a GPU: its scale
        settings = sweeps.SweepsConfig(**sweeps.LARGE)
    rows = sweeps.run(model, settings, lambda pts: tqdm(pts, desc="sweeps", unit="point"))
    served = serving_view.run(model, settings.serving)
    text = f"{sweeps.finding(rows, device_name())} {serving_view.finding(served)}"
    report = {"config": asdict(settings), "machine": machine(), "model": model.config.to_dict(), "rows": rows,
              "serving": served, "finding": text}
    return report, [*sweeps.plot(rows, settings, out), serving_view.plot(served, out / "serving.png")], text


def run_predictor(cfg: AnalyzeConfig, model: torch.nn.Module, ckpt: Path, out: Path) -> tuple[dict, list[Path], str]:
    """analysis=predictor: operator profiles, the predictions at configurations never profiled, their accuracy."""
    settings = cfg.predictor
    if cfg.quick:
        settings = predictor.PredictorConfig(**predictor.QUICK)
    elif next(model.parameters()).is_cuda and settings == predictor.PredictorConfig():
        settings = predictor.PredictorConfig(**predictor.LARGE)
    report = predictor.run(model, settings, lambda items, desc: tqdm(items, desc=f"predictor, {desc}"))
    text = predictor.finding(report, device_name())
    report = {"config": asdict(settings), "machine": machine(), "model": model.config.to_dict(), **report,
              "finding": text}
    return report, [predictor.plot(report, out / "predicted.png")], text


def length_settings(cfg: AnalyzeConfig) -> length.LengthConfig:
    return length.LengthConfig(**length.QUICK) if cfg.quick else cfg.length


def run_length(cfg: AnalyzeConfig, model: torch.nn.Module, ckpt: Path, out: Path) -> tuple[dict, list[Path], str]:
    """analysis=length: answer lengths per setting against the full cache's, and end-to-end latency."""
    settings = length_settings(cfg)
    enc = get_tokenizer()
    held_out = enc.decode(validation_tokens(read_meta(ckpt).get("run", {}).get("data")).tolist())
    report = length.run(model, settings, held_out, enc.encode_ordinary, enc.decode,
                        lambda items: tqdm(list(items), desc="length", unit="setting"))
    text = length.finding(report, device_name())
    report = {"config": asdict(settings), "machine": machine(), "model": model.config.to_dict(), **report,
              "finding": text}
    return report, length.plot(report, out), text


def report_of(name: str, cfg: AnalyzeConfig, model: torch.nn.Module, ckpt: Path, settings) -> dict:
    """Analysis `name`'s report for these settings: read from its folder, or made now when there is none."""
    path = run_folder(ckpt) / "analysis" / name / f"{name}.json"
    found = json.loads(path.read_text()) if path.is_file() else None
    return found if found is not None and found.get("config") == asdict(settings) else analyse(name, cfg, model, ckpt)


def run_length_predictor(cfg: AnalyzeConfig, model: torch.nn.Module, ckpt: Path,
                         out: Path) -> tuple[dict, list[Path], str]:
    """analysis=length_predictor: on analysis=length's report of these settings (made first if there is none)."""
    source = report_of("length", cfg, model, ckpt, length_settings(cfg))
    report = length_predictor.run(model, cfg.length_predictor, source)
    text = length_predictor.finding(report)
    report = {"config": asdict(cfg.length_predictor), "length_config": source["config"], "machine": machine(),
              **report, "finding": text}
    return report, [length_predictor.plot(report, out / "accuracy.png")], text


def negatives_settings(cfg: AnalyzeConfig) -> negatives.NegativesConfig:
    return negatives.NegativesConfig(**negatives.QUICK) if cfg.quick else cfg.negatives


def run_negatives(cfg: AnalyzeConfig, model: torch.nn.Module, ckpt: Path, out: Path) -> tuple[dict, list[Path], str]:
    """analysis=negatives: a score table (the task suite through every preset here, or the user's), its negatives."""
    settings = negatives_settings(cfg)
    if settings.scores is not None:
        rows, source = negatives.read_scores(settings.scores), f"the score table {settings.scores}"
    else:
        if settings.ckpt is not None:
            ckpt = resolve_checkpoint(settings.ckpt)
            model = pack_for_decode(load_kvlab_model(ckpt).to(next(model.parameters()).device).eval())
        held_out = validation_tokens(read_meta(ckpt).get("run", {}).get("data"))
        rows = negatives.score_table(model, settings, held_out, get_tokenizer(),
                                     lambda items: tqdm(items, desc="negatives", unit="setting"))
        source = f"the task suite on {run_folder(ckpt).name}, {settings.length}-token prompts, {device_name()}"
    budgets = {name: spec.budget for name, (family, spec) in negatives.settings(settings).items()
               if family == "sparse"}  # to match the engine's budgets (analysis=useful)
    report = {"config": asdict(settings), "machine": machine(), **negatives.analyse(rows), "source": source,
              "budgets": budgets if settings.scores is None else {}, "rows": rows}
    text = negatives.finding(report)
    return {**report, "finding": text}, negatives.plot(report, out), text


def run_useful(cfg: AnalyzeConfig, model: torch.nn.Module, ckpt: Path, out: Path) -> tuple[dict, list[Path], str]:
    """analysis=useful: analysis=length's engine runs discounted by length growth and broken task samples."""
    rows = useful.run(report_of("length", cfg, model, ckpt, length_settings(cfg)),
                      report_of("negatives", cfg, model, ckpt, negatives_settings(cfg)))
    text = useful.finding(rows)
    return {"machine": machine(), "rows": rows, "finding": text}, [useful.plot(rows, out / "useful.png")], text


RUNNERS = {"sweeps": run_sweeps, "predictor": run_predictor, "length": run_length,
           "length_predictor": run_length_predictor, "negatives": run_negatives, "useful": run_useful}


def analyse(name: str, cfg: AnalyzeConfig, model: torch.nn.Module, ckpt: Path) -> dict:
    """Run one analysis, write its JSON and pictures to <run>/analysis/<name>/, log them, print its finding."""
    out = run_folder(ckpt) / "analysis" / name
    out.mkdir(parents=True, exist_ok=True)
    report, pictures, text = RUNNERS[name](cfg, model, ckpt, out)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    logger = make_logger(cfg.logger.kind, cfg.logger.project, f"analyze-{name}", out, asdict(cfg))
    logger.summary({"finding": text})
    logger.images({p.stem: p for p in pictures})
    for key, rows in report.items():
        if isinstance(rows, list) and rows and isinstance(rows[0], dict):
            logger.table(key, rows)
    logger.finish()
    print(f"\n[{name}] {text}\nwrote {out / f'{name}.json'} and {', '.join(p.name for p in pictures)}")
    return report


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="analyze")
def main(cfg: DictConfig) -> None:
    typed = to_typed(cfg)
    if typed.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("invalid config: device=cuda but no CUDA GPU is available; use device=auto or device=cpu")
    device = torch.device("cuda" if typed.device == "cuda" or (typed.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if typed.threads:
        torch.set_num_threads(typed.threads)
    try:
        ckpt = resolve_checkpoint(default_checkpoint() if typed.ckpt == "auto" else typed.ckpt)
        model = pack_for_decode(load_kvlab_model(ckpt).to(device).eval())
        for name in ANALYSES if typed.analysis == "all" else (typed.analysis,):
            analyse(name, typed, model, ckpt)
        table = findings.write(run_folder(ckpt) / "analysis")
        if table is not None:
            print(f"\nthe findings so far, one row per analysis: {table}")
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    sys.exit(main())
