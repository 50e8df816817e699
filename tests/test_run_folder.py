"""pgot/run_folder.py: the rules of a run folder (what a rerun does) and the config comparison of a resume.

The behaviours end to end (resume refused, restarted, finished, interrupted) are tested through pgot-train in
tests/test_train.py; here the pure parts.
"""

from __future__ import annotations

from pathlib import Path

from pgot import run_folder
from pgot.config import load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "tests" / "configs" / "tiny_debug.yaml"  # tiny SD3, analytic rewards


def _cfg(out: Path, *extra: str):
    return load_config(DEBUG, [f"train.output_dir={out}", *extra])


def test_config_changes_names_keys_as_typed(tmp_path: Path) -> None:
    saved = tmp_path / "config.yaml"
    base = _cfg(tmp_path)
    save_config(base, saved)
    assert run_folder.config_changes(_cfg(tmp_path), saved) == []
    same = _cfg(tmp_path / "elsewhere", "train.max_steps=50", "agent.base_url=http://vllm:8000/v1",
                "rewards.2.gradient_checkpointing=true", "eval.models=[{lora: x}]")  # fmt: skip
    assert (
        run_folder.config_changes(same, saved) == []
    )  # train.output_dir, max_steps, endpoint, memory, eval: resumable
    other = _cfg(tmp_path, "rewards.2.name=brightness", "draft.shift=3.0", "model.lora_path=")
    lines = run_folder.config_changes(other, saved)
    assert sorted(lines[1:-1]) == [
        "draft.shift: 3.0 here, null in the run",
        "rewards.2.name: brightness here, sharpness in the run",
    ]
    more = _cfg(tmp_path, "rewards=[{name: contrast}]")
    assert "rewards.1.name: (not set) here, contrast in the run" in run_folder.config_changes(more, saved)
    assert "no config.yaml" in run_folder.config_changes(base, tmp_path / "nope" / "config.yaml")[0]


def test_folder_stage_reads_what_each_stage_leaves(tmp_path):
    from pgot.run_folder import folder_stage, other_stage_problems

    assert folder_stage(tmp_path / "missing") is None and folder_stage(tmp_path) is None
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    assert folder_stage(run) is None  # final/ without config.yaml: not a run pgot-train wrote
    (run / "config.yaml").write_text("{}")
    assert folder_stage(run) == ("train", ["config.yaml", "final"])
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "config.yaml").write_text("{}")
    assert folder_stage(ev) is None  # a config.yaml alone marks no stage
    (ev / "results.csv").write_text("")
    assert folder_stage(ev) == ("eval", ["results.csv"])
    store = tmp_path / "store"
    (store / "shards").mkdir(parents=True)
    assert folder_stage(store) == ("precompute", ["shards"])
    assert other_stage_problems(store, "precompute.store", "precompute") == []
    assert other_stage_problems(ev, "train.output_dir", "train") == [
        f"train.output_dir={ev} holds a pgot-eval evaluation (results.csv; written as eval.output_dir), not the output "
        "of pgot-train: writing there would overwrite or mix with it. Set train.output_dir to a folder of its own (a "
        "new one, or one pgot-train wrote)."
    ]


def test_refused_training_leaves_no_trace_in_the_folder_it_created(tmp_path, monkeypatch):
    """A run refused after it took its folder (here: the preflight bypassed, a resume naming no checkpoint) removes
    the folder and the parents it created: no .pgot.lock, no config.yaml."""
    import pytest

    import pgot.train

    monkeypatch.setattr(pgot.train, "preflight", lambda *args: None)
    cfg = _cfg(tmp_path / "new" / "run", f"train.resume={tmp_path / 'nowhere'}", "train.strategy=online")
    with pytest.raises(ValueError, match="train.resume"):
        pgot.train.run(cfg)
    assert not (tmp_path / "new").exists()
