"""The comparison runner as the course project uses it: `python infer.py --multirun cache=...` writes one report per
preset into one sweep folder, each with per-token decode times and KV bytes, and `python -m bench.compare <folder>`
draws them and writes the table."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import compare  # noqa: E402
from cli_checks import run  # noqa: E402  (tests/cli_checks.py)
from toymodel.checkpoint import save_checkpoint  # noqa: E402
from toymodel.config import ModelConfig  # noqa: E402
from toymodel.model import Transformer  # noqa: E402

PRESETS = ["full", "sink", "minicache", "quant4", "gear4"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """The folder one multirun over five presets wrote, from a fresh folder holding a random runs/tiny-mha (GQA)."""
    folder = tmp_path_factory.mktemp("compare")
    config = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=128, block_size=64)
    torch.manual_seed(1)
    save_checkpoint(folder / "runs" / "tiny-mha", 1, Transformer(config), config)
    result = run("infer.py", ["--multirun", f"cache={','.join(PRESETS)}", f"max_new_tokens={NEW_TOKENS}"], folder,
                 OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    (swept,) = (folder / "runs" / "compare").iterdir()  # conf/infer.yaml: hydra.sweep.dir
    return swept


def test_multirun_writes_one_report_per_preset_with_per_token_figures(sweep):
    reports = sorted((sweep / "infer").glob("*-generate-*.json"))
    assert sorted(p.stem.rsplit("-", 1)[1] for p in reports) == sorted(PRESETS)
    for path in reports:
        (batch,) = json.loads(path.read_text())["batches"]
        assert len(batch["decode_step_seconds"]) == NEW_TOKENS - 1 and min(batch["decode_step_seconds"]) > 0
        assert len(batch["kv_bytes_per_step"]) == NEW_TOKENS and batch["kv_bytes_per_step"][-1] == batch["kv_bytes"]
        assert batch["decode_seconds"] == pytest.approx(sum(batch["decode_step_seconds"]))


def test_compare_draws_the_pictures_and_the_table(sweep, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["compare", str(sweep)])
    compare.main()
    for name in ("step_time.png", "kv_bytes.png", "decode_speed.png", "compare.md", "compare.json"):
        assert (sweep / name).stat().st_size > 0, name
    table = (sweep / "compare.md").read_text()
    assert all(f"| {preset} |" in table for preset in PRESETS)
    assert "no ppl reports" in capsys.readouterr().out  # the quality picture needs mode=ppl reports


def test_quality_against_bytes_comes_from_ppl_reports(sweep, tmp_path):
    """A ppl report of a preset gives it a point of the quality picture and a perplexity in the table."""
    report = json.loads(next((sweep / "infer").glob("*-generate-full.json")).read_text())
    report["config"]["mode"] = "ppl"
    report["batches"][0]["perplexity"] = 12.5
    (tmp_path / "20990101-000000-000000-ppl-full.json").write_text(json.dumps(report))
    for path in (sweep / "infer").glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    rows = compare.summarize(compare.read_reports(tmp_path))
    assert rows["full"]["perplexity"] == 12.5 and rows["sink"]["perplexity"] is None
    assert (tmp_path / "quality_vs_bytes.png") in compare.draw(rows, tmp_path)


def test_compare_refuses_a_folder_without_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["compare", str(tmp_path)])
    with pytest.raises(SystemExit, match="no infer.py report"):
        compare.main()


def test_task_reports_give_a_score_table_and_one_needle_picture_with_a_panel_per_preset(tmp_path):
    """mode=tasks reports of a sweep: the table's task columns hold their scores (not dashes), and needles.png
    compares the presets in one picture."""
    samples = [{"task": "passkey", "task_type": "retrieval", "context_length": n, "depth": d, "score": 1.0,
                "answer": " 12345", "generated": " 12345."} for n in (256, 512) for d in (0.0, 0.4987, 1.0)]
    for i, preset in enumerate(("full", "sink")):
        report = {"config": {"cache": {"name": preset}, "mode": "tasks", "tasks": {"depths": [0.0, 0.5, 1.0]}},
                  "device": "cpu", "batches": [{"tasks_type_retrieval": 1.0 - i / 2, "tasks_type_copy": 0.25}],
                  "samples": samples}
        (tmp_path / f"2099010{i}-000000-000000-tasks-{preset}.json").write_text(json.dumps(report))
    rows = compare.summarize(compare.read_reports(tmp_path))
    text = compare.table(rows, tmp_path)
    assert "| full | 1.000 | 0.250 |" in text and "| sink | 0.500 | 0.250 |" in text
    assert (tmp_path / "needles.png") in compare.draw(rows, tmp_path)
