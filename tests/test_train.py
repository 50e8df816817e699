"""pgot/train.py: the DRaFT-K LoRA loop, its objectives, checkpoints, resume, NaN handling and distribution;
what a run does with its folder (resume, start afresh, finished, refused, locked) and with signals.

Oracles: the diffusers pipeline (the final LoRA reproduces pgot's samples), a run that was never
interrupted (SIGKILL, SIGINT, SIGTERM + resume end bit-identical on CPU, on one process and on two with a
slowed rank), the frozen base weights (unchanged), the run folder's bytes (unchanged by a refused or a
finished rerun).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

from pgot import cli, metrics, probes, tables, train
from pgot.config import load_config, save_config
from pgot.files import LOCK_RECORD
from pgot.tracking import metric_lines

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ROOT / "tests" / "hooks"  # sitecustomize.py: slowed ranks and signals at a given step, for subprocesses
DEBUG = ROOT / "tests" / "configs" / "tiny_debug.yaml"  # the base of every test config (tiny model, analytic rewards)
RES = 16
REWARDS = ["colorfulness", "contrast", "sharpness"]
TIMING = set(train._TIMING_KEYS)


def _overrides(out: Path, store: Path | None, **extra: object) -> list[str]:
    base = {
        "model.tiny": True,
        "model.resolution": RES,
        "model.device": "cpu",
        "model.lora_rank": 2,
        "model.lora_alpha": 2.0,
        "model.gradient_checkpointing": False,
        "draft.num_steps": 2,
        "draft.k": 1,
        "prompts.limit": 4,
        "precompute.samples_per_prompt": 4,
        "precompute.store": str(store) if store else "",
        "train.store": str(store) if store else "",
        "train.output_dir": str(out),
        "train.prompts_per_step": 2,
        "train.samples_per_prompt": 2,
        "train.learning_rate": 1e-2,
        "train.max_steps": 2,
        "train.probe_every": 0,
        "train.checkpoint_every": 0,
        "train.final_eval": False,
        "train.resume": "",
        "train.precompute_if_missing": False,
        "train.keep_checkpoints": 3,
        "train.warmup_steps": 0,
        "ot.max_iter": 50,
    }
    base.update(extra)
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in base.items()]


def _cfg(out: Path, store: Path | None, **extra: object):
    return load_config(DEBUG, _overrides(out, store, **extra))


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    """Each run creates its Accelerator; forget the previous one's singleton state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from accelerate.state import AcceleratorState

    from pgot import precompute

    path = tmp_path_factory.mktemp("store") / "frontier"
    precompute.run(_cfg(path.parent / "unused", path))
    AcceleratorState._reset_state(reset_partial_state=True)
    return path


def _metrics(run: Path) -> list[dict]:
    """The metrics lines (event lines skipped)."""
    return metric_lines(run / "metrics.jsonl")


def _lines(run: Path) -> list[dict]:
    """Every line of metrics.jsonl, event lines included."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _strip(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in lines]


def _same_lora(a: Path, b: Path) -> None:
    x, y = (
        load_file(str(a / "final" / "pytorch_lora_weights.safetensors")),
        load_file(str(b / "final" / "pytorch_lora_weights.safetensors")),
    )
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": f"{HOOKS}{os.pathsep}{ROOT}",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def _launch(config: Path, *args: str, processes: int = 2, **env: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` of pgot-train (with ``args``) on CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "pgot", "train", "--config", str(config), *args]  # fmt: skip
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=240)


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


def test_debug_config_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's command (shortened): the shipped configs/debug.yaml (the testbed world) precomputes the missing
    store, trains, prints the table with the ground truth beside JDR / JCR."""
    out, store = tmp_path / "run", tmp_path / "frontier"
    argv = ["--config", str(ROOT / "configs" / "debug.yaml"), f"train.output_dir={out}", f"train.store={store}",
            f"precompute.store={store}", "train.max_steps=3", "train.probe_every=2", "train.checkpoint_every=2",
            "train.probe_prompts=2", "prompts.limit=2", "precompute.samples_per_prompt=4"]  # fmt: skip
    assert cli.train_main(argv) == 0
    printed = capsys.readouterr().out
    assert "precomputing" in printed and "JDR4 (%)" in printed and "win rate tb_pref" in printed
    assert "quality change (ground truth)" in printed and "hacked4 (%) on" in printed and "Hacked rate:" in printed
    for rel in ["config.yaml", "sigmas.json", "metrics.jsonl", "probes/step0_scores.safetensors", "probes/step-000002.png",
                "checkpoints/step-000002/trainer_state.json", "checkpoints/step-000003/optimizer.bin",
                "checkpoints/step-000003/pytorch_lora_weights.safetensors", "final/pytorch_lora_weights.safetensors"]:  # fmt: skip
        assert (out / rel).is_file(), rel
    assert (store / "meta.json").is_file()
    lines = _metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3]
    for key in [
        "loss",
        "lr",
        "grad_norm",
        "step_time",
        "n_dominated",
        "front_size",
        "bad_steps",
        "strategy",
        "active_rewards",
    ]:
        assert key in lines[0], key
    testbed = ["saturation", "contrast", "tb_align", "tb_pref"]
    assert {f"reward/{n}" for n in testbed} <= set(lines[0])
    assert {"probe/jdr_JDR2", "probe/jcr_JDR4", "probe/kl_tb_pref", "probe/win_contrast"} <= set(lines[1])
    assert load_config(out / "config.yaml").train.max_steps == 3
    assert len(json.loads((out / "sigmas.json").read_text())["sigmas"]) == 9  # the testbed sampler's 8 steps
    assert [m["log_index"] for m in lines] == [0, 1, 2] and [m["steps_run"] for m in lines] == [1, 2, 3]
    # running it again with train.resume=latest (the debug config's) finds the run complete: it reprints the table
    # and changes nothing in the folder
    before = _hashes(out)
    assert cli.train_main(argv) == 0
    again = capsys.readouterr().out
    assert "JDR4 (%)" in again and "quality change (ground truth)" in again
    assert _hashes(out) == before


def test_trainable_changed_frozen_did_not(tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pgot.model as model_mod

    seen: dict[str, dict[str, torch.Tensor]] = {}
    add_lora = model_mod.add_lora

    def recording_add_lora(model, cfg, *a, **kw):
        params = add_lora(model, cfg, *a, **kw)
        ids = {id(p) for p in params}
        named = list(model.transformer.named_parameters())
        seen["lora"] = {n: p.detach().clone() for n, p in named if id(p) in ids}
        seen["frozen"] = {n: p.detach().clone() for n, p in named if id(p) not in ids}
        seen["vae"] = {n: p.detach().clone() for n, p in model.vae.named_parameters()}
        return params

    monkeypatch.setattr(train, "add_lora", recording_add_lora)  # the name train.py calls
    _, model = train.fit(_cfg(tmp_path / "run", store, **{"train.max_steps": 2}))
    now = dict(model.transformer.named_parameters())
    assert seen["lora"] and all(p.requires_grad for n, p in now.items() if n in seen["lora"])
    unchanged = {n for n, p in seen["lora"].items() if torch.equal(p, now[n].detach())}
    # the last block is context_pre_only: its context queries (add_q_proj) only feed the dropped context output,
    # so their LoRA gets no gradient at all (architecture, not training); every other LoRA tensor moved
    last = max(int(n.split(".")[1]) for n in seen["lora"])
    dead = {n for n in seen["lora"] if n.startswith(f"transformer_blocks.{last}.attn.add_q_proj.")}
    assert unchanged == dead, f"LoRA parameters that did not train: {sorted(unchanged - dead)[:3]}"
    for n, p in seen["frozen"].items():
        assert not now[n].requires_grad and torch.equal(p, now[n].detach()), n
    for n, p in model.vae.named_parameters():
        assert torch.equal(seen["vae"][n], p.detach()), n


@pytest.mark.parametrize(
    "extra",
    [
        {"train.objective": "pgot", "train.strategy": "offline"},
        {"train.objective": "pgot", "train.strategy": "online", "train.reduction": "sum"},
        {"train.objective": "single_reward", "train.active_rewards": ["contrast"]},
        {"train.objective": "weighted_sum", "rewards.0.weight": 2.0, "rewards.1.target": 0.5},
        {"train.objective": "hetero_weighted_sum"},
        {"train.objective": "separate_constraints", "train.active_rewards": ["colorfulness", "sharpness"]},
        {"train.objective": "pgot", "draft.method": "refl", "train.gradient_accumulation_steps": 2},
    ],
    ids=["offline", "online", "single", "weighted", "hetero", "separate", "refl_accum"],
)
def test_each_objective_runs_one_step(tmp_path: Path, store: Path, extra: dict) -> None:
    run, _ = train.fit(_cfg(tmp_path / "run", store, **{"train.max_steps": 1, **extra}))
    (line,) = _metrics(run)
    assert line["step"] == 1 and line["loss"] is not None and line["grad_norm"] is not None
    assert line["skipped_steps"] == 0
    assert line["active_rewards"] == extra.get("train.active_rewards", REWARDS)
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_tensorboard_tracker_gets_the_metrics(tmp_path: Path, store: Path) -> None:
    """train.log_with=[tensorboard]: accelerate's tracker receives the same loss as metrics.jsonl."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run, _ = train.fit(_cfg(tmp_path / "run", store, **{"train.max_steps": 2, "train.log_with": ["tensorboard"]}))
    (events,) = [p for p in (run / "logs").rglob("events.out.tfevents.*") if "loss" in _tags(event_accumulator, p)]
    acc = event_accumulator.EventAccumulator(str(events))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("loss")}
    expected = {m["steps_run"]: m["loss"] for m in _metrics(run)}  # the trackers' x axis: steps_run
    assert logged.keys() == expected.keys() == {1, 2}
    for step, value in expected.items():
        assert logged[step] == pytest.approx(value, rel=1e-6)


def _tags(event_accumulator, path: Path) -> list[str]:
    acc = event_accumulator.EventAccumulator(str(path))
    acc.Reload()
    return acc.Tags()["scalars"]


def test_two_processes_with_a_slowed_rank_save_whole_checkpoints_and_resume_exactly(tmp_path: Path) -> None:
    """Online PG-OT on 2 CPU processes (gloo) with rank 1 slowed by 1 s in every collective write (checkpoint
    save and load): every checkpoint holds both ranks' RNG states, an agent revert reloads and discards safely,
    a SIGTERM that only rank 1 receives stops both ranks after the same step with a checkpoint, and the resumed
    run ends bit-identical to the uninterrupted one. (Without the barrier between the ranks' writes and the
    rename, rank 1's random_states_1.pkl lands in a folder already renamed: the checkpoint misses it.)"""
    script = tmp_path / "script.yaml"
    script.write_text("2: {action: remove, reward: sharpness}\n")
    extra = {"train.strategy": "online", "train.checkpoint_every": 1, "train.keep_checkpoints": 10,
             "train.max_steps": 4, "train.resume": "latest", "agent.backend": "scripted", "agent.script": str(script),
             "agent.every": 2, "agent.diagnostic_prompts": 2, "rewards.2.strength": "weak"}  # fmt: skip
    for name in ("ref", "stopped"):
        save_config(_cfg(tmp_path / name, None, **extra), tmp_path / f"{name}.yaml")
    slow = {"PGOT_TEST_SLOW_RANK": "1", "PGOT_TEST_SLOW_S": "1"}

    ref = _launch(tmp_path / "ref.yaml", **slow)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "terminate called" not in ref.stderr
    run = tmp_path / "ref"
    events = [m for m in _lines(run) if "event" in m]
    assert [(e["event"], e["step"], e["to_step"]) for e in events] == [("revert", 2, 0)]
    lines = _metrics(run)
    assert [m["step"] for m in lines] == [1, 2, 1, 2, 3, 4] and [m["steps_run"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert all(m["front_size"] == 2 * 2 for m in lines)  # the pool: world x N vectors per prompt
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == [f"step-00000{i}" for i in range(5)]  # 1, 2 of the first branch discarded
    for c in ckpts:
        assert (c / "random_states_0.pkl").is_file() and (c / "random_states_1.pkl").is_file(), c
    assert not list((run / "checkpoints").glob(".tmp-*"))
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["agent"]["active_rewards"] == ["colorfulness", "contrast"]
    assert state["running"][0] == 6 * 2 * 2 * 2  # 6 steps run x P=2 x world*N=4 gathered vectors

    stopped = _launch(tmp_path / "stopped.yaml", **slow, PGOT_TEST_SIGNAL="3:SIGTERM:1")  # rank 1 only, step 3
    assert stopped.returncode != 0
    assert "stopped by SIGTERM after step 3 of 4" in stopped.stderr, stopped.stderr[-3000:]
    out = tmp_path / "stopped"
    assert (out / "checkpoints" / "step-000003" / "random_states_1.pkl").is_file() and not (out / "final").exists()
    resumed = _launch(tmp_path / "stopped.yaml", **slow)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_lora(run, out)
    assert _strip(_lines(out)) == _strip(_lines(run))


def test_a_problem_one_process_finds_stops_every_process_with_one_error(tmp_path: Path) -> None:
    """The preflight is a collective: a problem only rank 1 finds (an input missing on one node) stops both ranks
    before anything is written, with one copy of the error, and the main process, slowed so that rank 1 is done
    first, is not left waiting for it in a collective (where only the launcher's SIGKILL ends it)."""
    save_config(_cfg(tmp_path / "run", None, **{"train.strategy": "online"}), tmp_path / "cfg.yaml")
    out = _launch(tmp_path / "cfg.yaml", PGOT_TEST_PROBLEM_RANK="1", PGOT_TEST_SLOW_RANK="0", PGOT_TEST_SLOW_S="2")
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: process 1: a problem only process 1 sees"], out.stderr[-3000:]
    assert "SIGKILL" not in out.stderr, out.stderr[-3000:]  # what the launcher sends a process stuck in a collective
    assert not (tmp_path / "run").exists()


def test_check_under_a_launch_is_the_runs_collective_check(tmp_path: Path) -> None:
    """pgot-train --check under accelerate launch: the same collective preflight as the run; a config in place
    is said once per machine and nothing is written; a problem of one process is every process's error."""
    save_config(_cfg(tmp_path / "run", None, **{"train.strategy": "online"}), tmp_path / "cfg.yaml")
    ok = _launch(tmp_path / "cfg.yaml", "--check")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.count("in place") == 1 and not (tmp_path / "run").exists()
    bad = _launch(tmp_path / "cfg.yaml", "--check", PGOT_TEST_PROBLEM_RANK="1")
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: process 1: a problem only process 1 sees"], bad.stderr[-3000:]


def test_sigkill_and_resume_is_exact(tmp_path: Path, store: Path) -> None:
    """A run killed after a checkpoint and resumed ends with the same LoRA and metrics as an uninterrupted run."""
    extra = {"train.max_steps": 6, "train.checkpoint_every": 2, "train.keep_checkpoints": 2, "train.probe_every": 3,
             "train.probe_prompts": 2, "train.resume": "latest", "train.warmup_steps": 2, "train.lr_scheduler": "cosine"}  # fmt: skip
    ref_run, _ = train.fit(_cfg(tmp_path / "ref", store, **extra))

    killed = tmp_path / "killed"
    save_config(_cfg(killed, store, **extra), tmp_path / "cfg.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "pgot", "train", "--config", str(tmp_path / "cfg.yaml")], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    first = killed / "checkpoints" / "step-000002" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished (or failed) before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    run, _ = train.fit(_cfg(killed, store, **extra))
    ref_lora = load_file(str(ref_run / "final" / "pytorch_lora_weights.safetensors"))
    got_lora = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))
    assert ref_lora.keys() == got_lora.keys()
    for k in ref_lora:
        assert torch.equal(ref_lora[k], got_lora[k]), k

    def strip(lines: list[dict]) -> list[dict]:
        return [{k: v for k, v in m.items() if k not in TIMING} for m in lines]

    assert strip(_metrics(run)) == strip(_metrics(ref_run))  # same values, no duplicated step
    assert len(list((run / "checkpoints").glob("step-*"))) == 2  # train.keep_checkpoints


def test_final_lora_loads_in_diffusers_and_reproduces_samples(tmp_path: Path, store: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    from pgot.embeddings import encode_prompts
    from pgot.generate import decode, make_noise, sample
    from pgot.model import load_model
    from pgot.tiny import save_tiny

    cfg = _cfg(tmp_path / "run", store, **{"train.max_steps": 2})
    run, model = train.fit(cfg)
    base_folder = save_tiny(load_model(cfg.model), tmp_path / "tiny")
    pipe = StableDiffusion3Pipeline.from_pretrained(base_folder, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(run / "final")

    embeds = encode_prompts(model, ["a red apple", "a city at night"])
    noise = make_noise(5, [0, 1], [0, 0], model.latent_shape(RES))
    with torch.no_grad():
        ours = decode(model, sample(model, embeds, noise, num_steps=cfg.draft.num_steps, k=0))
        ref = pipe(
            prompt_embeds=embeds.prompt_embeds, pooled_prompt_embeds=embeds.pooled, latents=noise.clone(),
            num_inference_steps=cfg.draft.num_steps, guidance_scale=0.0, height=RES, width=RES, output_type="pt",
        ).images  # fmt: skip
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), probes.base_model(model):
        base = decode(model, sample(model, embeds, noise, num_steps=cfg.draft.num_steps, k=0))
    assert not torch.allclose(base, ours)  # the LoRA changed the samples


# --------------------------------------------------------------------------------------------
# Bad steps and user errors
# --------------------------------------------------------------------------------------------


def _nan_from(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int] | int) -> None:
    """Training-step rewards (the calls with gradients) become NaN on the given call numbers (1-based)."""
    from pgot import rewards

    real = rewards.score
    calls = {"n": 0}

    def score(models, images, prompts):
        out = real(models, images, prompts)
        if not torch.is_grad_enabled():
            return out
        calls["n"] += 1
        hit = calls["n"] in bad_calls if isinstance(bad_calls, set) else calls["n"] >= bad_calls
        return out * float("nan") if hit else out

    monkeypatch.setattr(rewards, "score", score)


def _finite(folder: Path, name: str = "lora_state.safetensors") -> dict[str, torch.Tensor]:
    """The LoRA tensors of a checkpoint or final/ folder, asserted finite."""
    state = load_file(str(folder / name))
    assert state and all(torch.isfinite(v).all() for v in state.values()), folder
    return state


def test_nan_step_is_skipped_and_counted(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps 2 and 3 (the last) are bad: skipped and counted, with one log line each; the checkpoint_every
    checkpoint of step 2 is not written, the one of train.max_steps is (the LoRA of step 1) and does not prune
    step 1's; final/ holds step 1's finite LoRA, not a NaN one (a run shorter than train.max_bad_steps)."""
    _nan_from(monkeypatch, {2, 3})
    with caplog.at_level(logging.WARNING, logger="pgot.train"):
        run, _ = train.fit(
            _cfg(
                tmp_path / "run",
                store,
                **{"train.max_steps": 3, "train.checkpoint_every": 1, "train.keep_checkpoints": 1},
            )
        )
    skipped = [rec.getMessage() for rec in caplog.records if "skipped" in rec.getMessage()]
    assert skipped == [f"step {s}: NaN or infinite loss, reward or LoRA gradient; the step is skipped" for s in (2, 3)]
    lines = _metrics(run)
    assert [(m["bad_steps"], m["skipped_steps"]) for m in lines] == [(0, 0), (1, 1), (2, 2)]
    assert lines[1]["grad_norm"] is None and all(lines[1][f"reward/{n}"] is None for n in REWARDS)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000001", "step-000003"]
    one, three = _finite(run / "checkpoints" / "step-000001"), _finite(run / "checkpoints" / "step-000003")
    assert all(torch.equal(one[k], three[k]) for k in one)  # the skipped steps did not touch the LoRA
    final = _finite(run / "final", "pytorch_lora_weights.safetensors")
    assert len(final) == len(one)


class _NanGrad(torch.autograd.Function):
    """Identity forward (finite values), NaN backward: a non-finite gradient with a finite loss and rewards."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def test_nonfinite_gradient_is_a_bad_step(tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rule (b): finite loss and rewards but NaN LoRA gradients (step 2): skipped, counted, no AdamW update."""
    from pgot import rewards

    real, calls = rewards.score, {"n": 0}

    def score(models, images, prompts):
        out = real(models, images, prompts)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 2:
                return _NanGrad.apply(out)
        return out

    monkeypatch.setattr(rewards, "score", score)
    run, _ = train.fit(_cfg(tmp_path / "run", store, **{"train.max_steps": 2, "train.checkpoint_every": 1}))
    lines = _metrics(run)
    assert [(m["bad_steps"], m["skipped_steps"]) for m in lines] == [(0, 0), (1, 1)]
    assert lines[1]["grad_norm"] is None and all(lines[1][f"reward/{n}"] is not None for n in REWARDS)
    one, two = _finite(run / "checkpoints" / "step-000001"), _finite(run / "checkpoints" / "step-000002")
    assert all(torch.equal(one[k], two[k]) for k in one)
    _finite(run / "final", "pytorch_lora_weights.safetensors")


def test_nonfinite_weights_stop_without_saving(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rule (c): the optimizer step of step 2 makes a LoRA weight NaN: exit 2, one error line naming the step and
    the last good checkpoint (step 1, finite); no checkpoint of step 2 and no final/."""
    real, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    args = _overrides(out, store, **{"train.max_steps": 4, "train.checkpoint_every": 1})
    assert cli.train_main(["--config", str(DEBUG), *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    good = out / "checkpoints" / "step-000001"
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("error: the optimizer step of step 2 made LoRA weights NaN or infinite")
    assert f"The last good checkpoint is {good}." in err[0] and f"train.resume={good}" in err[0]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000001"]
    _finite(good)
    assert not (out / "final").exists() and not (out / ".tmp-final").exists()


def test_large_learning_rate_keeps_a_good_checkpoint(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rule (d), the reported run: a huge train.learning_rate blows the samples up to NaN after a few steps, with a
    checkpoint every step and keep_checkpoints=1. Whatever stops the run (too many bad steps, or non-finite weights),
    the checkpoint its one error line names exists and holds finite weights, and no final/ is written."""
    out = tmp_path / "run"
    extra = {"train.max_steps": 8, "train.checkpoint_every": 1, "train.keep_checkpoints": 1, "train.max_bad_steps": 2}
    args = _overrides(out, store, **{**extra, "train.learning_rate": 1e30, "train.max_grad_norm": 0})
    assert cli.train_main(["--config", str(DEBUG), *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    named = err[0].split("The last good checkpoint is ", 1)[1].split(". ", 1)[0]
    _finite(Path(named))
    assert Path(named).parent == out / "checkpoints" and not (out / "final").exists()


def test_too_many_bad_steps_stop_with_one_line(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Steps 2 and 3 bad with train.max_bad_steps=2: one error line naming the last good checkpoint (step 1; the
    skipped step 2 wrote none), no final/."""
    _nan_from(monkeypatch, 2)
    out = tmp_path / "run"
    args = _overrides(out, store, **{"train.max_steps": 6, "train.checkpoint_every": 1, "train.max_bad_steps": 2})
    assert cli.train_main(["--config", str(DEBUG), *args]) == 2
    err = capsys.readouterr().err
    assert "2 consecutive steps had a NaN or infinite loss, reward or LoRA gradient" in err
    assert "train.max_bad_steps" in err and "Traceback" not in err
    assert f"stopped at step 3. The last good checkpoint is {out / 'checkpoints' / 'step-000001'}." in err
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000001"] and (out / "checkpoints" / "step-000001" / "trainer_state.json").is_file()
    assert not (out / "final").exists()


def test_store_of_other_rewards_is_refused(tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _overrides(tmp_path / "run", store, **{"rewards.1.name": "brightness"})
    assert cli.train_main(["--config", str(DEBUG), *args]) == 2
    err = capsys.readouterr().err
    assert "was computed for rewards" in err and "brightness" in err and "Traceback" not in err


def test_single_reward_with_two_active_rewards_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _overrides(
        tmp_path / "run",
        None,
        **{"train.objective": "single_reward", "train.active_rewards": ["contrast", "sharpness"]},
    )
    assert cli.train_main(["--config", str(DEBUG), *args]) == 2
    err = capsys.readouterr().err
    assert "exactly one active reward, got 2" in err and "train.active_rewards=[contrast]" in err
    assert not (tmp_path / "run").exists()


def test_agent_remove_reverts_and_switch_goes_online(tmp_path: Path, store: Path) -> None:
    """Scripted agent: remove a weak reward at step 2 (revert to the approved step 0), later switch to online."""
    script = tmp_path / "script.yaml"
    script.write_text("2:\n  action: remove\n  reward: sharpness\n4:\n  action: switch\n  strategy: online\n")
    extra = {"train.max_steps": 4, "agent.backend": "scripted", "agent.script": str(script), "agent.every": 2,
             "agent.diagnostic_prompts": 2, "rewards.2.strength": "weak", "train.strategy": "auto"}  # fmt: skip
    run, _ = train.fit(_cfg(tmp_path / "run", store, **extra, **{"train.log_with": ["tensorboard"]}))
    lines = _metrics(run)
    assert [m["step"] for m in lines] == [1, 2, 1, 2, 3, 4]  # reverted to step 0 after step 2; history kept
    everything = _lines(run)
    assert [m["log_index"] for m in everything] == list(range(7))  # one counter for every line, events included
    (revert,) = [m for m in everything if "event" in m]
    assert revert == {"event": "revert", "log_index": 2, "steps_run": 2, "step": 2, "to_step": 0,
                      "checkpoint": "step-000000", "reward": "sharpness"}  # fmt: skip
    assert [m["steps_run"] for m in lines] == [1, 2, 3, 4, 5, 6]  # the trackers' x axis never goes back
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    (events,) = [p for p in (run / "logs").rglob("events.out.tfevents.*") if "loss" in _tags(event_accumulator, p)]
    acc = event_accumulator.EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in acc.Scalars("step")] == [1, 2, 1, 2, 3, 4]
    assert lines[0]["active_rewards"] == REWARDS and lines[2]["active_rewards"] == ["colorfulness", "contrast"]
    state = json.loads((run / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    agent = state["agent"]  # pgot.agent.AgentState, checkpointed inside trainer_state.json
    assert agent["active_rewards"] == ["colorfulness", "contrast"] and agent["strategy"] == "online"
    assert [h["action"] for h in agent["history"]] == ["remove", "continue", "switch"]
    assert agent["removed"] == [{"step": 2, "reward": "sharpness", "reverted_to": 0}]
    assert agent["approved"] == "step-000004" and (run / "agent" / "step-000002").is_dir()
    # the removal, the strategy and the decisions survive a resume
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train.fit(_cfg(tmp_path / "run", store, **{**extra, "train.max_steps": 5, "train.resume": "latest"}))
    last = _metrics(run)[-1]
    assert last["step"] == 5 and last["strategy"] == "online" and last["active_rewards"] == ["colorfulness", "contrast"]
    assert last["front_size"] == 2  # online pool of one process: N vectors per prompt


# --------------------------------------------------------------------------------------------
# One run, one folder: resume rules, finished runs, signals, locks
# --------------------------------------------------------------------------------------------

RESUME = {"train.resume": "latest", "train.max_steps": 4}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, store: Path) -> Path:
    """An uninterrupted run of 4 steps (checkpoint only at the end), the oracle of the interrupted ones."""
    _reset_accelerate()
    run, _ = train.fit(_cfg(tmp_path_factory.mktemp("reference") / "run", store, **RESUME))
    _reset_accelerate()
    return run


def test_resume_with_other_settings_is_refused_naming_each_key(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    train.fit(_cfg(out, store, **{**RESUME, "train.max_steps": 2, "train.checkpoint_every": 1}))
    before = _hashes(out)
    _reset_accelerate()
    changed = {**RESUME, "train.objective": "weighted_sum", "rewards.0.weight": 2.0, "train.learning_rate": 0.5,
               "train.active_rewards": ["contrast", "sharpness"], "train.max_steps": 3, "train.log_every": 2}  # fmt: skip
    assert cli.train_main(["--config", str(DEBUG), *_overrides(out, store, **changed)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"train.output_dir={out} holds a run trained with other settings" in err
    for line in ["error: train.objective: weighted_sum here, pgot in the run",
                 "error: rewards.0.weight: 2.0 here, 1.0 in the run",
                 "error: train.learning_rate: 0.5 here, 0.01 in the run",
                 "error: train.active_rewards: [contrast, sharpness] here, [] in the run"]:  # fmt: skip
        assert line in err.splitlines(), line
    assert not [x for x in err.splitlines() if x.startswith(("error: train.max_steps", "error: train.log_every"))]
    assert _hashes(out) == before  # nothing in the folder changed
    # only resumable keys changed: the run continues
    _reset_accelerate()
    ok = {**RESUME, "train.max_steps": 3, "train.log_every": 2, "train.checkpoint_every": 3, "train.keep_checkpoints": 1,
          "model.gradient_checkpointing": True, "rewards.1.text_cache": 0, "agent.timeout": 5.0,
          "eval.samples_per_prompt": 3}  # fmt: skip
    train.fit(_cfg(out, store, **ok))
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]
    assert load_config(out / "config.yaml").train.max_steps == 3  # config.yaml follows the resumable changes


def test_resume_cannot_shorten_and_an_earlier_checkpoint_drops_the_later_ones(
    tmp_path: Path, store: Path, reference: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    train.fit(_cfg(out, store, **{**RESUME, "train.checkpoint_every": 1, "train.keep_checkpoints": 10}))
    _reset_accelerate()
    with pytest.raises(ValueError, match=r"train.max_steps=2 is below the step of the checkpoint to resume \(4"):
        train.fit(_cfg(out, store, **{**RESUME, "train.max_steps": 2}))
    _reset_accelerate()
    earlier = out / "checkpoints" / "step-000002"
    with caplog.at_level(logging.WARNING, logger="pgot.train"):
        train.fit(_cfg(out, store, **{**RESUME, "train.resume": str(earlier), "train.checkpoint_every": 1}))
    assert "deleted the later checkpoints step-000003, step-000004 and final/" in caplog.text
    _same_lora(reference, out)  # steps 3 and 4 again, from step 2's checkpoint: the same LoRA
    assert _strip(_metrics(out)) == _strip(_metrics(reference))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_the_rerun_continues_exactly(
    tmp_path: Path, store: Path, reference: Path, sig: str
) -> None:
    """A real pgot-train process gets SIGINT (Ctrl-C) or SIGTERM (preemption) during step 2 of 4; no checkpoint is
    due before the end: it finishes step 2, writes that step's checkpoint, exits 130 / 143 saying so; the rerun
    ends bit-identical to the uninterrupted run."""
    out = tmp_path / "run"
    save_config(_cfg(out, store, **RESUME), tmp_path / "cfg.yaml")
    proc = subprocess.run([sys.executable, "-m", "pgot", "train", "--config", str(tmp_path / "cfg.yaml")],
                          env=_env(PGOT_TEST_SIGNAL=f"2:{sig}"), capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr[-3000:]
    assert (
        f"stopped by {sig} after step 2 of 4, with the checkpoint {out / 'checkpoints' / 'step-000002'}" in proc.stderr
    )
    assert "train.resume=latest" in proc.stderr and "Traceback" not in proc.stderr
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step-000002"] and not (out / "final").exists()
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    train.fit(_cfg(out, store, **RESUME))
    _same_lora(reference, out)
    assert _strip(_metrics(out)) == _strip(_metrics(reference))


def test_interrupted_before_the_first_checkpoint_reruns_afresh(
    tmp_path: Path, store: Path, reference: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Interrupted during step 3 with no checkpoint yet (a second Ctrl-C, a kill, a crash): exit 130 saying a
    rerun starts afresh; the rerun with train.resume=latest does, and ends as the uninterrupted run (nothing of
    the aborted attempt mixes in); without train.resume it refuses, saying why."""
    out = tmp_path / "run"
    rollout = train._rollout

    def interrupted(r, step, micro):
        if step == 3:
            raise KeyboardInterrupt
        return rollout(r, step, micro)

    monkeypatch.setattr(train, "_rollout", interrupted)
    assert cli.train_main(["--config", str(DEBUG), *_overrides(out, store, **RESUME)]) == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT before the first checkpoint" in err and "start the run" in err
    assert [m["step"] for m in _metrics(out)] == [1, 2] and not (out / "checkpoints").exists()
    monkeypatch.setattr(train, "_rollout", rollout)
    _reset_accelerate()
    with pytest.raises(ValueError, match="already holds an attempt at a run that stopped before its first checkpoint"):
        train.fit(_cfg(out, store, **{**RESUME, "train.resume": ""}))
    _reset_accelerate()
    train.fit(_cfg(out, store, **RESUME))
    _same_lora(reference, out)
    assert _strip(_metrics(out)) == _strip(_metrics(reference))


def test_two_runs_in_one_folder(tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The second of two identical pgot-train started into one train.output_dir stops with one line naming the
    first (host, pid, start, command) and exit 2; the first runs to the end alone."""
    out = tmp_path / "run"
    save_config(_cfg(out, store, **{**RESUME, "train.max_steps": 6}), tmp_path / "cfg.yaml")
    # the first run holds the folder for 6 s at least (6 steps, each 1 s late): longer than files.GRACE_S
    first = subprocess.Popen([sys.executable, "-m", "pgot", "train", "--config", str(tmp_path / "cfg.yaml")],
                             env=_env(PGOT_TEST_STEP_S="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / LOCK_RECORD).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, "the first run ended before the second one started"
    assert cli.train_main(["--config", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: train.output_dir={out} is in use by another process")
    assert f"pid {first.pid} on host {socket.gethostname()}" in err[0] and str(tmp_path / "cfg.yaml") in err[0]
    assert first.wait(timeout=240) == 0, first.stderr.read()[-3000:]
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert not (out / LOCK_RECORD).exists()


def test_a_run_folder_held_by_another_process_is_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgot.files import FolderLock

    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with FolderLock(tmp_path / "run", key="train.output_dir", what="a pgot-train run"):
        with pytest.raises(ValueError, match="train.output_dir=.* is in use by another process"):  # preflight
            train.fit(_cfg(tmp_path / "run", None))


# --------------------------------------------------------------------------------------------
# Baselines that are distinct methods (issue 11)
# --------------------------------------------------------------------------------------------


def _final_lora(tmp_path: Path, store: Path, name: str, **extra: object) -> dict[str, torch.Tensor]:
    AcceleratorState._reset_state(reset_partial_state=True)
    run, _ = train.fit(_cfg(tmp_path / name, store, **{"train.max_steps": 2, **extra}))
    return load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))


def test_weighted_sum_and_weighted_sum_bounds_train_different_loras(tmp_path: Path, store: Path) -> None:
    """Same seed, same weights: the global-target and the per-prompt-bound baselines train different LoRAs under the
    default train.target_form=squared, and bit-identical ones under linear (where no target reaches the gradient)."""
    lora = {
        (objective, form): _final_lora(
            tmp_path, store, f"{objective}-{form}", **{"train.objective": objective, "train.target_form": form}
        )
        for form in ("squared", "linear")
        for objective in ("weighted_sum", "hetero_weighted_sum")
    }
    ws, hws = lora["weighted_sum", "squared"], lora["hetero_weighted_sum", "squared"]
    assert ws.keys() == hws.keys()
    assert any(not torch.equal(ws[k], hws[k]) for k in ws), "the two baselines trained the same LoRA"
    lin_ws, lin_hws = lora["weighted_sum", "linear"], lora["hetero_weighted_sum", "linear"]
    assert all(torch.equal(lin_ws[k], lin_hws[k]) for k in lin_ws)  # the defect the default avoids


def test_target_form_mistakes_are_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--config", str(DEBUG), f"train.output_dir={tmp_path / 'run'}"]
    assert cli.train_main([*base, "train.target_form=hinge"]) == 2  # objective pgot has no target
    assert "train.target_form=hinge has no effect with train.objective=pgot" in capsys.readouterr().err
    no_store = [*base, "train.objective=weighted_sum", "train.store=", "rewards.1.target=0.5"]
    assert cli.train_main(no_store) == 2
    err = capsys.readouterr().err
    assert "not set: rewards.0.target (colorfulness), rewards.2.target (sharpness)" in err
    assert "rewards.1.target" not in err.split("not set:")[1] and "train.target_form=linear" in err
    assert not (tmp_path / "run").exists()


def test_shipped_baselines_set_their_target_form_where_it_matters() -> None:
    for path in sorted((ROOT / "configs" / "baselines").glob("*.yaml")):
        cfg = load_config(path)
        header = path.read_text().split("\nmodel:")[0]
        assert "train.target_form" in header, path.name  # each header says why it is a distinct method
        if cfg.train.objective in ("weighted_sum", "hetero_weighted_sum"):
            assert cfg.train.target_form != "linear", path.name


# --------------------------------------------------------------------------------------------
# Reward strengths: the defaults of pgot.rewards.STRENGTHS
# --------------------------------------------------------------------------------------------


def test_agent_removes_an_analytic_reward_without_it_being_marked_weak(tmp_path: Path, store: Path) -> None:
    """strength: null is the reward's default (analytic rewards are weak), so the agent's removal is applied."""
    script = tmp_path / "script.yaml"
    script.write_text("2: {action: remove, reward: contrast}\n")
    extra = {"train.max_steps": 2, "agent.backend": "scripted", "agent.script": str(script), "agent.every": 2,
             "agent.diagnostic_prompts": 1, "train.strategy": "auto"}  # fmt: skip
    cfg = _cfg(tmp_path / "run", store, **extra)
    assert all(r.strength is None for r in cfg.rewards)
    run, _ = train.fit(cfg)
    agent = json.loads((run / "checkpoints" / "step-000000" / "trainer_state.json").read_text())["agent"]
    assert agent["strengths"] == {"colorfulness": "weak", "contrast": "weak", "sharpness": "weak"}
    assert agent["active_rewards"] == ["colorfulness", "sharpness"]
    assert agent["removed"] == [{"step": 2, "reward": "contrast", "reverted_to": 0}]


# --------------------------------------------------------------------------------------------
# Trackers: images, text and config next to the numbers
# --------------------------------------------------------------------------------------------


def _tracked_run(tmp_path: Path, store: Path, tracker: str) -> Path:
    script = tmp_path / "script.yaml"
    script.write_text("2: {action: continue}\n")
    extra = {"train.max_steps": 3, "train.probe_every": 1, "train.probe_prompts": 2, "train.log_with": [tracker],
             "agent.backend": "scripted", "agent.script": str(script), "agent.every": 2,
             "agent.diagnostic_prompts": 2}  # fmt: skip
    run, _ = train.fit(_cfg(tmp_path / "run", store, **extra))
    return run


def _pixels(image: Image.Image | Path | bytes) -> np.ndarray:
    if isinstance(image, bytes):
        image = io.BytesIO(image)
    with Image.open(image) as im:
        return np.asarray(im.convert("RGB"))


def test_tensorboard_gets_images_text_and_config(tmp_path: Path, store: Path) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = _tracked_run(tmp_path, store, "tensorboard")
    (events,) = [p for p in (run / "logs").rglob("events.out.tfevents.*") if "loss" in _tags(event_accumulator, p)]
    acc = event_accumulator.EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    lines = _metrics(run)  # x axis: steps_run (no revert here, so it equals the optimizer step)
    assert {e.step: e.value for e in acc.Scalars("loss")} == pytest.approx({m["steps_run"]: m["loss"] for m in lines})
    grids = {e.step: e.encoded_image_string for e in acc.Images("probes/grid")}
    assert grids.keys() == {m["steps_run"] for m in lines} == {1, 2, 3}
    for m in lines:
        png = run / "probes" / f"step-{m['step']:06d}.png"
        assert np.array_equal(_pixels(grids[m["steps_run"]]), _pixels(png)), m["step"]
    (agent_grid,) = acc.Images("agent/grid-00")
    assert agent_grid.step == 2
    assert np.array_equal(
        _pixels(agent_grid.encoded_image_string), _pixels(run / "agent" / "step-000002" / "grid-00.png")
    )
    text = {t: [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(t)] for t in acc.Tags()["tensors"]}
    (decision,) = text["agent/decision/text_summary"]
    assert decision.strip().startswith("step 2: continue") and "reason:" in decision
    (config,) = text["config/text_summary"]
    assert "    objective: pgot" in config and "    max_steps: 3" in config


def _wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``): a LevelDB-style log of ``wandb_internal_pb2.Record``
    (7-byte file header ``:W&B`` + magic + version; 32 KiB blocks; records of a 7-byte header (CRC, length, type
    1 full / 2 first / 3 middle / 4 last) and their bytes; a block tail shorter than a header is padding)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def test_wandb_offline_gets_the_metrics_images_text_and_config(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_SILENT": "true",
                       "WANDB_CONSOLE": "off"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    (tmp_path / "wb").mkdir()
    run = _tracked_run(tmp_path, store, "wandb")
    wandb.teardown()  # run.finish() returns before W&B's service process has written every record
    (folder,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    (log,) = folder.glob("run-*.wandb")
    rows, config = {}, {}
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            rows[row["_step"]] = row
        elif kind == "config":
            config.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.config.update})
    lines = _metrics(run)  # x axis (W&B's _step): steps_run; no revert here, so it equals the optimizer step
    assert sorted(rows) == [m["steps_run"] for m in lines] == [1, 2, 3]
    for line in lines:  # every number of metrics.jsonl, at its steps_run
        row = rows[line["steps_run"]]
        for key, value in line.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert row[key] == pytest.approx(value, rel=1e-6), key
        grid = folder / "files" / row["probes/grid/path"]
        assert np.array_equal(_pixels(grid), _pixels(run / "probes" / f"step-{line['step']:06d}.png")), line["step"]
    agent_grid = folder / "files" / rows[2]["agent/grid-00/path"]
    assert np.array_equal(_pixels(agent_grid), _pixels(run / "agent" / "step-000002" / "grid-00.png"))
    assert "step 2: continue" in (folder / "files" / rows[2]["agent/decision/path"]).read_text()
    assert config["train.objective"] == "pgot" and config["train.max_steps"] == 3
    assert config["model.resolution"] == RES and json.loads(config["train.log_with"]) == ["wandb"]


# --------------------------------------------------------------------------------------------
# The end-of-training table
# --------------------------------------------------------------------------------------------


def test_final_table_on_held_out_prompts_with_intervals_and_nonfinite_pairs(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The debug run with half of its prompts held out: the table is computed on the held-out prompts (never the
    training ones), its rates equal pgot.metrics on the scores it was given (float64), and a NaN reward of the
    tuned model counts as a collapse and a non-finite pair."""
    from pgot.prompts import load_prompts, split

    final: list[tuple[list[int], torch.Tensor]] = []  # (prompt ids, scores) of the table's two sampling calls
    in_table = {"now": False}
    sample_and_score, final_table = probes.sample_and_score, train._final_table

    def recording(cfg, model, reward_models, texts, ids, idx, seed):
        images, scores = sample_and_score(cfg, model, reward_models, texts, ids, idx, seed)
        if in_table["now"]:
            if not final:  # the tuned model is sampled first
                scores[0, 1] = float("nan")
            final.append((list(ids), scores))
        return images, scores

    def table(r):
        in_table["now"] = True
        return final_table(r)

    monkeypatch.setattr(train.probes, "sample_and_score", recording)
    monkeypatch.setattr(train, "_final_table", table)
    extra = {"prompts.eval_fraction": 0.5, "train.final_eval": True, "train.final_eval_prompts": 2,
             "train.final_eval_samples": 2, "eval.bootstrap": 200}  # fmt: skip
    cfg = _cfg(tmp_path / "run", store, **extra)
    train_set, held = split(load_prompts(cfg.prompts), 0.5, cfg.prompts.split_seed)
    train.fit(cfg)
    printed = capsys.readouterr().out
    (tuned_ids, tuned), (base_ids, base) = final  # the table samples the tuned model, then the base model
    assert tuned_ids == base_ids == [i for i in held.ids[:2] for _ in range(2)]
    assert not set(tuned_ids) & set(train_set.ids)
    assert "tuned vs base: 4 pairs, 2 held-out prompts x 2 seeds" in printed
    names = cfg.reward_names
    cells = [line.strip("|").split("|") for line in printed.splitlines() if line.startswith("| ")]
    rows = {k.strip(): v.strip() for k, v in cells}
    t, b = tuned.double(), base.double()
    set_label = "on " + ", ".join(names)
    assert rows[f"JDR_all (%) {set_label}"].startswith(tables.format_percent(float(metrics.jdr(t, b))) + " [")
    assert rows[f"JCR_all (%) {set_label}"].startswith(tables.format_percent(float(metrics.jcr(t, b))) + " [")
    assert float(metrics.jcr(t, b)) >= 0.25  # the NaN pair is a collapse
    for j, n in enumerate(names):
        assert rows[f"win rate {n} (%)"].startswith(tables.format_percent(float(metrics.win_rate(t, b)[j])))
    assert rows["pairs"] == "4" and rows["non-finite pairs"] == "1"
    assert "JCR (joint collapse rate)" in printed and "95% percentile bootstrap intervals over prompts" in printed


@pytest.mark.parametrize("normalize", ["frontier", "none"])
def test_sinkhorn_warning_is_said_once_and_counted(
    tmp_path: Path, store: Path, caplog: pytest.LogCaptureFixture, normalize: str
) -> None:
    """ot.max_iter=1 never converges: one warning for the whole run (advice that fits the config, never suggesting
    ot.normalize=frontier when it is set), and every logged step says so in metrics.jsonl's ot_unconverged."""
    import warnings

    from pgot.ot_loss import OTConvergenceWarning

    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as leaked, caplog.at_level("WARNING", logger="pgot"):
        warnings.simplefilter("always")
        train.fit(_cfg(out, store, **{"ot.max_iter": 1, "ot.tol": 1e-12, "ot.normalize": normalize,
                                      "train.max_steps": 3}))  # fmt: skip
    said = [r.getMessage() for r in caplog.records if "Sinkhorn did not reach" in r.getMessage()]
    assert len(said) == 1 and "ot.max_iter=1" in said[0]
    assert ("ot.normalize=frontier" in said[0]) == (normalize == "none")
    assert not [w for w in leaked if issubclass(w.category, OTConvergenceWarning)], "no per-step warning"
    assert [m["ot_unconverged"] for m in _metrics(out)] == [1.0, 1.0, 1.0]
