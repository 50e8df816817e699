"""pgot-precompute end to end on the tiny model (CPU): fronts, stats, resume, two processes, kill and resume.

The stores of these tests are built with ``precompute.batch_size`` dividing ``samples_per_prompt``, so every
batch holds the same images whatever the process count or resume point, and the scores are compared
exactly. Different batch layouts agree to float rounding only (checked with a tolerance).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pgot import frontier as fr
from pgot.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = ROOT / "configs" / "precompute_debug.yaml"
P, N = 3, 4
BASE = [f"prompts.limit={P}", f"precompute.samples_per_prompt={N}", "precompute.batch_size=4"]
TIMESTAMPS = ("created", "completed")


def brute_force_front(scores: torch.Tensor) -> torch.Tensor:
    """(N, M) -> (N,) bool: no NaN and no NaN-free other row is >= everywhere and > somewhere."""
    ok = ~scores.isnan().any(dim=1)
    out = torch.zeros(scores.shape[0], dtype=torch.bool)
    for i in range(scores.shape[0]):
        if ok[i]:
            out[i] = not any(
                bool(ok[j] and (scores[j] >= scores[i]).all() and (scores[j] > scores[i]).any())
                for j in range(scores.shape[0])
                if j != i
            )
    return out


def config(store: Path, *extra: str):
    return load_config(DEBUG_CONFIG, [*BASE, f"precompute.store={store}", *extra])


def run(store: Path, *extra: str) -> Path:
    from pgot import precompute

    return precompute.run(config(store, *extra))


def meta_without_times(store: Path) -> dict:
    meta = json.loads((store / fr.META_FILE).read_text())
    return {k: v for k, v in meta.items() if k not in TIMESTAMPS}


def assert_same_store(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(
        pd.read_parquet(a / fr.SAMPLES_FILE), pd.read_parquet(b / fr.SAMPLES_FILE), check_exact=True
    )
    assert meta_without_times(a) == meta_without_times(b)
    assert not (b / fr.SHARDS_DIR).exists()


def subprocess_env() -> dict[str, str]:
    env = dict(
        os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted single-process store (with images)."""
    store = tmp_path_factory.mktemp("ref") / "store"
    assert run(store, "precompute.save_images=true") == store
    return store


def test_end_to_end_fronts_stats_and_meta(reference):
    f = fr.load_store(reference)
    cfg = config(reference)
    df = pd.read_parquet(reference / fr.SAMPLES_FILE)
    assert len(df) == P * N and f.prompt_ids == list(range(P)) and f.reward_names == cfg.reward_names
    assert df["sample_index"].tolist() == list(range(N)) * P and (df["seed"] == 0).all()
    for pid in range(P):
        rows = df[df["prompt_id"] == pid]
        scores = torch.tensor(rows[cfg.reward_names].to_numpy())
        assert rows["on_frontier"].tolist() == brute_force_front(scores).tolist()
        front, mask = f.lookup([pid])
        torch.testing.assert_close(front[0][mask[0]], scores[brute_force_front(scores)].float())
    values = torch.tensor(df[cfg.reward_names].to_numpy(), dtype=torch.float64)
    torch.testing.assert_close(f.stats.mean.double(), values.mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(f.stats.max.double(), values.max(0).values)
    meta = f.meta
    assert meta["schema_version"] == fr.SCHEMA_VERSION and meta["num_samples"] == P * N
    assert meta["sampler"]["num_steps"] == cfg.draft.num_steps and meta["sampler"]["resolution"] == cfg.model.resolution
    assert len(meta["sampler"]["sigmas"]) == cfg.draft.num_steps + 1 and meta["precompute"] == {
        "samples_per_prompt": N,
        "seed": 0,
    }
    assert [r["name"] for r in meta["rewards"]] == cfg.reward_names and meta["created"] and meta["completed"]
    from pgot.model import load_model

    fr.check_compatible(f, cfg.reward_names, load_model(cfg.model).fingerprint)
    pngs = sorted((reference / fr.IMAGES_DIR).rglob("*.png"))
    assert len(pngs) == P * N and (reference / fr.IMAGES_DIR / "2" / "3.png").is_file()


def test_rerun_skips_done_prompts_and_extends(reference, tmp_path, monkeypatch):
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    from pgot import precompute

    calls = []
    real = precompute.generate
    monkeypatch.setattr(
        precompute, "generate", lambda m, prompts, *a, **k: calls.append(len(prompts)) or real(m, prompts, *a, **k)
    )
    run(store)  # complete: nothing generated, same store
    assert calls == []
    assert_same_store(reference, store)
    run(store, f"prompts.limit={P + 1}")  # one more prompt: only its N samples are generated
    assert sum(calls) == N
    df = pd.read_parquet(store / fr.SAMPLES_FILE)
    ref = pd.read_parquet(reference / fr.SAMPLES_FILE)
    pd.testing.assert_frame_equal(df[df["prompt_id"] < P].reset_index(drop=True), ref)
    assert (df["prompt_id"] == P).sum() == N and fr.read_meta(store)["num_prompts"] == P + 1


def test_batches_across_prompts_agree(reference, tmp_path):
    store = run(tmp_path / "store", "precompute.batch_size=3")  # batches straddle prompts
    a, b = pd.read_parquet(reference / fr.SAMPLES_FILE), pd.read_parquet(store / fr.SAMPLES_FILE)
    names = config(store).reward_names
    torch.testing.assert_close(
        torch.tensor(b[names].to_numpy()), torch.tensor(a[names].to_numpy()), rtol=1e-4, atol=1e-5
    )


def test_refuses_a_store_built_otherwise(reference, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    with pytest.raises(ValueError) as e:
        run(store, "precompute.seed=1", "draft.num_steps=2")
    msg = str(e.value)
    # one line per setting, named as typed on the command line (pgot.frontier.compare_settings)
    assert f"precompute.seed: 1 in the config, 0 in the store {store}" in msg
    assert f"draft.num_steps: 2 in the config, 4 in the store {store}" in msg
    assert "new folder" in msg and f"delete {store}" in msg
    with pytest.raises(
        ValueError, match=r"rewards: .*saturation in the config, but the store .* was computed for rewards"
    ):
        run(store, "rewards.2.name=saturation")
    (store / fr.META_FILE).unlink()
    with pytest.raises(ValueError, match="holds samples but no meta.json"):
        run(store)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\n")
    small = tmp_path / "small"
    run(small, f"prompts.path={prompts}", "precompute.samples_per_prompt=2", "precompute.batch_size=2")
    prompts.write_text("a red cube\na green ball\n")
    with pytest.raises(ValueError, match="prompt id 1 is 'a green ball' in prompts.path but 'a blue ball'"):
        run(small, f"prompts.path={prompts}", "precompute.samples_per_prompt=2", "precompute.batch_size=2")


def test_two_processes_give_the_same_store(reference, tmp_path):
    store = tmp_path / "store"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "pgot", "precompute", "--config", str(DEBUG_CONFIG), *BASE, f"precompute.store={store}",
    ]  # fmt: skip
    out = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "terminate called" not in out.stderr
    # the store carries no trace of the layout: identical to the single-process one
    pd.testing.assert_frame_equal(
        pd.read_parquet(reference / fr.SAMPLES_FILE), pd.read_parquet(store / fr.SAMPLES_FILE)
    )
    assert meta_without_times(reference) == meta_without_times(store)


def _slow_child(store: Path) -> None:  # pragma: no cover - runs in the forked child
    """Precompute with a sleep per batch, so that the parent can kill it between two shards."""
    import pgot.generate

    real = pgot.generate.generate

    def slow(*args, **kwargs):
        time.sleep(0.4)
        return real(*args, **kwargs)

    pgot.generate.generate = slow
    try:
        run(store)
    finally:
        os._exit(0)


def test_kill_and_resume_gives_the_same_store(reference, tmp_path):
    # a forked child inherits the imported modules: no 10-40 s of imports for a fresh interpreter
    store = tmp_path / "store"
    child = multiprocessing.get_context("fork").Process(target=_slow_child, args=(store,))
    child.start()
    shards = store / fr.SHARDS_DIR
    deadline = time.monotonic() + 120
    try:
        while not (shards.is_dir() and any(shards.glob("shard-*.parquet"))):
            assert child.is_alive(), "precompute exited before writing a shard"
            assert time.monotonic() < deadline, "no shard after 120 s"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.join()
    assert child.exitcode == -signal.SIGKILL
    n_shards = len(list(shards.glob("shard-*.parquet")))
    assert 1 <= n_shards < P and not (store / fr.SAMPLES_FILE).exists(), "killed mid-run: some shards, no merged file"
    with pytest.raises(fr.StoreNotFoundError, match="interrupted"):
        fr.load_store(store)
    assert len(fr.completed_prompts(store, N)) == n_shards
    run(store)  # resume
    assert_same_store(reference, store)
