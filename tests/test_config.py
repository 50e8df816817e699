"""Tests of pgot/config.py: YAML + overrides -> validated dataclasses, every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgot.config import Config, ConfigError, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_need_a_model():
    with pytest.raises(ConfigError, match="model.path is empty"):
        load_config(None)
    cfg = load_config(None, ["model.tiny=true"])
    assert isinstance(cfg, Config) and cfg.model.tiny


def test_overrides_coerce_by_field_type(tmp_path):
    # PyYAML reads 3e-4 (no dot) as a string: the float field must still get a float
    p = _write(tmp_path, "model: {tiny: true}\ntrain: {learning_rate: 3e-4}\n")
    cfg = load_config(
        p,
        [
            "train.max_steps=12",
            "ot.epsilon=1e-2",
            "model.gradient_checkpointing=no",
            "train.active_rewards=[a]",
            "rewards.0.name=a",
            "rewards.0.weight=2",
        ],
    )
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.train.max_steps == 12 and isinstance(cfg.train.max_steps, int)
    assert cfg.ot.epsilon == pytest.approx(0.01)
    assert cfg.model.gradient_checkpointing is False
    assert cfg.rewards[0].name == "a" and cfg.rewards[0].weight == 2.0
    assert cfg.train.active_rewards == ["a"]


def test_list_items_addressed_by_index(tmp_path):
    p = _write(tmp_path, "model: {tiny: true}\nrewards:\n  - {name: contrast}\n  - {name: brightness}\n")
    cfg = load_config(p, ["rewards.1.weight=3", "rewards.1.strength=weak"])
    assert [r.name for r in cfg.rewards] == ["contrast", "brightness"]
    assert cfg.rewards[1].weight == 3.0 and cfg.rewards[1].strength == "weak"
    with pytest.raises(ConfigError, match=r"rewards.5"):
        load_config(p, ["rewards.5.weight=1"])


def test_all_problems_reported_at_once(tmp_path):
    p = _write(tmp_path, "model: {tiny: true}\ntrain: {max_step: 3, learning_rate: fast}\not: {epsilon: abc}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    text = str(err.value)
    assert "unknown key 'train.max_step'. Did you mean 'max_steps'?" in text
    assert "train.learning_rate must be a number, got 'fast'" in text
    assert "ot.epsilon must be a number, got 'abc'" in text
    assert len(err.value.problems) == 3


def test_ranges_name_the_key_and_the_fix():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.tiny=true", "draft.k=6", "draft.num_steps=4", "ot.epsilon=-1"])
    text = str(err.value)
    assert "draft.k must be in [0, draft.num_steps=4], got 6. Lower draft.k or raise draft.num_steps." in text
    assert "ot.epsilon must be > 0, got -1.0." in text


def test_literal_and_section_errors():
    with pytest.raises(ConfigError, match=r"train.objective must be one of .*got 'pgo'. Did you mean 'pgot'\?"):
        load_config(None, ["model.tiny=true", "train.objective=pgo"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian'. Did you mean 'train'\?"):
        load_config(None, ["model.tiny=true", "trian.max_steps=3"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["model.tiny=true", "train.max_steps"])


def test_active_rewards_must_be_configured():
    with pytest.raises(ConfigError, match=r"train.active_rewards names 'contrats'.*Did you mean 'contrast'\?"):
        load_config(None, ["model.tiny=true", "rewards.0.name=contrast", "train.active_rewards=[contrats]"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = _write(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    scalar = _write(tmp_path, "42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(
        None,
        ["model.tiny=true", "rewards.0.name=contrast", "rewards.0.target=0.5", "train.reward_sets={s: [contrast]}"],
    )
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def _pgot_configs() -> list[Path]:
    # accelerate launch files and agent decision scripts are not pgot configs
    return sorted(p for p in CONFIGS.rglob("*.yaml") if not {"accelerate", "agent"} & set(p.parts))


@pytest.mark.parametrize("path", _pgot_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    """Every YAML in configs/ (except accelerate launch files and agent scripts) is a valid pgot config."""
    cfg = load_config(path)
    assert cfg.rewards, f"{path} configures no reward"


def test_configs_exist():
    assert (CONFIGS / "debug.yaml").is_file()
