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
