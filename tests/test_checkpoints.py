"""pgot/checkpoints.py: trainer state round trip, atomic save / load, prune, revert, resume folders, incomplete
checkpoints refused, stop signals.

The multi-process race (a slow rank writing into a folder already renamed) is covered by the two-process
test with a slowed rank in tests/test_train.py; here one process checks the file-level contract.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest
import torch
from accelerate import Accelerator

from pgot import checkpoints
from pgot.agent import AgentState, Decision
from pgot.checkpoints import TrainerState
from pgot.config import ModelConfig, RewardConfig
from pgot.model import LORA_WEIGHT_NAME, add_lora, load_model


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig(tiny=True, resolution=16, device="cpu", lora_rank=2, lora_alpha=2.0, gradient_checkpointing=False)
    model = load_model(cfg)
    params = add_lora(model, cfg)
    acc = Accelerator(cpu=True)
    opt = acc.prepare(torch.optim.AdamW(params, lr=1e-3))
    return acc, model, params, opt


def _state(step: int) -> TrainerState:
    agent = AgentState.initial([RewardConfig(name="contrast"), RewardConfig(name="sharpness", strength="weak")])
    agent.apply(Decision("continue", None, "ok", "", step=step, cost=0.1), checkpoint=checkpoints.checkpoint_name(step))
    return TrainerState(
        step=step, skipped_steps=1, metrics_lines=step, steps_run=step + 2, decided_at=step, num_processes=1,
        running=[1.0, 2.0], agent=agent,
    )  # fmt: skip


def test_trainer_state_round_trip():
    st = _state(7)
    assert TrainerState.from_dict(json.loads(json.dumps(st.to_dict()))) == st
    assert st.to_dict()["agent"]["approved"] == "step-000007"
    old = {k: v for k, v in st.to_dict().items() if k not in ("steps_run", "decided_at", "num_processes")}
    legacy = TrainerState.from_dict(old)  # written before those fields: no reverts, decided, process count unknown
    assert (legacy.steps_run, legacy.decided_at, legacy.num_processes) == (7, 7, 0)


def test_save_load_prune_discard(tmp_path, setup):
    acc, model, params, _ = setup
    folder = tmp_path / "checkpoints"
    saved = {}
    for step in (1, 2, 3, 4):
        with torch.no_grad():
            params[0].fill_(float(step))
        saved[step] = checkpoints.save(acc, folder, _state(step), params, model)
    assert [p.name for p in checkpoints.list_checkpoints(folder)] == [f"step-00000{i}" for i in (1, 2, 3, 4)]
    ckpt = saved[3]
    assert (ckpt / checkpoints.STATE_FILE).is_file() and (ckpt / LORA_WEIGHT_NAME).is_file()
    assert (ckpt / "optimizer.bin").is_file() and not list(folder.glob(".tmp-*"))
    # an interrupted save (a temporary folder) and a folder without trainer_state.json are not checkpoints
    (folder / ".tmp-step-000009").mkdir()
    (folder / "step-000008").mkdir()
    assert checkpoints.list_checkpoints(folder)[-1].name == "step-000004"
    loaded = checkpoints.load(acc, saved[2], params)
    assert loaded == _state(2) and float(params[0].flatten()[0]) == 2.0
    checkpoints.prune(folder, keep=2, protect=["step-000001"])
    assert [p.name for p in checkpoints.list_checkpoints(folder)] == ["step-000001", "step-000003", "step-000004"]
    checkpoints.discard_after(folder, 1)
    assert [p.name for p in checkpoints.list_checkpoints(folder)] == ["step-000001"]
    assert checkpoints.resume_folder("latest", tmp_path) == folder / "step-000001"


def test_resume_folder_rules(tmp_path):
    assert checkpoints.resume_folder("", tmp_path) is None
    assert checkpoints.resume_folder("latest", tmp_path) is None  # nothing yet: a fresh start
    with pytest.raises(ValueError, match=r"train.resume='.*nope' is not a pgot checkpoint folder"):
        checkpoints.resume_folder(str(tmp_path / "nope"), tmp_path)


def test_incomplete_checkpoints_and_other_process_counts_are_refused(tmp_path, setup):
    """accelerate skips a missing RNG file with an INFO line; pgot refuses the checkpoint instead, naming it."""
    acc, model, params, _ = setup
    good = checkpoints.save(acc, tmp_path / "checkpoints", _state(3), params, model)
    assert checkpoints.read_state(good).num_processes == 1 and checkpoints.step_of(good) == 3
    for name in ("random_states_0.pkl", "optimizer.bin", checkpoints.LORA_STATE):
        broken = tmp_path / f"without-{name}"
        shutil.copytree(good, broken)
        (broken / name).unlink()
        with pytest.raises(ValueError, match=rf"checkpoint {broken} is incomplete: it lacks {name}"):
            checkpoints.load(acc, broken, params)
    other = tmp_path / "two-processes"
    shutil.copytree(good, other)
    state = json.loads((other / checkpoints.STATE_FILE).read_text())
    (other / checkpoints.STATE_FILE).write_text(json.dumps({**state, "num_processes": 2}))
    with pytest.raises(ValueError, match=r"written by a run of 2 process\(es\); this one has 1.*--num_processes 2"):
        checkpoints.load(acc, other, params)
    (other / checkpoints.STATE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="has no readable trainer_state.json"):
        checkpoints.load(acc, other, params)


def test_clear_temporaries(tmp_path, setup):
    acc, model, params, _ = setup
    folder = tmp_path / "checkpoints"
    checkpoints.save(acc, folder, _state(1), params, model)
    (folder / ".tmp-step-000002").mkdir()
    (folder / "step-000003").mkdir()  # a folder without trainer_state.json
    assert checkpoints.clear_temporaries(folder) == [".tmp-step-000002", "step-000003"]
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001"]
    assert checkpoints.clear_temporaries(tmp_path / "missing") == []


def test_interrupted_carries_the_exit_code():
    stop = checkpoints.Interrupted("stopped", signal.SIGTERM)
    assert isinstance(stop, KeyboardInterrupt) and not isinstance(stop, Exception)  # never caught by except Exception
    assert (stop.exit_code, str(stop), stop.checkpoint) == (143, "stopped", None)
    assert checkpoints.Interrupted("x").exit_code == 130


@pytest.mark.parametrize("text", ["[]", '{"agent": 3}', '{"step": 1, "agent": []}'])
def test_a_state_file_of_another_shape_is_an_unreadable_checkpoint(tmp_path, text):
    """JSON that is not a trainer state is the one-line error of an unreadable checkpoint, not a traceback (the
    preflight and the run folder's rules read it on the main process only)."""
    (tmp_path / "step-000002").mkdir()
    (tmp_path / "step-000002" / checkpoints.STATE_FILE).write_text(text)
    with pytest.raises(ValueError, match=f"checkpoint .*step-000002 has no readable {checkpoints.STATE_FILE}"):
        checkpoints.read_state(tmp_path / "step-000002")


def test_a_repeated_signal_is_one_request_and_a_later_one_stops_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Schedulers signal every process of a job and accelerate launch forwards the signal to each worker too: a
    repeat within StopSignals.repeat_s is the same request; one after it stops at once (KeyboardInterrupt with the
    signal's number). The handlers before the block are restored."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with checkpoints.StopSignals() as signals:
        assert signals.signum == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.signum == signal.SIGTERM  # remembered: the caller stops at its next safe point
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's copy: ignored
        assert signals.signum == signal.SIGTERM
        monkeypatch.setattr(checkpoints.StopSignals, "repeat_s", 0.0)
        with pytest.raises(KeyboardInterrupt) as e:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert e.value.signum == signal.SIGINT
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored


def test_stop_signals_outside_the_main_thread_leave_the_handlers_alone() -> None:
    """Python installs signal handlers only in the main thread: elsewhere the block changes nothing."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    seen = []

    def body() -> None:
        with checkpoints.StopSignals() as signals:
            seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), signals.signum))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [(*before, 0)]
