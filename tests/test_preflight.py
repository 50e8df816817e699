"""Tests of pgot/preflight.py (and pgot.frontier.compare_settings): every input checked before any weight loads,
every problem at once, one line each, naming the key as typed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import pgot.model
import pgot.rewards
import pgot.train
from pgot import cli, preflight
from pgot.checkpoints import TrainerState, write_state
from pgot.config import ConfigError, RewardConfig, load_config, save_config
from pgot.files import LOCK_FILE, FolderLock
from pgot.frontier import compare_settings
from pgot.precompute import store_meta

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "tests" / "configs" / "tiny_debug.yaml")  # the fast world: tiny SD3, analytic rewards
EVAL = str(ROOT / "tests" / "configs" / "tiny_eval.yaml")
TINY = [  # the tiny debug config, smaller
    "model.resolution=16",
    "prompts.limit=2",
    "precompute.samples_per_prompt=2",
    "precompute.batch_size=4",
    "train.probe_every=0",
    "train.final_eval=false",
]


@pytest.fixture
def no_weights(monkeypatch):
    """Loading a model or a reward fails the test: the preflight must report before any weight loads."""

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded before every input was checked")

    for target in (pgot.model, pgot.train):
        monkeypatch.setattr(target, "load_model", forbidden)
    monkeypatch.setattr(pgot.rewards, "build", forbidden)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A small frontier store of the debug config (tiny model, analytic rewards), built by pgot-precompute."""
    folder = tmp_path_factory.mktemp("store") / "frontier"
    assert cli.precompute_main(["--config", DEBUG, *TINY, f"precompute.store={folder}", "--log-level", "WARNING"]) == 0
    return folder


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line.removeprefix("error: ") for line in err.strip().splitlines()]


# --------------------------------------------------------------------------------------------
# Every problem at once, before any weight loads
# --------------------------------------------------------------------------------------------


def test_paper_config_reports_every_missing_input_at_once(tmp_path, monkeypatch, capsys, no_weights):
    """The paper's config on a machine without its weights: prompts, model, two rewards and the store, in one run."""
    monkeypatch.setenv("PGOT_TEST_KEY", "sk-test")
    args = [
        "--config", "sd35_turbo_pgot",
        f"prompts.path={tmp_path / 'prompts.txt'}",
        f"model.path={tmp_path / 'sd35'}",
        f"rewards.0.path={tmp_path / 'ICT'}",
        f"rewards.1.path={tmp_path / 'HP'}",
        "rewards.2.path=tiny",
        "rewards.3.path=tiny",
        f"train.store={tmp_path / 'store'}",
        f"train.output_dir={tmp_path / 'run'}",
        "agent.api_key_env=PGOT_TEST_KEY",
    ]  # fmt: skip
    assert cli.train_main(args) == 2
    lines = _errors(capsys)
    assert len(lines) == 5, lines
    for line, key in zip(
        lines, ["prompts.path", "model.path", "rewards.0.path", "rewards.1.path", "train.store"], strict=True
    ):
        assert line.startswith(key), (key, line)
    assert "pgot-fetch" in lines[1] and "does not exist" in lines[4] and "train.precompute_if_missing" in lines[4]
    assert not (tmp_path / "run").exists()  # nothing created

    # pgot-precompute: the same inputs but the store (which it writes); pgot-train --check: the same five
    assert cli.precompute_main([*args, f"precompute.store={tmp_path / 'store'}"]) == 2
    lines = _errors(capsys)
    assert [line.split("=")[0] for line in lines] == ["prompts.path", "model.path", "rewards.0.path", "rewards.1.path"]
    assert cli.train_main([*args, "--check"]) == 2 and len(_errors(capsys)) == 5


def test_config_and_input_problems_in_one_command(tmp_path, capsys, no_weights):
    """A config problem does not hide the missing files, and a mistyped reward is not also a missing checkpoint."""
    args = [
        "--config",
        DEBUG,
        "train.max_steps=0",
        "rewards.0.name=colorfulnes",
        f"prompts.path={tmp_path / 'p.txt'}",
    ]
    assert cli.train_main([*args, f"train.output_dir={tmp_path / 'run'}", "train.strategy=online"]) == 2
    lines = _errors(capsys)
    assert len(lines) == 3, lines
    assert lines[0].startswith("train.max_steps must be >= 1")
    assert "Did you mean 'colorfulness'?" in lines[1]
    assert lines[2].startswith(f"prompts.path='{tmp_path / 'p.txt'}' does not exist")


def test_ready_config_passes_check_and_creates_nothing(tmp_path, capsys):
    args = ["--config", DEBUG, *TINY, f"train.output_dir={tmp_path / 'run'}", f"train.store={tmp_path / 's'}"]
    assert cli.train_main([*args, f"precompute.store={tmp_path / 's'}", "--check"]) == 0
    assert "every input it names are in place" in capsys.readouterr().out
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()


def test_library_entry_points_run_the_same_preflight(tmp_path, no_weights):
    """Notebook users get the CLI's errors: train.run / precompute.run / evaluate.run raise one ConfigError."""
    from pgot import evaluate, precompute, train

    overrides = [
        *TINY,
        f"prompts.path={tmp_path / 'none.txt'}",
        "rewards.0.name=hps",
        f"rewards.0.path={tmp_path}/x.pt",
    ]
    cfg = load_config(DEBUG, [*overrides, f"train.output_dir={tmp_path / 'run'}", f"train.store={tmp_path / 's'}"])
    for run in (train.run, precompute.run, evaluate.run):
        with pytest.raises(ConfigError) as err:
            run(cfg)
        assert any(p.startswith("prompts.path=") for p in err.value.problems)
        assert any("rewards.0.path" in p and "does not exist" in p for p in err.value.problems), err.value.problems


# --------------------------------------------------------------------------------------------
# Folders (issue 10: FileExistsError / PermissionError tracebacks)
# --------------------------------------------------------------------------------------------

_OUTPUTS = [
    (cli.train_main, "train.output_dir"),
    (cli.precompute_main, "precompute.store"),
    (cli.eval_main, "eval.output_dir"),
]


@pytest.mark.parametrize("main, key", _OUTPUTS, ids=[k for _, k in _OUTPUTS])
def test_output_folder_that_is_a_file(main, key, tmp_path, capsys, no_weights):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    config = EVAL if main is cli.eval_main else DEBUG
    base = ["--config", config, *TINY, "train.strategy=online", f"precompute.store={tmp_path / 's'}"]
    base += [f"train.output_dir={tmp_path / 'run'}", f"eval.output_dir={tmp_path / 'eval'}"]
    assert main([*base, f"{key}={afile}"]) == 2
    assert _errors(capsys) == [
        f"{key}={str(afile)!r} is a file, not a folder. Point {key} at a folder, or move the file away."
    ]
    assert main([*base, f"{key}={afile / 'run'}"]) == 2  # under a file: not even root can create it
    (line,) = _errors(capsys)
    assert line.startswith(f"{key}={str(afile / 'run')!r} cannot be created: {afile} is a file")


def test_output_folder_without_permission(tmp_path, capsys, no_weights):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root: permission bits do not stop writes (the case under a file is above)
            pytest.skip("running as root: a read-only folder is writable")
        args = ["--config", DEBUG, *TINY, "train.strategy=online", f"train.output_dir={locked / 'run'}"]
        assert cli.train_main(args) == 2
        (line,) = _errors(capsys)
        assert line.startswith(f"train.output_dir={str(locked / 'run')!r} cannot be created: Permission denied")
    finally:
        locked.chmod(0o700)


def test_output_folder_rules():
    assert preflight.output_folder("", "train.output_dir") == [
        "train.output_dir is empty. Set train.output_dir to a folder (it is created when missing)."
    ]


# --------------------------------------------------------------------------------------------
# The store (issue 11: stores built with other settings)
# --------------------------------------------------------------------------------------------


def _train_check(store: Path, tmp_path: Path, *extra: str) -> int:
    base = ["--config", DEBUG, *TINY, f"train.store={store}", f"precompute.store={store}"]
    return cli.train_main(
        [*base, f"train.output_dir={tmp_path / 'run'}", "train.precompute_if_missing=false", *extra, "--check"]
    )


def test_store_with_other_sampler_and_model_settings(store, tmp_path, capsys, no_weights):
    assert _train_check(store, tmp_path) == 0
    capsys.readouterr()
    code = _train_check(store, tmp_path, "model.resolution=32", "draft.num_steps=8", "model.tiny_seed=3")
    assert code == 2
    lines = _errors(capsys)
    assert len(lines) == 3, lines
    assert (
        lines[0].startswith("model.tiny_seed: 3 (model fingerprint tiny-") and "its fronts describe another" in lines[0]
    )
    assert lines[1].startswith(f"model.resolution: 32 in the config, 16 in the store {store}. ")
    assert lines[2].startswith(f"draft.num_steps: 8 in the config, 4 in the store {store}. ")
    assert "{" not in "".join(lines)  # no dictionaries dumped


def test_store_with_other_rewards(store, tmp_path, capsys, no_weights):
    assert _train_check(store, tmp_path, "rewards.2.name=brightness") == 2
    (line,) = _errors(capsys)
    assert line.startswith("rewards: colorfulness, contrast, brightness in the config, but the store")
    assert "was computed for rewards colorfulness, contrast, sharpness" in line
    assert _train_check(store, tmp_path, "rewards.0.name=contrast", "rewards.1.name=colorfulness") == 2
    (line,) = _errors(capsys)
    assert "in the order contrast" not in line and "has them in the order colorfulness, contrast, sharpness" in line
    assert _train_check(store, tmp_path, "rewards.2.name=sharpnes") == 2  # a typo: "did you mean", not a mismatch
    (line,) = _errors(capsys)
    assert line.startswith("rewards.2.name='sharpnes' is not a known reward") and "store" not in line


def test_store_without_the_training_prompts(store, tmp_path, capsys, no_weights):
    assert _train_check(store, tmp_path, "prompts.limit=4") == 2
    (line,) = _errors(capsys)
    assert line.startswith(f"train.store={store} has no front for 2 of the 4 training prompts (prompt ids 2, 3)")
    assert _train_check(store, tmp_path, "prompts.limit=4", "train.strategy=online") == 0  # online reads no front


def test_precompute_rerun_with_other_settings(store, tmp_path, capsys, no_weights):
    base = ["--config", DEBUG, *TINY, f"precompute.store={store}", "--check"]
    assert cli.precompute_main(base) == 0
    capsys.readouterr()
    assert cli.precompute_main([*base, "precompute.seed=1", "precompute.samples_per_prompt=3"]) == 2
    lines = _errors(capsys)
    assert lines == [
        f"precompute.samples_per_prompt: 3 in the config, 2 in the store {store}. Set precompute.store to a new "
        f"folder, or delete {store} to rebuild it.",
        f"precompute.seed: 1 in the config, 0 in the store {store}. Set precompute.store to a new folder, or delete "
        f"{store} to rebuild it.",
    ]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\nanother prompt\n")
    assert cli.precompute_main([*base, f"prompts.path={prompts}"]) == 2
    (line,) = _errors(capsys)
    assert "prompt id 0 is 'a red cube' in prompts.path but" in line


def _meta(*overrides: str, fingerprint: str = "fp", sigmas=(1.0, 0.5, 0.0)) -> dict:
    cfg = load_config(None, ["model.tiny=true", *overrides])
    return store_meta(cfg, fingerprint, "tiny", "float32", list(sigmas))


def test_compare_settings_rules():
    """Each setting that changes the fronts, one line each; the loss weights and N do not count (except to extend)."""
    rewards = ["rewards.0.name=ict", "rewards.0.path=/w/ICT", "rewards.1.name=hps", "rewards.1.path=tiny"]
    meta = _meta(*rewards, "draft.shift=3.0")
    same = load_config(None, ["model.tiny=true", *rewards, "rewards.0.weight=5", "precompute.samples_per_prompt=9"])
    assert compare_settings(meta, same, store="S", fingerprint="fp", default_shift=3.0) == []  # null shift = 3.0
    assert compare_settings(meta, same, store="S", default_shift=1.0)[0].startswith(
        "draft.shift: null in the config, 3.0"
    )
    other = load_config(
        None,
        ["model.tiny=true", *rewards, "rewards.0.path=/w/ICT2", "rewards.0.arch=ViT-L-14", "rewards.1.tiny_seed=4",
         "rewards.1.dtype=bfloat16", "draft.guidance_scale=2", "model.lora_path=/l.safetensors"],
    )  # fmt: skip
    lines = compare_settings(meta, other, store="S", fingerprint="fp2", default_shift=3.0)
    keys = [line.split(":")[0] for line in lines]
    assert keys == [
        "model.tiny_seed", "model.lora_path", "draft.guidance_scale", "rewards.0.path", "rewards.0.arch",
        "rewards.1.dtype", "rewards.1.tiny_seed",
    ]  # fmt: skip
    assert lines[3].startswith("rewards.0.path: '/w/ICT2' in the config, '/w/ICT' in the store S.")
    extend = compare_settings(meta, same, store="S", extend=True, dtype="bfloat16")
    assert [line.split(":")[0] for line in extend] == ["model.dtype", "precompute.samples_per_prompt"]
    assert "delete S to rebuild it" in extend[0]
    sig = compare_settings(meta, same, store="S", default_shift=3.0, sigmas=[1.0, 0.4, 0.0])
    assert len(sig) == 1 and "sigma schedule" in sig[0]
    assert compare_settings({**meta, "schema_version": 0}, same, store="S")[0].startswith(
        "the store S has schema version 0"
    )


# --------------------------------------------------------------------------------------------
# Environment, agent, trackers
# --------------------------------------------------------------------------------------------


def _train(tmp_path: Path, *extra: str) -> int:
    base = ["--config", DEBUG, *TINY, "train.strategy=online", f"train.output_dir={tmp_path / 'run'}"]
    return cli.train_main([*base, *extra, "--check"])


def test_missing_tracker_is_refused(tmp_path, capsys, monkeypatch, no_weights):
    monkeypatch.setitem(preflight._TRACKERS, "wandb", lambda: False)
    assert _train(tmp_path, "train.log_with=[wandb]") == 2
    (line,) = _errors(capsys)
    assert line.startswith("train.log_with names wandb, which is not installed") and "pip install wandb" in line


def test_agent_key_script_and_references(tmp_path, capsys, monkeypatch, no_weights):
    monkeypatch.delenv("PGOT_NO_SUCH_KEY", raising=False)
    assert _train(tmp_path, "agent.backend=openai", "agent.api_key_env=PGOT_NO_SUCH_KEY") == 2
    (line,) = _errors(capsys)
    assert "PGOT_NO_SUCH_KEY (agent.api_key_env), which is not set" in line
    assert _train(tmp_path, "agent.backend=openai", "agent.api_key_env=") == 0  # a local server without a key
    capsys.readouterr()
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    args = ["agent.backend=scripted", f"agent.script={tmp_path / 'none.yaml'}", f"agent.references={{contrast: {bad}}}"]
    assert _train(tmp_path, *args) == 2
    lines = _errors(capsys)
    assert len(lines) == 2 and lines[0].startswith("agent.script=") and "does not exist" in lines[0]
    assert lines[1].startswith(f"agent.references.contrast={str(bad)!r} is not a readable image")


def test_run_folder_and_resume(tmp_path, capsys, no_weights):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    assert _train(tmp_path) == 0, "train.resume=latest (debug.yaml): an attempt without a checkpoint starts afresh"
    capsys.readouterr()
    assert _train(tmp_path, "train.resume=") == 2  # the rule training applies (pgot.run_folder.folder_problems)
    assert _errors(capsys) == [
        f"train.output_dir={run} already holds an attempt at a run that stopped before its first checkpoint. "
        "Continue it with train.resume=latest (an attempt without a checkpoint starts afresh), or choose a new "
        "train.output_dir."
    ]
    assert _train(tmp_path, f"train.resume={tmp_path}") == 2
    (line,) = _errors(capsys)
    assert line.startswith(f"train.resume='{tmp_path}' is not a pgot checkpoint folder")


# --------------------------------------------------------------------------------------------
# Rewards (issue 10: a 336 px arch gave a raw size-mismatch RuntimeError)
# --------------------------------------------------------------------------------------------


def test_reward_arch_must_take_224_px(tmp_path):
    hps = RewardConfig(name="hps", path="random", arch="ViT-L-14-336")
    with pytest.raises(ValueError, match=r"arch 'ViT-L-14-336' is a tower for 336x336 px images.*rewards.0.arch"):
        pgot.rewards.build([hps])  # when building: before any weight is allocated
    folder = tmp_path / "clip336"
    folder.mkdir()
    config = {"model_type": "clip", "vision_config": {"image_size": 336, "patch_size": 14}, "text_config": {}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    clip = RewardConfig(name="clip", path=str(folder))
    with pytest.raises(ValueError, match=r"is a tower for 336x336 px images"):
        pgot.rewards.build([RewardConfig(name="contrast"), clip])
    lines = pgot.rewards.check([RewardConfig(name="contrast"), clip, hps, RewardConfig(name="clip", arch="ViT-X")])
    assert len(lines) == 3
    assert lines[0].startswith(f"rewards.1.path={str(folder)!r}: ") and "rewards.1.arch" in lines[0]
    assert "rewards.2.arch" in lines[1] and "rewards.3.path=''" in lines[2]


def test_reward_folder_lacking_files(tmp_path, capsys, no_weights):
    (tmp_path / "HP" / "hp_backbone").mkdir(parents=True)
    args = [
        "rewards.1.name=hp",
        f"rewards.1.path={tmp_path / 'HP'}",
        "rewards.2.name=imagereward",
        f"rewards.2.path={tmp_path}",
    ]
    assert _train(tmp_path, *args) == 2
    lines = _errors(capsys)
    assert len(lines) == 2
    assert lines[0].startswith(f"rewards.1.path={str(tmp_path / 'HP')!r}: no weights in folder")
    assert "ImageReward.pt' does not exist" in lines[1] and "rewards.2.path" in lines[1]


# --------------------------------------------------------------------------------------------
# pgot-eval: LoRA files, votes, manifests, preference data, runs, before anything is generated
# --------------------------------------------------------------------------------------------


def test_eval_inputs_all_at_once(tmp_path, capsys, no_weights):
    notlora = tmp_path / "notlora.safetensors"
    save_file({"unet.weight": torch.zeros(2)}, str(notlora))
    text = tmp_path / "text.safetensors"
    text.write_text("not a safetensors file")
    models = f"[{{name: base}}, {{name: a, lora: {notlora}}}, {{name: s, soup: {{{text}: 0.5, {tmp_path}/gone: 0.5}}}}]"
    args = [
        "--config", EVAL, f"eval.output_dir={tmp_path / 'eval'}", f"eval.models={models}",
        f"eval.votes=[{tmp_path / 'votes.json'}]", f"eval.preference_data={tmp_path / 'pairs.csv'}",
        f"eval.runs=[{tmp_path / 'run'}]",
    ]  # fmt: skip
    assert cli.eval_main(args) == 2
    lines = _errors(capsys)
    assert len(lines) == 6, lines
    assert (
        lines[0].startswith("eval.models.1.lora: ") and str(notlora) in lines[0] and "holds no LoRA weights" in lines[0]
    )
    assert lines[1].startswith("eval.models.2.soup: ") and str(text) in lines[1] and "is not a readable" in lines[1]
    assert lines[2].startswith("eval.models.2.soup") and f"{tmp_path}/gone" in lines[2] and "does not exist" in lines[2]
    assert lines[3].startswith("eval.preference_data=") and lines[4].startswith("eval.votes.0=")
    assert lines[5].startswith("eval.runs names")
    assert not (tmp_path / "eval").exists()

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("model,prompt,seed,path\nm,a cat,0,gone.png\n")
    assert cli.eval_main(["--config", EVAL, f"eval.output_dir={tmp_path / 'eval'}", f"eval.manifest={manifest}"]) == 2
    lines = _errors(capsys)  # the manifest's message names the missing images on lines of their own
    assert "1 of 1 images do not exist" in lines[0] and lines[1].strip() == f"line 2: {tmp_path / 'gone.png'}"


@pytest.mark.parametrize(
    ("extra", "count", "notes"),
    [
        ([], 2, "prompts.limit=2"),
        (
            ["prompts.limit=4", "prompts.eval_fraction=0.5"],
            2,
            "prompts.limit=4 after holding out prompts.eval_fraction=0.5",
        ),
    ],
)
def test_more_prompts_per_step_than_training_prompts(tmp_path, capsys, no_weights, extra, count, notes):
    """Rule: train.prompts_per_step must not exceed the training prompts (after prompts.limit and the held-out
    split): one error line naming both keys and the count, exit 2, before any weight loads."""
    args = ["--config", DEBUG, *TINY, *extra, f"train.output_dir={tmp_path / 'run'}", "train.strategy=online"]
    assert cli.train_main([*args, "train.objective=pgot", "train.prompts_per_step=3", "--check"]) == 2
    lines = _errors(capsys)
    assert lines == [
        f"train.prompts_per_step=3 is larger than the {count} training prompts of prompts.path=builtin:demo, "
        f"{notes}: a step would train the same prompt more than once, with the same noise. Set "
        f"train.prompts_per_step to at most {count}, or give more prompts (prompts.path, prompts.limit)."
    ]
    assert cli.train_main([*args, f"train.prompts_per_step={count}", "--check"]) == 0


# --------------------------------------------------------------------------------------------
# Completeness: what a run refuses before loading weights, --check refuses (fix round pfe)
# --------------------------------------------------------------------------------------------

EVAL_DEBUG = str(ROOT / "configs" / "eval_debug.yaml")  # the README's eval example: ground truth on testbed prompts


def _stage_args(main, tmp_path: Path) -> list[str]:
    config = EVAL if main is cli.eval_main else DEBUG
    base = ["--config", config, *TINY, "train.strategy=online", f"precompute.store={tmp_path / 's'}"]
    return [*base, f"train.output_dir={tmp_path / 'run'}", f"eval.output_dir={tmp_path / 'eval'}"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where nothing can be created")
@pytest.mark.parametrize("main, key", _OUTPUTS, ids=[k for _, k in _OUTPUTS])
def test_output_folder_the_system_refuses(main, key, tmp_path, capsys, no_weights):
    """/proc/nope passes os.access (as root) but cannot be created: the check tries to create it, as the run does."""
    assert main([*_stage_args(main, tmp_path), f"{key}=/proc/nope/run", "--check"]) == 2
    assert _errors(capsys) == [
        f"{key}='/proc/nope/run' cannot be created: No such file or directory (FileNotFoundError). Point {key} at a "
        "writable place, or fix the permissions of that folder."
    ]


@pytest.mark.parametrize("main, key", _OUTPUTS, ids=[k for _, k in _OUTPUTS])
def test_output_folder_check_creates_nothing(main, key, tmp_path, capsys):
    """The trial creation removes what it created: a --check that passes leaves no folder behind."""
    args = [*_stage_args(main, tmp_path), f"{key}={tmp_path / 'deep' / 'er' / 'out'}", "--check"]
    main(args)
    capsys.readouterr()
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize(
    "main", [cli.precompute_main, cli.train_main, cli.eval_main], ids=["precompute", "train", "eval"]
)
@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_unavailable_device_is_refused_in_every_stage(main, device, tmp_path, capsys, monkeypatch, no_weights):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*_stage_args(main, tmp_path), f"model.device={device}", "--check"]) == 2
    assert _errors(capsys) == [
        f"model.device={device} but this machine has no usable CUDA device (torch.cuda.is_available() is False). "
        "Set model.device=auto (CUDA when there is one, else the CPU) or model.device=cpu, or run where that device "
        "exists."
    ]


def test_device_rules(monkeypatch):
    from pgot.devices import device_problems

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_problems("auto") == device_problems("cpu") == device_problems("cuda:1") == []
    (line,) = device_problems("cuda:2")
    assert line.startswith("model.device=cuda:2 but this machine has 2 CUDA device(s) (cuda:0 to cuda:1).")
    assert device_problems("gpu0") == ["model.device='gpu0' is not a device name. Use auto, cpu, cuda or cuda:<index>."]


@pytest.mark.parametrize("key", ["train.reward_sets", "eval.reward_sets"])
def test_empty_reward_set_is_a_config_error(key, tmp_path, capsys, no_weights):
    main = cli.eval_main if key.startswith("eval") else cli.train_main
    args = [*_stage_args(main, tmp_path), f"{key}={{X: [], Y: [contrast]}}", "train.probe_every=1", "--check"]
    assert main(args) == 2
    assert _errors(capsys) == [
        f"{key}.X is empty: a joint rate over no reward is undefined. List at least one reward (e.g. "
        f"{key}.X=[colorfulness, contrast]), or remove the set."
    ]


def test_eval_check_refuses_prompts_the_ground_truth_cannot_judge(tmp_path, capsys, no_weights):
    args = ["--config", EVAL_DEBUG, "prompts.path=builtin:demo", f"eval.output_dir={tmp_path / 'e'}", "--check"]
    assert cli.eval_main(args) == 2
    (line,) = _errors(capsys)
    assert line.startswith(
        "eval.ground_truth=testbed judges prompts of the testbed grammar only; prompts.path=builtin:demo: 4 prompt(s) "
        "are outside the testbed grammar: prompt 'a red fox sitting in a snowy forest at dawn' is outside"
    )
    assert line.count("Testbed prompts read") == 1  # the grammar stated once, not once per prompt
    assert not (tmp_path / "e").exists()


def test_eval_check_refuses_two_models_of_one_name(tmp_path, capsys, no_weights):
    args = [*_stage_args(cli.eval_main, tmp_path), "eval.models=[{name: x}, {name: x}, {name: y}]", "--check"]
    assert cli.eval_main(args) == 2
    assert _errors(capsys) == ["eval.models has several models named 'x'; give each a distinct eval.models.<i>.name."]


def test_eval_check_refuses_manifest_models_it_lacks(tmp_path, capsys, no_weights):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("model,prompt,seed,path\nm,a cat,0,a.png\n")
    args = [*_stage_args(cli.eval_main, tmp_path), f"eval.manifest={manifest}", "eval.models=[{name: z}]", "--check"]
    assert cli.eval_main(args) == 2
    assert _errors(capsys) == [
        "eval.models names 'z', which eval.manifest does not have (it has m). Name models as in the manifest's model "
        "column, or leave eval.models empty."
    ]


_MARKS = {  # what each stage leaves in its output folder
    "train": ["config.yaml", "metrics.jsonl", "checkpoints/"],
    "eval": ["config.yaml", "scores.parquet", "results.md"],
    "precompute": ["meta.json", "samples.parquet"],
}
_STAGE_OF = {cli.train_main: "train", cli.precompute_main: "precompute", cli.eval_main: "eval"}
_DESCRIBED = {
    "train": ("a pgot-train run (config.yaml, metrics.jsonl, checkpoints; written as train.output_dir)"),
    "eval": ("a pgot-eval evaluation (scores.parquet, results.md; written as eval.output_dir)"),
    "precompute": ("a pgot-precompute frontier store (meta.json, samples.parquet; written as precompute.store)"),
}


_CROSS = [(main, key, other) for main, key in _OUTPUTS for other in _MARKS if other != _STAGE_OF[main]]


@pytest.mark.parametrize("main, key, other", _CROSS, ids=[f"{k}-{o}" for _, k, o in _CROSS])
def test_output_folder_of_another_stage_is_refused(main, key, other, tmp_path, capsys, no_weights):
    stage = _STAGE_OF[main]
    folder = tmp_path / "theirs"
    folder.mkdir()
    for mark in _MARKS[other]:
        if mark.endswith("/"):
            (folder / mark).mkdir()
        else:
            (folder / mark).write_text("x")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    resume = ["train.resume=latest"] if stage == "train" else []  # even a resume does not adopt it
    assert main([*_stage_args(main, tmp_path), f"{key}={folder}", *resume, "--check"]) == 2
    assert _errors(capsys) == [
        f"{key}={folder} holds {_DESCRIBED[other]}, not the output of pgot-{stage}: writing there would overwrite or "
        f"mix with it. Set {key} to a folder of its own (a new one, or one pgot-{stage} wrote)."
    ]
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------------------------
# The output folder under several processes, and a held folder
# --------------------------------------------------------------------------------------------


def _stage_config(main, tmp_path: Path, *extra: str):
    config, *overrides = _stage_args(main, tmp_path)[1:]
    return load_config(config, [*overrides, *extra])


@pytest.mark.parametrize("main, key", _OUTPUTS, ids=[k for _, k in _OUTPUTS])
def test_a_held_output_folder_is_reported_by_every_stage(main, key, tmp_path, capsys, no_weights):
    """--check says that another process holds the folder (its lock), in each stage, naming the holder."""
    folder = tmp_path / "held"
    with FolderLock(folder, key=key, what="a test") as lock:  # another file description: another holder
        assert main([*_stage_args(main, tmp_path), f"{key}={folder}", "--check"]) == 2
        assert _errors(capsys) == [
            f"{key}={folder} is in use by another process ({lock.holder.describe()}). Two processes writing one folder "
            f"would mix their files: wait for it to finish, or set {key} to another folder. The lock "
            f"({folder / LOCK_FILE}) is released when its holder exits, however it exits."
        ]


@pytest.mark.parametrize("main, key", _OUTPUTS, ids=[k for _, k in _OUTPUTS])
def test_only_the_main_process_checks_the_output_folder(main, key, tmp_path, no_weights):
    """The processes of a launch other than the main one (``folders=False``) neither try to create the output
    folder nor look at its lock: the main process takes it right after the preflight, and two processes
    looking at once would see each other. The main process's check finds both problems."""
    stage = _STAGE_OF[main]
    (tmp_path / "file").write_text("x")
    under_a_file = _stage_config(main, tmp_path, f"{key}={tmp_path / 'file' / 'out'}")
    assert [p for p in preflight.check_inputs(under_a_file, stage) if key in p]
    assert preflight.check_inputs(under_a_file, stage, folders=False) == []
    folder = tmp_path / "held"
    held = _stage_config(main, tmp_path, f"{key}={folder}")
    with FolderLock(folder, key=key, what="a test"):
        assert [p for p in preflight.check_inputs(held, stage) if "is in use by another process" in p]
        assert preflight.check_inputs(held, stage, folders=False) == []
    missing = _stage_config(main, tmp_path, f"{key}={tmp_path / 'new' / 'out'}")
    assert preflight.check_inputs(missing, stage, folders=False) == [] and not (tmp_path / "new").exists()


def test_eval_started_as_one_of_several_processes_is_refused_before_any_check(
    tmp_path, capsys, monkeypatch, no_weights
):
    """pgot-eval runs in one process: under a launch its --check (and its run) says so and tries nothing else, so
    the processes do not try eval.output_dir at once."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    folder = tmp_path / "deep" / "eval"
    assert cli.eval_main([*_stage_args(cli.eval_main, tmp_path), f"eval.output_dir={folder}", "--check"]) == 2
    assert _errors(capsys) == [
        "pgot-eval runs in one process, but it was started as one of 2 (accelerate launch / torchrun): every process "
        "would evaluate every model into the same eval.output_dir. Start it as a plain command: pgot-eval --config ..."
    ]
    assert not (tmp_path / "deep").exists()


class _Launch:
    """One process of a 2-process ``accelerate launch`` as the preflight sees it (accelerate's PartialState)."""

    num_processes = 2

    def __init__(self, rank: int):
        self.is_main_process = self.is_local_main_process = rank == 0
        self.ended = False

    def destroy_process_group(self) -> None:
        self.ended = True


def test_a_process_whose_checks_fail_unforeseen_still_joins_the_collective(tmp_path, monkeypatch):
    """Rule: an exception that is not an input's problem (a bug, a damaged file of an unforeseen shape) does not
    leave the collective: the failing process raises it after the gather, the others stop on a line naming it,
    and every process ends the group, so none waits for the failing one until the launcher kills it."""
    cfg = _stage_config(cli.train_main, tmp_path)
    gathered = []

    def gather(obj):
        gathered.append(obj)
        return [*obj, []]  # rank 1 found nothing

    def broken(*args, **kwargs):
        raise AttributeError("'list' object has no attribute 'items'")

    monkeypatch.setattr(preflight, "check_inputs", broken)
    monkeypatch.setattr(preflight, "gather_object", gather)
    main = _Launch(0)
    with pytest.raises(AttributeError, match="no attribute 'items'"):
        preflight.preflight(cfg, "train", main)
    assert gathered and main.ended
    failed_line = gathered[0][0][0]
    monkeypatch.setattr(preflight, "check_inputs", lambda *a, **k: [])
    monkeypatch.setattr(preflight, "gather_object", lambda obj: [[failed_line], *obj])  # rank 0 failed
    other = _Launch(1)
    with pytest.raises(ConfigError) as err:
        preflight.preflight(cfg, "train", other)
    assert err.value.problems == [failed_line] and "AttributeError" in failed_line and other.ended
    assert err.value.every_process  # said by the first process of this machine (pgot.cli)


def test_config_problems_under_a_launch_are_the_collective_preflight(tmp_path, monkeypatch, capsys, no_weights):
    """A config with a problem of its own (load_config raises) under accelerate launch: the CLI's check of the
    inputs is the run's collective preflight, so a process other than the main one neither tries the output
    folder (several processes creating one folder at once see each other) nor prints the error twice."""
    import pgot.devices

    folder = tmp_path / "new" / "run"
    other = _Launch(1)
    monkeypatch.setattr(pgot.devices, "processes", lambda device: other)
    monkeypatch.setattr(preflight, "gather_object", lambda obj: [["main's line"], *obj])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")

    class Ended(Exception):
        """The launcher ended this process (once the first process of the machine had printed and exited)."""

    def ended(main_thread):
        raise Ended

    monkeypatch.setattr(cli, "_leave_after_the_first", ended)
    args = [*_stage_args(cli.train_main, tmp_path), f"train.output_dir={folder}", "train.max_steps=-1", "--check"]
    with pytest.raises(Ended):
        cli.train_main(args)
    assert capsys.readouterr().err == ""  # the first process of this machine says it
    assert other.ended and not (tmp_path / "new").exists()


def test_two_checks_of_one_new_folder_at_once_do_not_see_each_other(tmp_path, monkeypatch):
    """Rule: the trial creation shares the missing folders with other processes doing the same (two runs into
    runs/sweep/a and runs/sweep/b, the processes of a launch): a folder another process created first is neither
    an error nor removed by this check; a parent that another check removed again is created again."""
    real_mkdir = Path.mkdir
    sweep = tmp_path / "runs" / "sweep"

    def other_creates_first(self, *args, **kwargs):
        if self == sweep and not self.exists():
            real_mkdir(self)  # the other process, just before this one
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", other_creates_first)
    assert preflight.output_folder(str(sweep / "a"), "train.output_dir", "train") == []
    assert sweep.is_dir() and not (sweep / "a").exists()  # the other's folder stays; this check's is gone

    removed = []

    def other_removes_once(self, *args, **kwargs):
        if self == sweep / "b" and not removed:
            removed.append(self)
            os.rmdir(self.parent)  # the other check, cleaning up what it created
        return real_mkdir(self, *args, **kwargs)

    os.rmdir(sweep)
    monkeypatch.setattr(Path, "mkdir", other_removes_once)
    assert preflight.output_folder(str(sweep / "b"), "train.output_dir", "train") == []
    assert removed and not sweep.exists() and (tmp_path / "runs").is_dir()  # runs/ was there before this check


def test_check_refuses_a_resume_with_another_number_of_processes(tmp_path, capsys):
    """brk-launch defect: the run refuses a checkpoint written by another number of processes
    (pgot.checkpoints.load), but --check (pgot.run_folder.folder_problems via the preflight) passes it, so --check
    passes a config the run refuses."""
    out = tmp_path / "run"
    overrides = [f"train.output_dir={out}", f"train.store={tmp_path / 'store'}", "train.precompute_if_missing=true"]
    ckpt = out / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    save_config(load_config(DEBUG, overrides), out / "config.yaml")
    write_state(ckpt, TrainerState(step=1, num_processes=2))  # written by a 2-process launch
    code = cli.train_main(["--check", "--config", DEBUG, *overrides])  # this one: 1 process
    err = capsys.readouterr().err
    assert code == 2, err
    assert "2 process" in err
