"""pgot-precompute end to end on the tiny model (CPU): fronts, stats, resume, two processes (one slowed), kill
and resume, a failed precompute that leaves nothing behind, one precompute per store, SIGINT / SIGTERM (after the
batch in flight, on every process alike; a second signal; one during the merge).

Batches are a fixed tiling of the (prompt, sample) grid, so a store is bit-identical whatever the process count
or resume point, also with a batch size that does not divide ``samples_per_prompt``: stores are compared
exactly. Different batch sizes agree to float rounding only (checked with a tolerance).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
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

from pgot import cli
from pgot import frontier as fr
from pgot.config import load_config
from pgot.files import FolderLock

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ROOT / "tests" / "hooks"  # sitecustomize.py: a slowed rank, for subprocesses
DEBUG_CONFIG = ROOT / "tests" / "configs" / "tiny_precompute.yaml"  # tiny SD3, analytic rewards
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

    torch.set_num_threads(1)  # as every subprocess (OMP_NUM_THREADS=1): kernels' sums depend on the thread count
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


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(
        os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    env["PYTHONPATH"] = os.pathsep.join([str(HOOKS), str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


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

    assert fr.compare_settings(f.meta, cfg, store=reference, fingerprint=load_model(cfg.model).fingerprint) == []
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
    before = hashes(store)
    run(store)  # complete: nothing generated, nothing written
    assert calls == []
    assert hashes(store) == before
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


def _launch(store: Path, **env: str) -> subprocess.CompletedProcess:
    """pgot-precompute of the debug config into ``store`` on 2 CPU processes (accelerate launch, gloo), run from
    the store's parent folder, with the test hooks' ``env``."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "pgot", "precompute", "--config", str(DEBUG_CONFIG), *BASE, f"precompute.store={store}",
    ]  # fmt: skip
    return subprocess.run(cmd, env=subprocess_env(**env), cwd=store.parent, capture_output=True, text=True, timeout=240)


def test_two_processes_give_the_same_store(reference, tmp_path):
    """2 CPU processes, rank 1 slowed by 1 s before each shard it writes: the merge waits for every shard."""
    store = tmp_path / "store"
    out = _launch(store, PGOT_TEST_SLOW_RANK="1", PGOT_TEST_SLOW_S="1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "terminate called" not in out.stderr
    # the store carries no trace of the layout: identical to the single-process one
    pd.testing.assert_frame_equal(
        pd.read_parquet(reference / fr.SAMPLES_FILE), pd.read_parquet(store / fr.SAMPLES_FILE)
    )
    assert meta_without_times(reference) == meta_without_times(store)


def _slow_child(store: Path, *extra: str) -> None:  # pragma: no cover - runs in the forked child
    """Precompute with a sleep per batch, so that the parent can kill it between two shards.

    tqdm's write lock is a multiprocessing lock shared with the parent across fork: a child SIGKILLed while drawing its
    bar would keep it held and the parent's next bar would wait forever. The child draws with a lock of its own."""
    import threading

    import tqdm.auto
    import tqdm.std

    from pgot import precompute

    own = threading.RLock()
    for bar in (tqdm.std.tqdm, tqdm.auto.tqdm):  # each class keeps the lock it first made
        bar.set_lock(own)

    real = precompute.generate

    def slow(*args, **kwargs):
        time.sleep(0.4)
        return real(*args, **kwargs)

    precompute.generate = slow
    try:
        run(store, *extra)
    finally:
        os._exit(0)


def _kill_after_shards(store: Path, shards: int, *extra: str) -> None:
    """Run a precompute in a forked child and SIGKILL it once ``shards`` shards are written."""
    # a forked child inherits the imported modules: no 10-40 s of imports for a fresh interpreter
    child = multiprocessing.get_context("fork").Process(target=_slow_child, args=(store, *extra))
    child.start()
    folder = store / fr.SHARDS_DIR
    deadline = time.monotonic() + 120
    try:
        while not (folder.is_dir() and len(list(folder.glob("shard-*.parquet"))) >= shards):
            assert child.is_alive(), "precompute exited before writing enough shards"
            assert time.monotonic() < deadline, "no shard after 120 s"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.join()
    assert child.exitcode == -signal.SIGKILL


def test_kill_and_resume_gives_the_same_store(reference, tmp_path):
    store = tmp_path / "store"
    _kill_after_shards(store, 1)
    n_shards = len(list((store / fr.SHARDS_DIR).glob("shard-*.parquet")))
    assert 1 <= n_shards < P and not (store / fr.SAMPLES_FILE).exists(), "killed mid-run: some shards, no merged file"
    with pytest.raises(fr.StoreNotFoundError, match="interrupted"):
        fr.load_store(store)
    assert len(fr.completed_prompts(store, N)) == n_shards  # batch 4 = N: one prompt per shard
    run(store)  # resume
    assert_same_store(reference, store)


@pytest.fixture(scope="module")
def reference3(tmp_path_factory) -> Path:
    """An uninterrupted store with batches of 3 (not dividing N=4: batches straddle prompts)."""
    store = tmp_path_factory.mktemp("ref3") / "store"
    run(store, "precompute.batch_size=3")
    return store


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_resume_is_bit_exact_with_a_batch_that_does_not_divide_n(reference3, tmp_path, shards):
    """P=3 x N=4 in batches of 3 (4 batches, each straddling prompts), SIGKILLed after 1, 2 or 3 shards and
    resumed: samples.parquet and meta.json's statistics are those of the uninterrupted run, bit for bit."""
    store = tmp_path / "store"
    _kill_after_shards(store, shards, "precompute.batch_size=3")
    assert not (store / fr.SAMPLES_FILE).exists()
    run(store, "precompute.batch_size=3")
    pd.testing.assert_frame_equal(
        pd.read_parquet(reference3 / fr.SAMPLES_FILE), pd.read_parquet(store / fr.SAMPLES_FILE), check_exact=True
    )
    assert meta_without_times(store) == meta_without_times(reference3)  # stats, counts, front sizes: exact


def test_a_failed_precompute_leaves_nothing_to_refuse(reference, tmp_path, capsys):
    """A reward checkpoint that does not exist: one error line naming rewards.1.path, and no meta.json; the rerun
    with the fix builds the store (settings are committed with the first shard). A store left with settings but no
    sample (an older pgot) is started afresh, whatever its settings."""
    store = tmp_path / "store"
    args = ["--config", str(DEBUG_CONFIG), *BASE, f"precompute.store={store}"]
    assert cli.precompute_main([*args, "rewards.1.name=clip", "rewards.1.path=/nonexistent/clip"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rewards.1.path=...) to an HF CLIPModel folder" in err[0] and "<i>" not in err[0]
    assert not (store / fr.META_FILE).exists()
    assert cli.precompute_main(args) == 0
    assert_same_store(reference, store)

    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    (poisoned / fr.META_FILE).write_text(json.dumps({**fr.read_meta(reference), "num_samples": 0, "stats": None,
                                                     "precompute": {"samples_per_prompt": 9, "seed": 5}}))  # fmt: skip
    with pytest.raises(fr.StoreNotFoundError, match="holds no samples: a precompute stopped there before finishing"):
        fr.load_store(poisoned)
    run(poisoned)
    assert_same_store(reference, poisoned)


def test_one_precompute_per_store(reference, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    before = hashes(store)
    with FolderLock(store, key="precompute.store", what="pgot-precompute"):
        assert cli.precompute_main(["--config", str(DEBUG_CONFIG), *BASE, f"precompute.store={store}"]) == 2
        holding = hashes(store)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"precompute.store={store} is in use by another process (pid {os.getpid()}" in err[0]

    def data(h: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in h.items() if not k.startswith(".pgot.lock")}  # the test's own lock record

    assert data(holding) == data(before)  # the refused precompute wrote nothing


def test_a_store_left_mid_prompt_serves_fewer_prompts_and_is_finished_later(reference3, tmp_path):
    """Killed after 2 batches of 3 (prompt 0 done, prompt 1 half done), rerun with prompts.limit=1: the store holds
    prompt 0 and keeps prompt 1's samples in a shard; a rerun with all 3 prompts finishes it, bit-exact."""
    store = tmp_path / "store"
    _kill_after_shards(store, 2, "precompute.batch_size=3")
    run(store, "precompute.batch_size=3", "prompts.limit=1")
    assert fr.load_store(store).prompt_ids == [0] and fr.has_shards(store)
    before = hashes(store)
    run(store, "precompute.batch_size=3", "prompts.limit=1")  # nothing new: nothing written
    assert hashes(store) == before
    run(store, "precompute.batch_size=3")
    pd.testing.assert_frame_equal(
        pd.read_parquet(reference3 / fr.SAMPLES_FILE), pd.read_parquet(store / fr.SAMPLES_FILE), check_exact=True
    )
    assert meta_without_times(store) == meta_without_times(reference3) and not fr.has_shards(store)


# --------------------------------------------------------------------------------------------
# Stopping with SIGINT / SIGTERM: after the batch in flight, on every process alike
# --------------------------------------------------------------------------------------------


def _signal_during(monkeypatch, signals: dict[int, str]) -> None:
    """This process sends itself ``signals[k]`` when it starts generating its k-th batch (1-based), as the
    ``PGOT_TEST_PRECOMPUTE_SIGNAL`` hook does in subprocesses."""
    from pgot import precompute

    real, calls = precompute.generate, [0]

    def signalling(*args, **kwargs):
        calls[0] += 1
        if calls[0] in signals:
            os.kill(os.getpid(), getattr(signal, signals[calls[0]]))
        return real(*args, **kwargs)

    monkeypatch.setattr(precompute, "generate", signalling)


def _shards(store: Path) -> list[Path]:
    return sorted((store / fr.SHARDS_DIR).glob("shard-*.parquet"))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_batch_in_flight_and_the_rerun_continues(
    reference, tmp_path, monkeypatch, capsys, sig
):
    """SIGINT (Ctrl-C) or SIGTERM during batch 2 of 3: the batch is finished and its shard written, nothing is
    merged, the command says what a rerun does and exits 130 / 143; the rerun (no batch sampled again) gives the
    store of an uninterrupted run, bit for bit."""
    store = tmp_path / "store"
    args = ["--config", str(DEBUG_CONFIG), *BASE, f"precompute.store={store}"]
    _signal_during(monkeypatch, {2: sig})
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert cli.precompute_main(args) == 128 + getattr(signal, sig)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    err = capsys.readouterr().err
    line = (
        f"stopped by {sig} after 2 of 3 batches; the store {store} keeps every finished batch. Run the same command "
        "to continue (prompts already sampled are not sampled again)."
    )
    assert line in err.splitlines(), err[-3000:]
    assert "Traceback" not in err
    assert len(_shards(store)) == 2 and not (store / fr.SAMPLES_FILE).exists()  # the merge is not run on a stop
    assert fr.read_meta(store)["completed"] is None

    from pgot import precompute

    calls = []
    real = precompute.generate  # the signalling wrapper: it signals no more (its batch 2 is past)
    monkeypatch.setattr(precompute, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cli.precompute_main(args) == 0
    assert len(calls) == 1  # only batch 3 is sampled
    assert_same_store(reference, store)


def test_a_second_signal_after_repeat_s_stops_at_once(reference, tmp_path, monkeypatch, capsys):
    """SIGTERM, then SIGINT after StopSignals.repeat_s (0 here), both during batch 2: the second stops at once,
    before batch 2's shard; exit 130 and a line saying what the store keeps; the rerun completes it bit-exact."""
    from pgot import precompute
    from pgot.checkpoints import StopSignals

    store = tmp_path / "store"
    args = ["--config", str(DEBUG_CONFIG), *BASE, f"precompute.store={store}"]
    real, calls = precompute.generate, [0]

    def twice(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # remembered
            os.kill(os.getpid(), signal.SIGINT)  # after repeat_s: stops at once
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(StopSignals, "repeat_s", 0.0)
        m.setattr(precompute, "generate", twice)
        assert cli.precompute_main(args) == 130
    err = capsys.readouterr().err
    assert (
        f"interrupted by SIGINT; the store {store} keeps every batch finished before. Run the same command to "
        "continue (prompts already sampled are not sampled again)." in err.splitlines()
    ), err[-3000:]
    assert "Traceback" not in err and len(_shards(store)) == 1  # batch 2 was not finished: no shard
    assert cli.precompute_main(args) == 0
    assert_same_store(reference, store)


def test_a_signal_during_the_merge_lets_it_finish(reference, tmp_path, monkeypatch, caplog):
    """After the last round's agreement there is nothing left to stop: a signal during the merge is remembered,
    the merge finishes and the store is complete (exit 0), with a warning."""
    store = tmp_path / "store"
    real = fr.merge_shards

    def signalling(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(fr, "merge_shards", signalling)
    with caplog.at_level("WARNING", logger="pgot.precompute"):
        assert cli.precompute_main(["--config", str(DEBUG_CONFIG), *BASE, f"precompute.store={store}"]) == 0
    assert f"SIGTERM came after the last batch; the store {store} is complete" in caplog.text
    assert_same_store(reference, store)


def test_two_processes_stop_together_when_one_gets_the_signal(reference, tmp_path):
    """2 CPU processes; SIGTERM to rank 1 only, during its first batch, with rank 1 slowed by 1 s per shard write
    (rank 0 waits in the round's agreement): both finish round 1 (batches 1 and 2 of 3) and stop with the same
    line and exit code 143, no gloo error, no SIGKILL from the launcher (whose own report of the failed processes is
    its ChildFailedError traceback); the rerun gives the uninterrupted store."""
    store = tmp_path / "store"
    out = _launch(store, PGOT_TEST_SLOW_RANK="1", PGOT_TEST_SLOW_S="1", PGOT_TEST_PRECOMPUTE_SIGNAL="1:SIGTERM:1")
    assert out.returncode != 0
    line = (
        f"stopped by SIGTERM after 2 of 3 batches; the store {store} keeps every finished batch. Run the same "
        "command to continue (prompts already sampled are not sampled again)."
    )
    # both stopped alike; the line is printed once, by the machine's first process (pgot.devices.every_process)
    assert out.stderr.count(line) == 1, out.stderr[-3000:]
    # the launcher's report: a rank that exited 1 had a traceback; 143 is the stop, and the launcher's own SIGTERM
    # to the other rank, once one has exited, may catch that rank after its message, on its way out (-15)
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", out.stderr)
    assert codes and set(codes) <= {"143", "-15"} and "143" in codes, out.stderr[-3000:]
    for bad in ("RuntimeError", "gloo", "Connection closed", "SIGKILL", "terminate called"):  # no worker traceback
        assert bad not in out.stderr, out.stderr[-3000:]
    assert [p.name[:11] for p in _shards(store)] == ["shard-00000", "shard-00001"]  # each rank's round-1 batch
    assert not (store / fr.SAMPLES_FILE).exists()
    run(store)  # the rerun (one process here): batch 3 only
    assert_same_store(reference, store)
