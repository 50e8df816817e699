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
            "train.active_rewards=[contrast]",
            "rewards.0.name=contrast",
            "rewards.0.weight=2",
        ],
    )
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.train.max_steps == 12 and isinstance(cfg.train.max_steps, int)
    assert cfg.ot.epsilon == pytest.approx(0.01)
    assert cfg.model.gradient_checkpointing is False
    assert cfg.rewards[0].name == "contrast" and cfg.rewards[0].weight == 2.0
    assert cfg.train.active_rewards == ["contrast"]


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
    assert "unknown key 'train.max_step'. Did you mean 'train.max_steps'?" in text
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


def test_type_and_range_problems_together():
    """One command with a type error and a range error reports both; a key that failed to coerce gets no range line
    about the default it fell back to, and every type error says what the key is for."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.tiny=true", "rewards.0.name=contrast", "train.max_steps=many", "ot.epsilon=0"])
    assert err.value.problems == [
        "train.max_steps must be an integer, got 'many'. train.max_steps: Optimizer steps.",
        "ot.epsilon must be > 0, got 0.0.",
    ]
    with pytest.raises(ConfigError) as err:  # model.path falls back to "", which the range check would call empty
        load_config(None, ["rewards.0.name=contrast", "model.path=[a, b]", "model.resolution=40"])
    (path_line, resolution_line) = err.value.problems
    assert path_line.startswith(
        "model.path must be a string, got ['a', 'b']. model.path: Local diffusers folder of SD3"
    )
    assert "builtin:testbed" in path_line  # the key's docstring, without reStructuredText markup
    assert resolution_line == "model.resolution must be a positive multiple of 16, got 40."
    assert err.value.config is not None and err.value.config.model.resolution == 40  # for the file checks


def test_resume_true_names_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.tiny=true", "rewards.0.name=contrast", "train.resume=true"])
    (line,) = err.value.problems
    assert line.startswith("train.resume must be a string, got True.")
    assert "latest" in line and "a checkpoint folder" in line and "empty" in line


def test_reward_name_typo_is_a_did_you_mean():
    with pytest.raises(ConfigError) as err:
        load_config(
            None, ["model.tiny=true", "rewards.0.name=hsp", "rewards.1.name=contrast", "train.reward_sets={s: [hps]}"]
        )
    (line,) = err.value.problems  # the reward set naming the intended hps is that typo, not a second problem
    assert line.startswith("rewards.0.name='hsp' is not a known reward. Known rewards: clip, ict, hp, hps,")
    assert line.endswith("Did you mean 'hps'?")


def test_reward_names_are_the_registry():
    """config.REWARD_NAMES (known without importing any model library) is exactly pgot.rewards.REWARDS."""
    from pgot.config import REWARD_NAMES
    from pgot.rewards import REWARDS

    assert sorted(REWARD_NAMES) == sorted(REWARDS)


def test_auto_strategy_needs_an_agent():
    base = ["model.tiny=true", "rewards.0.name=contrast", "train.strategy=auto"]
    with pytest.raises(ConfigError, match=r"train.strategy=auto .* agent.backend=none .* Set train.strategy=offline"):
        load_config(None, base, stage="train")
    load_config(None, [*base, "agent.backend=heuristic"], stage="train")
    load_config(None, [*base, "agent.backend=none"])  # the stage rule: pgot-precompute may share the config
    with pytest.raises(ConfigError, match=r"agent.backend=heuristic decides from probe scores.*train.probe_every"):
        load_config(None, [*base, "agent.backend=heuristic", "train.probe_every=0"], stage="train")
    with pytest.raises(ConfigError, match=r"agent.references.contrats names a reward .* Did you mean 'contrast'\?"):
        load_config(None, [*base, "agent.backend=heuristic", "agent.references={contrats: x.png}"], stage="train")


def test_yaml_error_has_line_and_column(tmp_path):
    bad = _write(tmp_path, "model:\n  tiny: true\n  path: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    (line,) = err.value.problems
    assert line.startswith(f"{bad}:4:1: ") and "(while parsing a flow sequence at 3:9)" in line
    assert err.value.config is None
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is a folder; give a YAML file"):
        load_config(folder)


def test_shipped_configs_by_name(tmp_path, monkeypatch):
    from pgot.config import config_names, find_config

    monkeypatch.chdir(tmp_path)  # not the repository: names still resolve
    names = config_names()
    assert {"debug", "sd35_turbo_pgot", "baselines/weighted_1111"} <= set(names)
    assert not any(n.startswith(("accelerate/", "agent/")) for n in names)
    assert (
        find_config("debug") == find_config("debug.yaml") == find_config("configs/debug.yaml") == CONFIGS / "debug.yaml"
    )
    assert find_config("../pyproject") is None and find_config("/etc/passwd") is None
    assert load_config("baselines/weighted_1111") == load_config(CONFIGS / "baselines" / "weighted_1111.yaml")


def test_every_key_is_documented():
    """--list-keys shows a docstring for every key: a new field without one fails here."""
    from pgot.config import describe_keys

    keys = describe_keys()
    missing = [k.key for k in keys if not k.doc]
    assert not missing, f"config fields without a docstring: {missing}"
    assert all("``" not in k.doc for k in keys)
    assert [k.key for k in describe_keys("rewards")][:2] == ["rewards.<i>.name", "rewards.<i>.path"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.active_rewards=[x", "train.active_rewards must be a list, got '[x', which is not valid YAML"),
        ("train.reward_sets={a: [x", "train.reward_sets must be a mapping, got '{a: [x', which is not valid YAML"),
        ("train.max_steps.x=3", "override train.max_steps.x: train.max_steps is a value (3), not a section"),
        ("rewards.0.name.x=1", "override rewards.0.name.x: rewards.0.name is a value ('contrast'), not a section"),
        ("train.active_rewards=[[1]]", "train.active_rewards.0 must be a string, got [1]."),
        ("train.reward_sets={a: 1}", "train.reward_sets.a must be a list, got 1."),
        ("eval.models=[{soup: {a: [1]}}]", "eval.models.0.soup.a must be a number, got [1]."),
    ],
)
def test_malformed_overrides_are_problems_not_tracebacks(override, expected):
    """Whatever is typed on the command line, the answer is a ConfigError line, never another exception."""
    base = ["model.tiny=true", "rewards.0.name=contrast", "train.max_steps=3"]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, override], stage="train")
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def _float_keys(cls: type, prefix: str = "") -> list[str]:
    """Every float config key as typed on the command line (list items at index 0, mapping values under ``x``),
    found by walking the dataclass fields: a new float field is tested without editing this test."""
    import dataclasses
    import types
    import typing

    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            keys += _float_keys(tp, f"{key}.")
        elif origin is list and args and dataclasses.is_dataclass(args[0]):
            keys += _float_keys(args[0], f"{key}.0.")
        elif origin is dict and args[1] is float:
            keys.append(f"{key}.x")
        elif tp is float or (origin in (typing.Union, types.UnionType) and float in args):
            keys.append(key)
    return keys


def test_float_keys_are_found():
    keys = _float_keys(Config)
    assert {"train.learning_rate", "train.weight_decay", "ot.epsilon", "draft.shift", "rewards.0.target"} <= set(keys)
    assert "eval.models.0.soup.x" in keys and len(keys) >= 20


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".inf"])
def test_every_float_key_must_be_finite(value):
    """Rule: every float config value is finite (no float field's docstring allows inf); each key gets exactly one
    line, naming it as typed, whatever its range check would have said."""
    for key in _float_keys(Config):
        base = ["model.tiny=true", "rewards.0.name=contrast"] + (
            ["eval.models.0.lora=x"] if key.startswith("eval.models") else []
        )
        with pytest.raises(ConfigError) as exc:
            load_config(None, [*base, f"{key}={value}"])
        shown = {"nan": "nan", "inf": "inf", ".inf": "inf", "-inf": "-inf"}[value]
        mine = [q for q in exc.value.problems if q.startswith(key)]
        assert len(mine) == 1 and mine[0].startswith(
            f"{key} must be a finite number, got {shown}. Set a finite value"
        ), (key, exc.value.problems)


def test_reported_nonfinite_values_fail_the_check():
    """The reported values: inf passed --check, weight_decay=nan failed only after the model loaded."""
    with pytest.raises(ConfigError) as exc:
        load_config(
            None,
            [
                "model.tiny=true",
                "train.learning_rate=inf",
                "ot.epsilon=inf",
                "train.max_grad_norm=inf",
                "train.weight_decay=nan",
            ],
        )
    assert sorted(q.split(" ", 1)[0] for q in exc.value.problems) == [
        "ot.epsilon",
        "train.learning_rate",
        "train.max_grad_norm",
        "train.weight_decay",
    ]
    assert (
        "train.learning_rate must be a finite number, got inf. Set a finite value (e.g. the default train.learning_rate=0.0001). train.learning_rate: AdamW learning rate."
        in exc.value.problems
    )


@pytest.mark.parametrize(
    ("text", "where", "key", "first"),
    [
        (
            "model: {tiny: true}\not:\n  epsilon: 0.1\n  max_iter: 10\n  epsilon: 0.5\n",
            "5:3",
            "epsilon",
            "line 3, column 3",
        ),
        ("model: {tiny: true}\ntrain: {max_steps: 3}\ntrain: {max_steps: 4}\n", "3:1", "train", "line 2, column 1"),
        ("rewards:\n  - {name: contrast, weight: 1, weight: 2}\n", "2:33", "weight", "line 2, column 22"),
    ],
)
def test_duplicate_yaml_keys_are_refused(tmp_path, text, where, key, first):
    """Rule: a repeated key in a config file is one error line with file:line:col, never the last value silently."""
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert exc.value.problems == [
        f"{p}:{where}: config file {str(p)!r} is not valid YAML: duplicate key {key!r} (first at {first}); YAML "
        "would keep only the last value. Remove one of them."
    ]


def test_yaml_merge_keys_may_still_be_overridden():
    from pgot.config import load_yaml

    assert load_yaml("a: &base {x: 1, y: 2}\nb:\n  <<: *base\n  x: 3\n") == {
        "a": {"x": 1, "y": 2},
        "b": {"x": 3, "y": 2},
    }


def test_duplicate_keys_in_overrides_and_agent_script(tmp_path):
    """The same loader reads key=value overrides and agent.script (another YAML pgot reads as configuration)."""
    from pgot.agent import load_script

    with pytest.raises(ConfigError) as exc:
        load_config(None, ["model.tiny=true", "train.reward_sets={W: [contrast], W: [contrast]}"])
    assert any(
        q.startswith("train.reward_sets must be a mapping") and "duplicate key 'W'" in q for q in exc.value.problems
    )
    script = tmp_path / "script.yaml"
    script.write_text("10: {action: continue}\n20: {action: continue}\n10: {action: switch_online}\n")
    with pytest.raises(ValueError) as err:
        load_script(script)
    assert str(err.value) == (
        f"agent.script={str(script)!r} is not valid YAML: {script}:3:1: duplicate key 10 (first at line 1, column 1); "
        "YAML would keep only the last value. Remove one of them."
    )


def test_unknown_key_suggests_the_full_dotted_key():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["model.tiny=true", "train.max_step=3", "ot.epsilonn=0.1", "trian.max_steps=2"])
    assert "unknown key 'train.max_step'. Did you mean 'train.max_steps'?" in exc.value.problems
    assert "unknown key 'ot.epsilonn'. Did you mean 'ot.epsilon'?" in exc.value.problems
    assert "unknown key 'trian'. Did you mean 'train'?" in exc.value.problems
