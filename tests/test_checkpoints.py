"""pgot/checkpoints.py: trainer state round trip, atomic save / load, prune, revert, resume folders.

The multi-process race (a slow rank writing into a folder already renamed) is covered by the two-process
tests in tests/test_train.py; here one process checks the file-level contract.
"""

from __future__ import annotations

import json

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
    return TrainerState(step=step, skipped_steps=1, metrics_lines=step, running=[1.0, 2.0], agent=agent)


def test_trainer_state_round_trip():
    st = _state(7)
    assert TrainerState.from_dict(json.loads(json.dumps(st.to_dict()))) == st
    assert st.to_dict()["agent"]["approved"] == "step-000007"


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
