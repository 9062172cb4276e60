"""The headline commands, exactly as a user types them, from a fresh folder: `python infer.py` and
`python infer.py cache=quant4 memhier=on` against the runs/tiny-mha that `python train.py` leaves there, and
`python train.py attn=gqa` (cut to one step; the bare command's config must compose). Every usage line that
README.md and the two scripts' docstrings show composes and passes the schema too."""

import itertools
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import analyze  # noqa: E402
import infer  # noqa: E402
import train  # noqa: E402
from cli_checks import run  # noqa: E402  (tests/cli_checks.py)
from corpus.documents import shakespeare_plays  # noqa: E402
from corpus.tokenizer import HELD_OUT_PLAYS  # noqa: E402
from serving.config import InferConfig  # noqa: E402
from toymodel.checkpoint import PRETRAINED, load_model_config, resolve_checkpoint, save_checkpoint  # noqa: E402
from toymodel.config import ModelConfig  # noqa: E402
from toymodel.model import Transformer  # noqa: E402
from training.config import OptimConfig  # noqa: E402

# A small random model: these tests check that the commands run, not what the text says. Its context holds the
# default prompt (36 tokens).
CONFIG = ModelConfig(n_layer=2, n_head=4, n_kv_head=4, d_model=128, block_size=64)
PROMPT = InferConfig().prompt


@pytest.fixture(scope="module")
def fresh_folder(tmp_path_factory) -> Path:
    """A folder holding only runs/tiny-mha, where `python train.py` writes it (here a random model, saved)."""
    folder = tmp_path_factory.mktemp("commands")
    torch.manual_seed(0)
    save_checkpoint(folder / "runs" / "tiny-mha", 1, Transformer(CONFIG), CONFIG)
    return folder


def latest_report(folder: Path, preset: str) -> dict:
    return json.loads(max((folder / "runs" / "tiny-mha" / "infer").glob(f"*-generate-{preset}.json")).read_text())


def test_python_infer_continues_the_default_prompt(fresh_folder):
    result = run("infer.py", [], fresh_folder, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROMPT)  # streamed: the prompt, then its continuation
    report = latest_report(fresh_folder, "full")
    (batch,) = report["batches"]
    assert batch["new_tokens"] == 200 and report["config"]["cache"]["name"] == "full"
    assert report["texts"][0].startswith(PROMPT) and len(report["texts"][0]) > len(PROMPT)


def test_python_infer_quant4_memhier_on(fresh_folder):
    result = run("infer.py", ["cache=quant4", "memhier=on"], fresh_folder, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROMPT)
    report = latest_report(fresh_folder, "quant4")
    assert report["config"]["cache"]["codec"] == "int4" and report["config"]["memhier"]["enabled"] is True
    (batch,) = report["batches"]
    assert sum(batch["kv_bytes_by_tier"].values()) == batch["kv_bytes"] > 0


def test_python_infer_quant4_memhier_on_in_a_fresh_clone_uses_the_shipped_model(tmp_path):
    """No runs/tiny-mha yet: ckpt=auto takes the model shipped in toymodel/pretrained, and the report goes under
    runs/tiny-mha-pretrained (never into the package)."""
    result = run("infer.py", ["cache=quant4", "memhier=on", "max_new_tokens=8"], tmp_path, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROMPT) and "the model shipped with kvlab" in result.stderr
    (path,) = (tmp_path / "runs" / "tiny-mha-pretrained" / "infer").glob("*-generate-quant4.json")
    assert Path(json.loads(path.read_text())["checkpoint"]) == PRETRAINED
    assert not (PRETRAINED / "infer").exists()


def test_the_shipped_long_context_model_finds_its_pass_keys(tmp_path):
    """ckpt=ctx1k-keys names the shipped 1,024-token model: it retrieves two-digit keys at 512 tokens (the
    tiny-mha model scores 0 here), and its reports go under runs/ctx1k-keys-pretrained."""
    result = run("infer.py", ["mode=tasks", "ckpt=ctx1k-keys", "tasks.key_digits=2", "tasks.names=[passkey]",
                              "tasks.lengths=[512]", "tasks.samples=2"], tmp_path, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    (path,) = (tmp_path / "runs" / "ctx1k-keys-pretrained" / "infer").glob("*-tasks-full.json")
    scores = [s["score"] for s in json.loads(path.read_text())["samples"]]
    assert len(scores) == 10 and sum(scores) / len(scores) >= 0.7


def test_the_default_prompt_is_a_held_out_speech():
    """It opens a speech as the corpus writes one, in a play the model never trained on."""
    assert "hamlet" in HELD_OUT_PLAYS
    assert PROMPT.startswith("**HAMLET**  \n") and PROMPT in shakespeare_plays()["hamlet"].read_text()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        assert infer.to_typed(compose("infer")).prompt == PROMPT  # conf/infer.yaml says what serving/config.py says


def test_python_train_attn_gqa(tmp_path):
    result = run("train.py", ["attn=gqa", "train.max_steps=1", "train.eval_batches=1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny-gqa"
    assert load_model_config(resolve_checkpoint(run_dir)).n_kv_head == 2
    assert json.loads((run_dir / "summary.json").read_text())["kv_bytes_per_token"] > 0


def test_python_train_ctx1k_on_the_mix_with_a_sequence_length_warmup(tmp_path):
    overrides = ["model=ctx1k", "data=mix", "train.max_steps=2", "train.batch_size=1", "train.eval_batches=1",
                 "train.seq_warmup_steps=2", "logger=none"]
    result = run("train.py", overrides, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ctx1k-mha"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and load_model_config(resolve_checkpoint(run_dir)).block_size == 1024
    assert 0.0 <= summary["passkey_accuracy"] <= 1.0  # the probe ran at the last evaluation
    assert "passkey" in result.stdout + result.stderr  # and the progress line shows it


def test_bare_python_train_attn_gqa_composes():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        typed = train.to_typed(compose("train", overrides=["attn=gqa"]))
    assert typed.run_name == "tiny-gqa" and typed.train.max_steps == OptimConfig().max_steps
    assert train.model_config(typed).n_kv_head == 2


def test_analyze_yaml_defaults_are_the_dataclass_defaults():
    """conf/analyze.yaml spells out every analysis's knobs; they must be the dataclasses' defaults, which the GPU
    scale and the docs compare against."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        typed = analyze.to_typed(compose("analyze"))
    assert typed == analyze.AnalyzeConfig(logger=typed.logger)


def usage_lines() -> list[str]:
    """Every `python train.py|infer.py|analyze.py ...` line of README.md and of the three scripts' docstrings."""
    texts = [(ROOT / "README.md").read_text(), train.__doc__, infer.__doc__, analyze.__doc__]
    found = re.findall(r"^\s*(python (?:train|infer|analyze)\.py\b.*?)\s*(?:#.*)?$", "\n".join(texts),
                       re.MULTILINE)
    return sorted(set(found))


def jobs(overrides: list[str]) -> list[list[str]]:
    """The runs a line starts: itself, or with --multirun one per combination of the comma-separated values (as
    Hydra's basic sweeper expands them)."""
    if "--multirun" not in overrides:
        return [overrides]
    choices = [[f"{o.split('=', 1)[0]}={value}" for value in o.split("=", 1)[1].split(",")]
               for o in overrides if o != "--multirun"]
    return [list(job) for job in itertools.product(*choices)]


@pytest.mark.parametrize("line", usage_lines())
def test_every_usage_line_composes(line):
    script, *overrides = shlex.split(line)[1:]
    module = {"train.py": train, "infer.py": infer, "analyze.py": analyze}[script]
    name = script.removesuffix(".py")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for job in jobs(overrides):
            module.to_typed(compose(name, overrides=job))
