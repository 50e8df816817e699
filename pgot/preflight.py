"""Preflight: every input of a stage checked before any weight loads, and every problem reported at once.

:func:`preflight` runs first in :func:`pgot.precompute.run`, :func:`pgot.train.run` and :func:`pgot.evaluate.run`
(so notebook users get the same errors as the CLI) and behind ``--check`` on the command line. It adds to the
config's own rules (:func:`pgot.config.check`) everything that needs a file, a folder or the environment, but no
weights:

* all stages: ``model.device`` exists on this machine (:func:`pgot.devices.device_problems`); the output folder
  (``precompute.store``, ``train.output_dir``, ``eval.output_dir``) can be created and written (tried, then
  removed: :func:`output_folder`) and holds no other stage's output (:func:`pgot.run_folder.other_stage_problems`);
  the prompt file parses (``prompts.path``); the base model folder has ``model_index.json`` and its
  subfolders, or a hub id is complete in the local hub cache (``model.path``); ``model.lora_path`` is a diffusers
  LoRA file; each learned reward's checkpoint exists with the files its loader reads, and its architecture takes
  224 px images (``rewards.<i>.path`` / ``arch``; the loaders' own path logic, :func:`pgot.rewards.check`);
* ``precompute``: ``precompute.store`` can be written, and a store that is already there was built with the same
  settings (:func:`pgot.frontier.compare_settings`, model fingerprint included), so a rerun extends it;
* ``train``: ``train.output_dir`` can be written and holds no other run (unless ``train.resume``); ``train.resume``
  names a checkpoint, written by as many processes as this run has; the frontier store exists (or
  ``train.precompute_if_missing``), was built with the same settings and holds every training prompt; the
  trackers of ``train.log_with`` are installed; the agent has its key (``$agent.api_key_env``), its script and its
  reference images;
* ``eval``: the run's own checks before it loads weights, called, not copied: :func:`pgot.evaluate.generation_problems`
  (the LoRA files of ``eval.models`` and soups and their base model, distinct model names, the prompts
  ``eval.ground_truth`` must judge, ``eval.baseline``) or :func:`pgot.evaluate.manifest_models` (the manifest, the
  images it names, its models); the preference data; the vote files and the study they belong to; ``eval.runs``.

Rule: whatever a run checks before loading weights is checked here, by the same function, so ``--check`` passes
exactly the configs the run starts.

Several processes (``accelerate launch``): the preflight is a collective (:func:`preflight` with ``processes``).
The output folder is the main process's, the one that takes its lock (:func:`pgot.files.hold_folder`): only it
tries to write there, looks for a holder of its lock and reads the run it holds; every process checks the rest
(a file missing on one node is found). No process leaves before every one has checked, and each raises the same
error, so the main process never takes the lock while another still looks at the folder, and no process is left
waiting in a collective for one that stopped.

Each problem is one line that names the config key as typed on the command line (``rewards.2.path``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from accelerate import PartialState
from accelerate.utils import gather_object, is_tensorboard_available, is_wandb_available
from PIL import Image

from pgot import evaluate, human_eval, objectives, run_folder
from pgot import frontier as store_io
from pgot import rewards as reward_models
from pgot.agent import load_script
from pgot.config import STAGES, Config, ConfigError, check
from pgot.devices import device_problems, every_process, resolve_device, resolve_dtype
from pgot.files import folder_in_use
from pgot.model import check_lora_file, check_model_folder, folder_fingerprint
from pgot.prompts import PromptSet, load_prompts, split
from pgot.tiny import tiny_components, tiny_fingerprint

log = logging.getLogger(__name__)

__all__ = ["check_inputs", "output_folder", "preflight"]

_TRACKERS: dict[str, Callable[[], bool]] = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def preflight(
    cfg: Config, stage: str, processes: PartialState | None = None, known: Sequence[str] | None = None
) -> None:
    """Check ``cfg`` for ``stage`` (config rules and every input) and raise one error listing every problem.

    Nothing is loaded or left behind: no weights; an output folder is created only to see that it can be, and
    removed again.

    Args:
        cfg: the config.
        stage: ``precompute``, ``train`` or ``eval``.
        processes: the processes of an ``accelerate launch`` run (accelerate's ``PartialState``): then every
            process must call this (a collective; see the module's docstring); None: this process alone.
        known: the config's problems when they are known already (:func:`pgot.config.load_config` raised them,
            with the config as far as it could be built): they replace :func:`pgot.config.check`'s.

    Raises:
        ConfigError: (a ``ValueError``) listing every problem, one line each; under several processes, on every
            process, the same lines (a line only another process found names it: ``process 3: ...``), after the
            process group is ended.
        Exception: a check that failed in an unforeseen way (not a ``ValueError`` / ``OSError`` of an input) is
            raised as it came; under several processes after the collective, with the others stopping on a line
            that names it, so no process is left waiting for this one.
    """
    several = processes is not None and processes.num_processes > 1
    main = not several or processes.is_main_process
    failure: Exception | None = None
    try:
        problems = list(known) if known is not None else check(cfg, stage)
        count = processes.num_processes if processes is not None else 1
        problems += check_inputs(cfg, stage, skip=problems, folders=main, num_processes=count)
    except Exception as exc:  # re-raised below, after the collective the other processes wait in
        if not several:
            raise
        failure = exc
        problems = [
            f"the checks stopped with {type(exc).__name__}: {exc} (a bug in pgot's preflight; please report it)"
        ]
    if several:
        problems = _everyones(problems)
    if failure is not None:
        processes.destroy_process_group()
        raise failure
    if problems:
        error = ConfigError(list(dict.fromkeys(problems)), config=cfg)
        if several:
            processes.destroy_process_group()  # every process stops here: end the group, as end_training would
        if several or stage == "eval":  # the same lines on every process (pgot-eval: its refusal of a launch)
            every_process(error)
        raise error


def _everyones(problems: list[str]) -> list[str]:
    """The problems every process found (a collective): the main process's, then each other process's own."""
    found = gather_object([problems])  # one list per process, in rank order
    lines = list(found[0])
    for rank, theirs in enumerate(found[1:], start=1):
        lines += [f"process {rank}: {line}" for line in theirs if line not in found[0]]
    return lines


def check_inputs(
    cfg: Config, stage: str, skip: Sequence[str] = (), folders: bool = True, num_processes: int = 1
) -> list[str]:
    """Every problem with the files, folders and environment ``stage`` needs, one line each.

    Args:
        cfg: a config (that passed :func:`pgot.config.check`, or whose problems are in ``skip``).
        stage: ``precompute``, ``train`` or ``eval``.
        skip: problems already found (the config's): an input whose key one of them names is not checked again,
            so a wrong value gives one line, not two.
        folders: check the output folder (write it, look for its lock's holder and the run it holds); False on
            the processes of a launch other than the main one (see the module's docstring).
        num_processes: the processes the run will have (a checkpoint resumes only in a run of as many).

    Returns:
        One line per problem; empty when every input is in place.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}.")
    c = _Checks(cfg, skip, folders, num_processes)
    if not c.named("model.device"):  # every stage: a named device must exist here (pgot.devices.device_problems)
        c.add(device_problems(cfg.model.device))
    if stage == "eval":
        launched = evaluate.launch_problems()  # then nothing else: every process would try eval.output_dir at once
        checks = [lambda: c.add(launched)] if launched else [c.eval]
    else:
        checks = [lambda: c.prompts("train" if stage == "train" else ""), c.model, c.rewards]
        checks.append(c.precompute if stage == "precompute" else c.train)
    for run in checks:
        try:
            run()
        except (ValueError, OSError) as err:  # an input that fails in an unforeseen way (unreadable, ...) is one line
            c.add([_line(err)])
    return c.problems


def _line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:
        return f"{str(err.filename)!r}: {err.strerror or type(err).__name__} ({type(err).__name__})."
    return str(err) or type(err).__name__


# --------------------------------------------------------------------------------------------
# Checks shared by the stages
# --------------------------------------------------------------------------------------------


def output_folder(path: str, key: str, stage: str | None = None) -> list[str]:
    """Whether the folder ``path`` (config key ``key``) exists or can be created, and can be written to, and (with
    ``stage``) holds no other stage's output (:func:`pgot.run_folder.other_stage_problems`).

    Rule: the check does what the run will do: it creates the missing folders (and a file in the folder), as
    :func:`pgot.files.hold_folder` will, then removes exactly what it created, so a place the operating system
    refuses (``/proc``, a read-only mount, a folder of another user, a path under a file) is found here, whatever
    the permission bits say. A folder that existed keeps its files.

    Returns:
        One line when the folder is a file, lies under a file, cannot be created or written to, or holds another
        stage's output; else nothing.
    """
    if not str(path).strip():
        return [f"{key} is empty. Set {key} to a folder (it is created when missing)."]
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        return [f"{key}={str(path)!r} is a file, not a folder. Point {key} at a folder, or move the file away."]
    parent = p.absolute()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return [
            f"{key}={str(path)!r} cannot be created: {parent} is a file, not a folder. Point {key} at a folder "
            "under a folder."
        ]
    err = _try_write(p)
    if err is not None:
        verb = "cannot be written to" if p.is_dir() else "cannot be created"
        return [
            f"{key}={str(path)!r} {verb}: {err.strerror or err} ({type(err).__name__}). Point {key} at a writable "
            "place, or fix the permissions of that folder."
        ]
    return run_folder.other_stage_problems(p, key, stage) if stage else []


def _try_write(folder: Path, attempts: int = 5) -> OSError | None:
    """Create ``folder`` (with its missing parents) and a file in it, then remove what was created; the error the
    operating system gave, or None.

    Another process may create or remove the same folders meanwhile (another command's check or run into a
    sibling folder, ``runs/sweep/a`` and ``runs/sweep/b``): a folder it created first is not ours (kept, and no
    error), and a parent that its check removed again is created again (``attempts`` times in all).
    """
    for _ in range(attempts - 1):
        err = _try_write_once(folder)
        if not isinstance(err, FileNotFoundError):
            return err
    return _try_write_once(folder)


def _try_write_once(folder: Path) -> OSError | None:
    created: list[Path] = []
    try:
        missing = []
        q = folder.absolute()
        while not q.exists():
            missing.append(q)
            q = q.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                if d.is_dir():
                    continue  # another process created it first: not ours to remove
                if os.path.lexists(d):  # a file, or a link to nothing: what the check is there to find
                    raise
                raise FileNotFoundError(errno.ENOENT, "created and removed by another process", str(d)) from None
            created.append(d)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".pgot-check-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        return err
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass  # something else wrote there meanwhile: not ours to remove
    return None


class _Checks:
    """The checks of one config; ``problems`` collects their lines."""

    def __init__(self, cfg: Config, skip: Sequence[str], folders: bool = True, num_processes: int = 1):
        self.cfg = cfg
        self.skip = list(skip)
        self.folders = folders
        self.num_processes = num_processes
        self.problems: list[str] = []
        self.prompt_set: PromptSet | None = None
        self.model_ok = False

    def named(self, key: str) -> bool:
        """Whether an earlier problem is about ``key`` (then its input is not checked again)."""
        return any(key in line for line in self.skip + self.problems)

    def add(self, lines: Sequence[str]) -> bool:
        self.problems.extend(lines)
        return not lines

    def output_folder(self, path: str, key: str, stage: str, holder: str = "") -> bool:
        """:func:`output_folder`'s check and, with ``holder`` (what the run that takes the folder is called), that no
        other process holds the folder's lock (:func:`pgot.files.folder_in_use`); whether they passed. Without
        ``folders`` nothing is checked (another process's folder)."""
        if not self.folders:
            return True
        lines = output_folder(path, key, stage)
        if not lines and holder:
            in_use = folder_in_use(path, key=key, what=holder)
            lines = [in_use] if in_use else []
        return self.add(lines)

    # ---- prompts, model, LoRA, rewards ------------------------------------------------------

    def prompts(self, part: str = "") -> None:
        """Load the prompts; ``part`` ``train`` or ``eval``: the split that stage uses must not be empty."""
        pc = self.cfg.prompts
        if self.named("prompts."):
            return
        try:
            ps = load_prompts(pc)
        except ValueError as err:
            self.add([str(err)])
            return
        if part and pc.eval_fraction > 0:
            ps = split(ps, pc.eval_fraction, pc.split_seed)[0 if part == "train" else 1]
        if not ps.prompts:
            self.add(
                [
                    f"prompts.path={pc.path} gives no {part + ' ' if part else ''}prompts; check prompts.limit and "
                    "prompts.eval_fraction."
                ]
            )
            return
        self.prompt_set = ps

    def model(self) -> None:
        m = self.cfg.model
        if not m.tiny and not self.named("model.path"):
            try:
                check_model_folder(m.path)
                self.model_ok = True
            except ValueError as err:
                self.add([str(err)])
        elif m.tiny:
            self.model_ok = True
        if m.lora_path and not self.named("model.lora_path"):
            base = None if m.allow_lora_transfer else self.fingerprint()[0]
            self.add(check_lora_file(m.lora_path, key="model.lora_path", fingerprint=base))

    def rewards(self) -> None:
        if any(re.match(r"rewards\.\d+ must be", line) for line in self.skip):
            return  # an item that is not a reward was dropped: the indices no longer match what was typed
        named = [f"rewards.{i}." for i in range(len(self.cfg.rewards)) if self.named(f"rewards.{i}.")]
        self.add([p for p in reward_models.check(self.cfg.rewards) if not any(k in p for k in named)])

    def fingerprint(self) -> tuple[str | None, float | None]:
        """(fingerprint, scheduler shift) of the configured base model, without loading its weights."""
        m = self.cfg.model
        if not self.model_ok:
            return None, None
        if m.tiny:  # a fraction of a second: the tiny model's weights are random, built from the seed
            parts = tiny_components(m.tiny_seed)
            return tiny_fingerprint(parts, m.tiny_seed), parts["scheduler"].config.get("shift")
        folder = check_model_folder(m.path)
        shift = 1.0  # FlowMatchEulerDiscreteScheduler's default
        try:
            shift = float(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("shift", 1.0))
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        return folder_fingerprint(folder), shift

    def dtype(self) -> str | None:
        try:
            return str(resolve_dtype(self.cfg.model.dtype, resolve_device(self.cfg.model.device))).removeprefix(
                "torch."
            )
        except ValueError:
            return None

    def store(self, path: Path, key: str, *, extend: bool) -> dict | None:
        """Compare the store at ``path`` (if it has a meta.json) with the config; returns its meta."""
        try:
            meta = store_io.read_meta(path)
        except ValueError as err:
            self.add([f"{key}={path}: {err}"])
            return None
        if meta is None:
            return None
        if extend and not len(store_io.read_rows(path)):
            return None  # settings of a precompute that never finished a batch: the next run starts it afresh
        fp, shift = self.fingerprint()
        self.add(
            store_io.compare_settings(
                meta,
                self.cfg,
                store=path,
                fingerprint=fp,
                default_shift=shift,
                dtype=self.dtype() if extend else None,
                extend=extend,
            )
        )
        return meta

    # ---- stages -------------------------------------------------------------------------------

    def precompute(self) -> None:
        """``precompute.store``, the output folder: written, not held, and a store already there extends."""
        pc = self.cfg.precompute
        store = Path(pc.store)
        if not self.folders or self.named("precompute.store"):
            return
        if not self.output_folder(pc.store, "precompute.store", "precompute", "pgot-precompute"):
            return
        before = len(self.problems)
        meta = self.store(store, "precompute.store", extend=True)
        has_rows = (store / store_io.SAMPLES_FILE).is_file() or any((store / store_io.SHARDS_DIR).glob("*.parquet"))
        if meta is None and has_rows:
            self.add(
                [
                    f"precompute.store={store} holds samples but no {store_io.META_FILE}, so their settings are "
                    f"unknown. Set precompute.store to a new folder, or delete {store} to rebuild it."
                ]
            )
        elif has_rows and len(self.problems) == before:  # a rerun adds to the prompts already done: same texts
            done = store_io.completed_prompts(store, pc.samples_per_prompt)
            self.store_prompts(store, "precompute.store", done, every=False)

    def train(self) -> None:
        t = self.cfg.train
        self.prompts_per_step()
        if (
            not self.named("train.output_dir")
            and self.folders
            and self.output_folder(t.output_dir, "train.output_dir", "train", "a pgot-train run")
            and not self.named("train.resume")
        ):
            # the run-folder rules training applies (resume, config, process count)
            self.add(run_folder.folder_problems(self.cfg, self.num_processes))
        self.train_store()
        for tracker in t.log_with:
            available = _TRACKERS.get(tracker)
            if available is not None and not available():
                self.add(
                    [
                        f"train.log_with names {tracker}, which is not installed, so nothing would be logged to it. "
                        f"Install it (pip install {_TRACKER_PACKAGES[tracker]}) or remove it from train.log_with."
                    ]
                )
        self.agent()

    def prompts_per_step(self) -> None:
        """``train.prompts_per_step`` must not exceed the training prompts: a step draws P distinct prompts, and a
        prompt drawn twice would be sampled with the same noise (the same images, counted twice)."""
        t, pc, ps = self.cfg.train, self.cfg.prompts, self.prompt_set
        if ps is None or t.prompts_per_step <= len(ps.prompts) or self.named("train.prompts_per_step"):
            return
        n = len(ps.prompts)
        split_note = f" after holding out prompts.eval_fraction={pc.eval_fraction:g}" if pc.eval_fraction > 0 else ""
        limit_note = f", prompts.limit={pc.limit}" if pc.limit else ""
        self.add(
            [
                f"train.prompts_per_step={t.prompts_per_step} is larger than the {n} training prompts of "
                f"prompts.path={pc.path}{limit_note}{split_note}: a step would train the same prompt more than once, "
                f"with the same noise. Set train.prompts_per_step to at most {n}, or give more prompts "
                "(prompts.path, prompts.limit)."
            ]
        )

    def train_store(self) -> None:
        t = self.cfg.train
        if t.store:
            path, key = Path(t.store), "train.store"
        elif objectives.needs_store(t.objective, t.strategy):
            path, key = Path(self.cfg.precompute.store), "precompute.store"
        else:
            return
        if self.named(key):
            return
        complete = (path / store_io.META_FILE).is_file() and (path / store_io.SAMPLES_FILE).is_file()
        if not complete:
            if t.precompute_if_missing:  # built (or finished) first with this config: as a resumed precompute
                if self.output_folder(str(path), key, "precompute"):
                    self.store(path, key, extend=True)
                return
            try:
                store_io.load_store(path)  # raises the store's own message: what is missing and how to build it
            except ValueError as err:  # StoreNotFoundError is one
                self.add([f"{key}={path}: {err} Or set train.precompute_if_missing=true to build it first."])
            return
        if self.store(path, key, extend=False) is None or self.prompt_set is None:
            return
        if objectives.needs_store(t.objective, t.strategy):
            self.store_prompts(path, key)

    def store_prompts(self, path: Path, key: str, stored: dict[int, str] | None = None, every: bool = True) -> None:
        """The store's prompts (``stored``: id -> text, default: read from samples.parquet) must have the texts of
        the prompt set; with ``every``, each prompt of the set must be there (training looks up every front)."""
        if self.prompt_set is None:
            return
        if stored is None:
            try:
                rows = pd.read_parquet(path / store_io.SAMPLES_FILE, columns=["prompt_id", "prompt"])
            except Exception as err:  # pyarrow raises its own errors for a damaged file
                self.add([f"{key}={path}: {store_io.SAMPLES_FILE} cannot be read ({type(err).__name__}: {err})."])
                return
            stored = dict(zip(rows["prompt_id"].astype(int), rows["prompt"].astype(str), strict=True))
        ids, texts = [int(i) for i in self.prompt_set.ids], self.prompt_set.prompts
        missing = [i for i in ids if i not in stored]
        changed = [(i, t) for i, t in zip(ids, texts, strict=True) if i in stored and stored[i] != t]
        if every and missing:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            self.add(
                [
                    f"{key}={path} has no front for {len(missing)} of the {len(ids)} training prompts (prompt ids "
                    f"{shown}). Precompute the store with the same prompts settings as training (prompts.path, "
                    f"prompts.limit), or point {key} at a store computed for these prompts."
                ]
            )
        if changed:
            pid, text = changed[0]
            self.add(
                [
                    f"{key}={path}: prompt id {pid} is {text!r} in prompts.path but {stored[pid]!r} in the store "
                    f"({len(changed)} of the prompts differ): the prompt file changed since the store was built. "
                    f"Set {key} to a new folder, or delete {path} to rebuild it."
                ]
            )

    def agent(self) -> None:
        a = self.cfg.agent
        if a.backend == "none":
            return
        if a.backend == "openai" and a.api_key_env and not os.environ.get(a.api_key_env):
            self.add(
                [
                    f"agent.backend=openai reads the API key from the environment variable {a.api_key_env} "
                    "(agent.api_key_env), which is not set, so every agent call would fail. Export it, set "
                    "agent.api_key_env to the variable that holds the key, or agent.api_key_env='' for a server "
                    "without authentication."
                ]
            )
        if a.backend == "scripted" and a.script and not self.named("agent.script"):
            try:
                load_script(a.script, self.cfg.reward_names, a.every)
            except ValueError as err:
                self.add([str(err)])
        for name, path in a.references.items():
            key = f"agent.references.{name}"
            if self.named(key):
                continue
            try:
                with Image.open(path) as image:
                    image.verify()
            except (OSError, SyntaxError, ValueError) as err:
                self.add([f"{key}={path!r} is not a readable image ({err}). Fix the path or drop the entry."])

    def eval(self) -> None:
        e = self.cfg.eval
        out = Path(e.output_dir)
        if not self.named("eval.output_dir"):
            self.output_folder(e.output_dir, "eval.output_dir", "eval", "pgot-eval")
        if e.manifest:  # rescoring images on disk: no base model, no LoRA
            texts = None
            try:
                ps = load_prompts(self.cfg.prompts)
                texts = dict(zip(ps.ids, ps.prompts, strict=True))
            except ValueError:
                pass  # a manifest with prompt texts needs no prompt file
            if not self.named("eval.manifest"):
                try:  # the run's own checks: the manifest, its models, the ground truth's prompts, the baseline
                    evaluate.manifest_models(
                        self.cfg, evaluate.read_manifest(e.manifest, default_seed=e.seed, prompt_texts=texts)
                    )
                except ValueError as err:
                    self.add(str(err).splitlines())
        else:
            self.prompts("eval")
            self.model()
            prompts = self.prompt_set.prompts if self.prompt_set is not None else []
            shifted = any(re.match(r"eval\.models\.\d+ must be", line) for line in self.skip)
            if shifted:  # an item that is not a model was dropped: the indices no longer match what was typed
                self.add(evaluate.ground_truth_problems(self.cfg, prompts))
                return self.eval_rest(out)
            # the run's own checks before it loads weights (LoRA files and bases, distinct names, ground truth)
            named = [f"eval.models.{i}." for i in range(len(e.models)) if self.named(f"eval.models.{i}.")]
            lines = evaluate.generation_problems(self.cfg, prompts, self.fingerprint()[0])
            self.add([line for line in lines if not any(k in line for k in named)])
        self.eval_rest(out)

    def eval_rest(self, out: Path) -> None:
        """The eval inputs that do not depend on how the images are obtained (rewards, human data, runs)."""
        e = self.cfg.eval
        self.rewards()
        if e.preference_data and not self.named("eval.preference_data"):
            try:
                human_eval.read_preference_data(e.preference_data)
            except ValueError as err:
                self.add([str(err)])
        if e.votes:
            self.votes(out)
        if e.runs and not self.named("eval.runs"):
            try:
                evaluate.read_training_curves(e.runs)
            except ValueError as err:
                self.add([str(err)])

    def votes(self, out: Path) -> None:
        e = self.cfg.eval
        key_file = out / "study" / "key.json"
        missing = [f"eval.votes.{i}={str(v)!r} does not exist." for i, v in enumerate(e.votes) if not Path(v).is_file()]
        if not self.add(missing):
            return
        if key_file.is_file():
            try:
                human_eval.tally_votes(e.votes, key_file, e.confidence)
            except (ValueError, KeyError, OSError) as err:
                self.add([str(err) if isinstance(err, ValueError) else f"{key_file} is damaged ({err!r})."])
        elif e.study_pairs == 0:
            self.add(
                [
                    f"eval.votes is set but {key_file} does not exist. Tally votes with the eval.output_dir whose "
                    "study/study.html the annotators used (written with eval.study_pairs > 0)."
                ]
            )
