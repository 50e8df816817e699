"""pgot/files.py: atomic writes leave the old file or the new one, never a partial one; a folder lock admits one
process, names its holder to the others, survives its holder's death and stops every rank of a launch alike."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pgot.files import (
    GRACE_S,
    LOCK_FILE,
    FolderLock,
    FolderLockedError,
    atomic_write,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
    folder_in_use,
    hold_folder,
    read_holder,
    remove_temporaries,
    temporary_name,
)

ROOT = Path(__file__).resolve().parents[1]


def test_writes_and_replaces(tmp_path):
    p = atomic_write_text(tmp_path / "sub" / "a.txt", "one")
    assert p.read_text() == "one"
    atomic_write_json(p, {"x": [1, 2]})
    assert json.loads(p.read_text()) == {"x": [1, 2]}
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    atomic_write_parquet(df, tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), df)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["sub", "t.parquet"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    p = atomic_write_text(tmp_path / "a.txt", "old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, fail)
    assert p.read_text() == "old" and not list(tmp_path.glob(".*.tmp"))


def test_each_write_has_a_temporary_of_its_own(tmp_path):
    """Two writers of one file (threads of a process, processes of several machines with one pid) never share a
    temporary file."""
    names = {temporary_name(tmp_path / "meta.json") for _ in range(100)}
    assert len(names) == 100
    assert all(n.name.startswith(f".meta.json.{os.getpid()}.") and n.name.endswith(".tmp") for n in names)


def test_remove_temporaries(tmp_path):
    (tmp_path / ".x.parquet.123.tmp").write_text("partial")
    (tmp_path / "keep.parquet").write_text("whole")
    assert remove_temporaries(tmp_path, tmp_path / "missing") == 1
    assert [x.name for x in tmp_path.iterdir()] == ["keep.parquet"]


# --------------------------------------------------------------------------------------------
# Folder locks
# --------------------------------------------------------------------------------------------

_HOLD = """
import sys, time
from pgot.files import FolderLock
lock = FolderLock(sys.argv[1], key="train.output_dir", what="a pgot-train run").acquire()  # held while referenced
print("held", flush=True)
time.sleep(120)
"""


def _holder(folder) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_a_held_folder_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    proc = _holder(folder)
    try:
        record = read_holder(folder)
        assert record.pid == proc.pid and record.host == socket.gethostname() and "FolderLock" in record.command
        with pytest.raises(FolderLockedError) as e:
            FolderLock(folder, key="train.output_dir", what="a pgot-train run").acquire()
        msg = str(e.value)
        assert msg.startswith(f"train.output_dir={folder} is in use by another process (pid {proc.pid} on host ")
        assert record.started in msg and "set train.output_dir to another folder" in msg
        assert read_holder(folder) == record  # the refused process changed nothing
    finally:
        proc.kill()
        proc.wait()


_LOOK = """
import sys, time
import filelock
lock = filelock.FileLock(sys.argv[1])
for _ in range(int(sys.argv[2])):
    lock.acquire()  # what folder_in_use does to look: take the lock, release it
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))  # a look stretched by a busy machine
    lock.release()
    sys.stdin.readline()
"""


def test_another_process_looking_at_the_lock_is_not_a_holder(tmp_path, monkeypatch):
    """Rule: a lock taken for less than GRACE_S (another process's preflight looking, folder_in_use) is not a
    holder: neither folder_in_use nor FolderLock.acquire(timeout=0) refuses the folder because of it. (The grace
    is raised to 30 s here, so that a loaded machine cannot stretch the 0.5-s look past it.)"""
    import pgot.files

    monkeypatch.setattr(pgot.files, "GRACE_S", 30.0)
    folder = tmp_path / "run"
    folder.mkdir()
    cmd = [sys.executable, "-c", _LOOK, str(folder / LOCK_FILE), "2", "0.5"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout.readline().strip() == "held"
        assert folder_in_use(folder, key="train.output_dir", what="a pgot-train run") is None
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "held"
        with FolderLock(folder, key="train.output_dir", what="a pgot-train run") as lock:
            assert read_holder(folder) == lock.holder
    finally:
        proc.kill()
        proc.wait()


def test_a_holder_is_reported_after_the_grace(tmp_path):
    folder = tmp_path / "run"
    proc = _holder(folder)
    try:
        start = time.monotonic()
        message = folder_in_use(folder, key="train.output_dir", what="a pgot-train run")
        assert time.monotonic() - start >= GRACE_S * 0.9
        assert message.startswith(f"train.output_dir={folder} is in use by another process (pid {proc.pid} on host ")
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_holder_is_taken_over_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "store"
    proc = _holder(folder)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_holder(folder).pid == proc.pid  # a SIGKILL leaves the record; the OS released the lock
    with caplog.at_level(logging.WARNING, logger="pgot.files"):
        with FolderLock(folder, key="precompute.store", what="pgot-precompute") as lock:
            assert read_holder(folder) == lock.holder and lock.holder.pid == os.getpid()
    assert f"precompute.store={folder}: took over the lock left by pgot-precompute (pid {proc.pid}" in caplog.text
    assert "which is gone" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # released: the record goes, the lock file stays


def test_a_file_where_the_folder_should_be(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"eval.output_dir=.*file/out cannot be used as a folder"):
        FolderLock(tmp_path / "file" / "out", key="eval.output_dir", what="pgot-eval").acquire()
    with pytest.raises(ValueError, match="cannot be used as a folder"):
        with hold_folder(tmp_path / "file", key="eval.output_dir", what="pgot-eval"):
            pass


_TWO_RANKS = """
import sys, time
from pathlib import Path
from accelerate import Accelerator
import pgot.files as files

acc = Accelerator(cpu=True)
folder, marker = Path(sys.argv[1]), Path(sys.argv[2])
files._WAIT_POLL_S = 0.2
try:
    with files.hold_folder(folder, key="precompute.store", what="pgot-precompute", accelerator=acc):
        print(f"rank {acc.process_index}: entered a held folder", flush=True)
except files.FolderLockedError as exc:
    print(f"rank {acc.process_index}: refused: {exc}", flush=True)
acc.wait_for_everyone()
if acc.is_main_process:
    marker.write_text("refused")
with files.hold_folder(folder, key="precompute.store", what="pgot-precompute", accelerator=acc, wait=True) as lock:
    # rank 1 gets here only after the main process holds the lock: its record exists
    print(f"rank {acc.process_index}: entered, record={files.read_holder(folder) is not None}", flush=True)
    time.sleep(0.5)
acc.end_training()
"""


def test_under_two_processes_only_the_main_one_holds_and_no_rank_races_ahead(tmp_path):
    """accelerate launch, 2 CPU processes: while another process holds the folder both ranks stop with the same
    error (no hang); waiting for it, rank 1 enters only once the main process holds the lock."""
    folder, marker = tmp_path / "store", tmp_path / "marker"
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), str(script), str(folder), str(marker)]  # fmt: skip
    lock = FolderLock(folder, key="precompute.store", what="a test").acquire()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        time.sleep(1.0)  # the script now waits for the lock
    finally:
        lock.release()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    lines = sorted(out.splitlines())
    assert [x.split(":")[0] for x in lines] == ["rank 0", "rank 0", "rank 1", "rank 1"], (out, err[-3000:])
    refused = [x for x in lines if "refused" in x]
    assert len(refused) == 2 and all(f"precompute.store={folder} is in use by another process (pid {os.getpid()}" in x
                                     for x in refused)  # fmt: skip
    assert sorted(x for x in lines if "entered" in x) == [
        "rank 0: entered, record=True",
        "rank 1: entered, record=True",
    ]


def test_every_stage_locks_its_output_folder_before_loading_anything(tmp_path, monkeypatch):
    """The same mechanism for the three folders: a store, a run folder (tests/test_train.py), an eval folder. The
    preflight says so first; a holder that comes after the preflight is refused by the lock itself."""
    import pgot.model
    import pgot.preflight
    from pgot import evaluate, precompute
    from pgot.config import ConfigError, load_config

    monkeypatch.setattr(pgot.model, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(precompute, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    store, out = tmp_path / "store", tmp_path / "eval"
    runs = [
        (precompute.run, "tiny_precompute.yaml", f"precompute.store={store}"),
        (evaluate.run, "tiny_eval.yaml", f"eval.output_dir={out}"),
    ]
    for run, config, override in runs:
        key, folder = override.split("=")
        cfg = load_config(ROOT / "tests" / "configs" / config, [override])
        with FolderLock(folder, key=key, what="a test"):
            with pytest.raises(ConfigError, match=f"{key}={folder} is in use by another process"):
                run(cfg)  # the preflight
            with monkeypatch.context() as m:  # the holder came after the preflight looked
                m.setattr(pgot.preflight, "folder_in_use", lambda *a, **k: None)
                with pytest.raises(FolderLockedError, match=f"{key}={folder} is in use by another process"):
                    run(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="pgot-eval runs in one process, but it was started as one of 2"):
        evaluate.run(cfg)


def test_a_file_system_failure_of_the_main_process_stops_every_process(tmp_path, monkeypatch):
    """Rule: whatever stops the main process in hold_folder reaches the others through the broadcast they wait
    in: an OSError the lock does not foresee (no space for the record, a read-only or failing disk) is raised on
    the main process as it came, and as a ValueError naming it on the others."""
    from pgot import files

    class Processes:
        num_processes = 2

        def __init__(self, rank):
            self.is_main_process = self.is_local_main_process = rank == 0

    shared = []

    def broadcast(box, from_process=0):
        if shared:
            box[0] = shared[0]
        else:
            shared.append(box[0])
        return box

    def no_space(self, timeout=0):
        raise OSError(28, "No space left on device", str(self.folder / files.LOCK_RECORD))

    monkeypatch.setattr(files, "broadcast_object_list", broadcast)
    monkeypatch.setattr(files.FolderLock, "acquire", no_space)
    folder = tmp_path / "store"
    with pytest.raises(OSError, match="No space left on device"):
        with hold_folder(folder, key="precompute.store", what="pgot-precompute", accelerator=Processes(0)):
            pytest.fail("entered")
    assert shared  # the main process took part in the broadcast before raising
    with pytest.raises(ValueError, match=f"precompute.store={folder}: the main process could not take the folder"):
        with hold_folder(folder, key="precompute.store", what="pgot-precompute", accelerator=Processes(1)):
            pytest.fail("entered")
