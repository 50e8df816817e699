"""pgot/hub.py offline: pgot-fetch and hub ids as paths, against a hub cache built here from tiny checkpoints.

The cache has the layout huggingface_hub reads (``models--org--name/{blobs, refs/main, snapshots/<commit>/...}``,
snapshot entries symlinked to blobs) and holds tiny checkpoints in the released formats under the real
repo ids (tiny SD3 from ``save_tiny``; rewards written as tests/test_rewards_clip.py and
tests/test_rewards_imagereward.py write them). Everything runs with ``HF_HUB_OFFLINE=1``: the loaders
see the same bytes through ``pgot-fetch``'s folders, through hub ids, and from the source folders.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from test_rewards_clip import _legacy_bin
from test_rewards_imagereward import _write_released_format

from pgot import hub
from pgot.config import ModelConfig, RewardConfig, load_config
from pgot.model import load_model
from pgot.rewards import REWARDS, build, score
from pgot.rewards.base import LinearMLP
from pgot.rewards.clip import tiny_clip_model
from pgot.tiny import save_tiny

SD3 = "stabilityai/stable-diffusion-3.5-large-turbo"
PROMPTS = ["a photo of a cat", "a red house at night"]
HUB_REWARDS = ["clip", "ict", "hp"]  # named by hub id in the config; imagereward and aesthetic by a missing local path


def _cache_repo(cache: Path, repo: str, files: dict[str, Path | bytes]) -> Path:
    """Put ``files`` (repo path -> file or bytes) into ``cache`` as huggingface_hub stores a downloaded repo."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    for rel, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        entry = storage / "snapshots" / commit / rel
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.symlink_to(os.path.relpath(blob, entry.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return storage / "snapshots" / commit


def _tree(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny checkpoints in their released layouts (``src``), the same files in a hub cache, and a config naming them."""
    root = tmp_path_factory.mktemp("hub")
    src, cache = root / "src", root / "cache"
    save_tiny(load_model(ModelConfig(tiny=True, device="cpu", resolution=32, use_t5=False)), src / "sd3")
    tiny_clip_model(1, act="quick_gelu").save_pretrained(src / "clip")  # config.json + model.safetensors
    ict = tiny_clip_model(2)
    (src / "ict").mkdir()
    torch.save(_legacy_bin(ict), src / "ict" / "pytorch_model.bin")
    ict.config.to_json_file(src / "ict" / "config.json")
    hp = tiny_clip_model(3)
    (src / "hp" / "hp_backbone").mkdir(parents=True)
    torch.save(_legacy_bin(hp), src / "hp" / "hp_backbone" / "pytorch_model.bin")
    hp.config.to_json_file(src / "hp" / "hp_backbone" / "config.json")
    (src / "hp" / "hp_scorer").mkdir()
    torch.manual_seed(4)
    torch.save(LinearMLP(16).state_dict(), src / "hp" / "hp_scorer" / "mlp_pytorch_model.bin")
    _write_released_format(
        REWARDS["imagereward"](RewardConfig(name="imagereward", path="tiny", tiny_seed=5), "cpu", None),
        src / "ImageReward",
    )
    (src / "aesthetic").mkdir()
    torch.save(LinearMLP(16).state_dict(), src / "aesthetic" / "aesthetic-model.pth")
    (src / "aesthetic" / "clip").symlink_to(src / "clip")

    _cache_repo(cache, SD3, _tree(src / "sd3"))
    _cache_repo(cache, "openai/clip-vit-large-patch14", {**_tree(src / "clip"), "flax_model.msgpack": b"not pgot's"})
    _cache_repo(cache, "8y/ICT", _tree(src / "ict"))
    _cache_repo(cache, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", {"config.json": src / "ict" / "config.json"})
    _cache_repo(cache, "8y/HP", _tree(src / "hp"))
    ir = src / "ImageReward"
    _cache_repo(
        cache, "THUDM/ImageReward", {"ImageReward.pt": ir / "ImageReward.pt", "med_config.json": ir / "med_config.json"}
    )
    _cache_repo(cache, "google-bert/bert-base-uncased", {"vocab.txt": ir / "vocab.txt"})
    _cache_repo(
        cache, "trl-lib/ddpo-aesthetic-predictor", {"aesthetic-model.pth": src / "aesthetic" / "aesthetic-model.pth"}
    )

    config = {
        "model": {"path": SD3, "use_t5": False, "device": "cpu", "dtype": "float32", "resolution": 32},
        "rewards": [
            {"name": "clip", "path": "openai/clip-vit-large-patch14"},
            {"name": "ict", "path": "8y/ICT"},
            {"name": "hp", "path": "8y/HP"},
            {"name": "imagereward", "path": "/nonexistent/ImageReward"},
            {"name": "aesthetic", "path": "/nonexistent/aesthetic"},
            {"name": "pickscore", "path": "tiny"},
            {"name": "colorfulness"},
        ],
        "prompts": {"path": "builtin:demo", "limit": 2},
    }
    (root / "hub.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return {"root": root, "src": src, "cache": cache, "config": root / "hub.yaml"}


@pytest.fixture(autouse=True)
def offline_cache(world, monkeypatch):
    """huggingface_hub reads its settings at import, so the constants are patched along with the environment."""
    monkeypatch.setenv("HF_HOME", str(world["root"] / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(world["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(world["cache"]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))


def _source_rewards(src: Path) -> list[RewardConfig]:
    """The five learned rewards read straight from their source folders: the reference scores."""
    return [
        RewardConfig(name="clip", path=str(src / "clip")),
        RewardConfig(name="ict", path=str(src / "ict")),
        RewardConfig(name="hp", path=str(src / "hp")),
        RewardConfig(name="imagereward", path=str(src / "ImageReward")),
        RewardConfig(name="aesthetic", path=str(src / "aesthetic")),
    ]


@pytest.fixture(scope="module")
def fetched(world, tmp_path_factory):
    """pgot-fetch run twice into one dest; the outputs and the files before the second run."""
    dest = tmp_path_factory.mktemp("dest") / "weights"
    out = dest.parent / "local.yaml"
    argv = ["--config", str(world["config"]), "--dest", str(dest), "--out-config", str(out)]
    runs = []
    with pytest.MonkeyPatch.context() as mp:  # the autouse fixture is function-scoped
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(world["cache"]))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        for _ in range(2):
            out.unlink(missing_ok=True)
            before = (
                {rel: (p.stat().st_ino, p.stat().st_mtime_ns) for rel, p in _tree(dest).items()}
                if dest.exists()
                else {}
            )
            runs.append(_run(argv) + (before,))
    return {"dest": dest, "out": out, "runs": runs}


def _run(argv: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = hub.main(argv)
    return rc, stdout.getvalue(), stderr.getvalue()


# ---------------------------------------------------------------------------------------------
# (a) pgot-fetch: layout, report, rerun, written config
# ---------------------------------------------------------------------------------------------


def test_fetch_places_every_checkpoint_in_pgot_layout(world, fetched):
    rc, stdout, stderr = fetched["runs"][0][:3]
    assert rc == 0, stderr
    dest, src = fetched["dest"], world["src"]
    expected = {
        "stable-diffusion-3.5-large-turbo": _tree(src / "sd3"),
        "clip-vit-large-patch14": _tree(src / "clip"),
        "ICT": _tree(src / "ict"),  # pytorch_model.bin from 8y/ICT, config.json from laion
        "HP": _tree(src / "hp"),
        "ImageReward": _tree(src / "ImageReward"),  # vocab.txt from google-bert/bert-base-uncased
        "aesthetic": {"aesthetic-model.pth": src / "aesthetic" / "aesthetic-model.pth"}
        | {f"clip/{k}": v for k, v in _tree(src / "clip").items()},
    }
    for folder, files in expected.items():
        got = _tree(dest / folder)
        assert sorted(got) == sorted(files), folder  # only the files pgot reads (no flax_model.msgpack)
        for rel, path in files.items():
            assert got[rel].read_bytes() == path.read_bytes(), (folder, rel)
            assert not got[rel].is_symlink() and got[rel].stat().st_nlink >= 2, (folder, rel)  # hard-linked blob
    assert sorted(p.name for p in dest.iterdir()) == sorted([*expected, ".pgot-fetch"])
    # Licences come first, gated ones named with their page; then one line per item, by config key.
    assert stdout.index("Stability AI Community License") < stdout.index("model.path:")
    assert f"https://huggingface.co/{SD3}" in stdout
    for key in ("model.path", *(f"rewards.{i}.path" for i in range(5))):
        assert f"{key}: fetched" in stdout, key
    assert "rewards.5" not in stdout and "rewards.6" not in stdout  # tiny and analytic: nothing to fetch


def test_rerun_reports_present_and_touches_nothing(fetched):
    rc, stdout, stderr, before = fetched["runs"][1]
    assert rc == 0, stderr
    for key in ("model.path", *(f"rewards.{i}.path" for i in range(5))):
        assert f"{key}: present" in stdout, key
    assert "fetched" not in stdout
    after = {rel: (p.stat().st_ino, p.stat().st_mtime_ns) for rel, p in _tree(fetched["dest"]).items()}
    assert after == before


def test_written_config_names_the_local_folders(world, fetched):
    cfg = load_config(fetched["out"])
    dest = fetched["dest"]
    assert cfg.model.path == str(dest / "stable-diffusion-3.5-large-turbo")
    assert [r.path for r in cfg.rewards] == [
        str(dest / "clip-vit-large-patch14"),
        str(dest / "ICT"),
        str(dest / "HP"),
        str(dest / "ImageReward"),
        str(dest / "aesthetic"),
        "tiny",
        "",
    ]
    original = load_config(world["config"])
    assert (cfg.model.resolution, cfg.model.use_t5, cfg.prompts.path) == (32, False, original.prompts.path)


def test_dry_run_lists_sources_sizes_and_downloads_nothing(world, tmp_path):
    dest = tmp_path / "weights"
    rc, stdout, stderr = _run(["--config", str(world["config"]), "--dest", str(dest), "--dry-run"])
    assert rc == 0, stderr
    assert not dest.exists()
    assert (
        "model.path: " + SD3 in stdout and "[in the hub cache, ~18.1 GB]" in stdout
    )  # from the table: no listing cached
    assert "google-bert/bert-base-uncased: vocab.txt" in stdout
    assert "trl-lib/ddpo-aesthetic-predictor: aesthetic-model.pth" in stdout
    assert "openai/clip-vit-large-patch14: config.json, model.safetensors into clip/" in stdout
    assert "xswu" not in stdout and "dry run: nothing downloaded" in stdout


def test_cli_reads_hf_hub_cache_from_the_environment(world, tmp_path):
    root = str(Path(hub.__file__).parents[1])
    env = {**os.environ, "HF_HUB_CACHE": str(world["cache"]), "HF_HUB_OFFLINE": "1", "PYTHONPATH": root}
    argv = [sys.executable, "-m", "pgot.hub", "--config", str(world["config"]), "--dest", str(tmp_path), "--dry-run"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("[in the hub cache") == 6, proc.stdout
    assert str(world["cache"]) in proc.stdout


# ---------------------------------------------------------------------------------------------
# (b) the checkpoints load, from the fetched folders and from hub ids
# ---------------------------------------------------------------------------------------------


def test_model_loads_from_fetched_folder_and_hub_id(world, fetched):
    reference = load_model(ModelConfig(path=str(world["src"] / "sd3"), device="cpu", use_t5=False, resolution=32))
    from_dest = load_model(load_config(fetched["out"]).model)
    from_hub = load_model(ModelConfig(path=SD3, device="cpu", use_t5=False, resolution=32))
    assert from_hub.path.startswith(str(world["cache"]))
    for model in (from_dest, from_hub):
        assert model.fingerprint == reference.fingerprint  # same files, same fingerprint: stores match either way
        for (name, p), q in zip(model.transformer.named_parameters(), reference.transformer.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_rewards_load_from_fetched_folders_and_hub_ids(world, fetched):
    images = _images()
    reference = score(build(_source_rewards(world["src"])), images, PROMPTS)
    from_dest = score(build(load_config(fetched["out"]).rewards[:5]), images, PROMPTS)
    torch.testing.assert_close(from_dest, reference, rtol=0, atol=0)
    by_id = load_config(world["config"]).rewards[: len(HUB_REWARDS)]
    assert [r.name for r in by_id] == HUB_REWARDS
    torch.testing.assert_close(score(build(by_id), images, PROMPTS), reference[:, :3], rtol=0, atol=0)


def test_hub_ids_resolve_to_cached_snapshots_and_files(world):
    folder = hub.resolve("8y/HP", key="rewards.2.path", kind="hp")
    assert folder.parent.parent == world["cache"] / "models--8y--HP"
    assert (folder / "hp_scorer" / "mlp_pytorch_model.bin").is_file()
    file = hub.resolve("8y/ICT/pytorch_model.bin", key="rewards.1.path")
    assert file.read_bytes() == (world["src"] / "ict" / "pytorch_model.bin").read_bytes()
    local = world["src"] / "clip"
    assert hub.resolve(str(local), key="rewards.0.path") == local


# ---------------------------------------------------------------------------------------------
# (c) what is missing offline: one clear error naming the key and what to run
# ---------------------------------------------------------------------------------------------


def test_missing_repo_offline_fetch_names_key_and_fix(world, tmp_path):
    rc, stdout, stderr = _run(
        [
            "--config",
            str(world["config"]),
            "--dest",
            str(tmp_path / "w"),
            "--only",
            "rewards",
            "rewards.2.path=nobody/missing-hp",
        ]
    )
    assert rc == 2
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert lines == [
        "error: rewards.2.path='nobody/missing-hp': nobody/missing-hp is not in the local hub cache and HF_HUB_OFFLINE "
        "is set. Unset HF_HUB_OFFLINE and rerun (downloads resume)."
    ]
    assert "rewards.0.path: fetched" in stdout  # the other items were fetched all the same
    assert not (tmp_path / "w" / "hub.yaml").exists()  # no config while an item is missing


def test_unknown_model_folder_is_a_plan_error(world, tmp_path):
    argv = ["--config", str(world["config"]), "--dest", str(tmp_path), "model.path=/nonexistent/my-sd3"]
    rc, _, stderr = _run(argv)
    assert rc == 2
    assert stderr.strip().splitlines() == [
        "error: model.path='/nonexistent/my-sd3' does not exist, and pgot-fetch cannot tell which model it names. "
        "Set model.path to a hub id (e.g. model.path=stabilityai/stable-diffusion-3.5-large-turbo) or to an "
        "existing folder."
    ]
    assert not any(tmp_path.iterdir())


def test_missing_hub_ids_at_load_time_name_key_and_pgot_fetch(world):
    with pytest.raises(ValueError) as info:
        load_model(ModelConfig(path="stabilityai/stable-diffusion-3.5-medium", device="cpu"))
    msg = str(info.value)
    assert msg.startswith(
        "model.path='stabilityai/stable-diffusion-3.5-medium' does not exist locally, and the hub repo "
        f"'stabilityai/stable-diffusion-3.5-medium' is not in the local hub cache ({world['cache']})."
    )
    assert "`pgot-fetch --config <your config>`" in msg and "\n" not in msg
    with pytest.raises(
        ValueError,
        match=r"^reward 'hps': checkpoint path 'xswu/HPSv2' .*not in the local hub cache.*pgot-fetch --config",
    ):
        build([RewardConfig(name="hps", path="xswu/HPSv2")])
    with pytest.raises(
        ValueError, match=r"rewards.1.path='8y/ICT/nope.bin' .* with 'nope.bin' is not in the local hub cache"
    ):
        hub.resolve("8y/ICT/nope.bin", key="rewards.1.path")


def test_checkpoint_from_several_repos_by_hub_id_says_run_pgot_fetch(world):
    with pytest.raises(
        ValueError,
        match=r"^reward 'imagereward': checkpoint path 'THUDM/ImageReward' names the hub repo 'THUDM/ImageReward', but "
        r"this checkpoint also needs files from other repos \(google-bert/bert-base-uncased: vocab.txt\). "
        r"Run `pgot-fetch --config <your config>`",
    ):
        build([RewardConfig(name="imagereward", path="THUDM/ImageReward")])


def test_partly_cached_repo_is_reported(world, tmp_path):
    cache = tmp_path / "cache"
    _cache_repo(cache, "8y/HP", {"hp_backbone/pytorch_model.bin": b"x"})  # an interrupted download
    with pytest.raises(ValueError) as info:
        hub.resolve("8y/HP", key="rewards.2.path", kind="hp", cache_dir=cache)
    assert str(info.value).startswith(
        "rewards.2.path='8y/HP' does not exist locally, and the hub repo '8y/HP' is only partly in the local hub "
        f"cache ({cache}): no hp_scorer/mlp_pytorch_model.bin."
    )


def test_downloads_ask_only_for_pgots_files_and_explain_hub_failures(world, tmp_path, monkeypatch):
    """Online failures, simulated at ``snapshot_download``: a gated repo names its licence page; a dropped
    connection is not the user's error (exit 1) and a rerun resumes; every call asks only for pgot's files."""
    import httpx2
    from huggingface_hub.errors import GatedRepoError

    real, calls = huggingface_hub.snapshot_download, []

    def snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw.get("allow_patterns")))
        if repo_id == SD3:
            response = httpx2.Response(403, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{SD3}"))
            raise GatedRepoError("403 Client Error. Cannot access gated repo.", response=response)
        if repo_id == "8y/HP":
            raise httpx2.ConnectError("connection reset")
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    rc, _, stderr = _run(["--config", str(world["config"]), "--dest", str(tmp_path / "w"), "model.use_t5=true"])
    assert rc == 1  # the dropped connection is not the user's to fix
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors[0] == (
        f"error: model.path='{SD3}': {SD3} is gated: accept the licence (Stability AI Community License (free below "
        f"USD 1M annual revenue)) at https://huggingface.co/{SD3} with your account, log in with `hf auth login` "
        "(or set HF_TOKEN), then rerun."
    )
    assert errors[1].startswith(
        "error: rewards.2.path='8y/HP': 8y/HP: download failed (ConnectError: connection reset)"
    )
    assert errors[1].endswith("Rerun to resume.") and len(errors) == 2
    requested = dict(calls)
    assert requested[SD3] == list(hub.SOURCES["model"][SD3].parts[0].files)  # the first part failed: T5 not asked
    assert requested["openai/clip-vit-large-patch14"] == ["config.json", "model.safetensors"]
    assert requested["google-bert/bert-base-uncased"] == ["vocab.txt"]
    assert all(patterns for _, patterns in calls)  # never a whole repo
