"""``pgot-eval``: compare models on the same prompts and noise; write scores, tables, figures and a user study.

:func:`run` reads the ``eval`` section and writes an evaluation folder::

    <eval.output_dir>/
      config.yaml          the resolved config
      scores.parquet       one row per image: model, prompt_id, prompt, seed, sample_index, one column per
                           reward, quality (the ground truth, with eval.ground_truth), path (image file, may be
                           empty), source (hash of what produced the row)
      results.md / .csv / .tex
                           Table 3 layout (per-reward win rate, JDR, JCR against eval.baseline, with the
                           baseline-vs-baseline 0/0 sanity row), Table 5 layout (mean score of every reward),
                           bootstrap confidence intervals over prompts for every number; Table 1 (reward
                           preference accuracy) and Table 6 (user-study win rates) when configured
      figures/             pareto_<x>_<y>.png (Fig. 3), prompt_boxplots.png (Fig. 8), training_curves.png (Fig. 4)
      images/<model>/      generated images (eval.save_images, or when a user study is written)
      study/study.html     self-contained user-study page (eval.study_pairs > 0) and study/key.json

Where the images come from:

* **generation** (default): ``eval.models`` lists the base model (no ``lora``), LoRA checkpoints (a diffusers
  LoRA file, a folder holding one, or a pgot run folder, which uses ``final/``) and reward soups (``soup``:
  LoRA path -> weight, the paper's inference-time baseline). Every model generates every (prompt, sample)
  with the noise of ``(eval.seed, prompt_id, sample_index)`` (:func:`pgot.generate.make_noise`), in the
  same batch layout (``eval.batch_size``), so row pairs differ only by the weights.
* **rescoring** (``eval.manifest``): images already on disk, from pgot or any other pipeline. The manifest
  is a .csv / .jsonl / .parquet file (or a folder holding ``manifest.*``) with columns ``model``, ``prompt``
  and/or ``prompt_id``, ``seed`` and/or ``sample_index`` and ``path`` (relative to the manifest's folder).
  Rows of different models pair on ``(prompt_id, seed, sample_index)``.

Reruns are incremental: a model whose rows in ``scores.parquet`` were produced by the same weights, rewards
and sampler settings (the ``source`` hash) for the same keys is not generated again; the rows of each newly
scored model are appended atomically as soon as it is done, so a crash keeps every finished model.

This module is the runner: model specs, generation and rescoring, the score cache, manifest and training-curve
reading. Numbers come from :mod:`pgot.metrics`, tables are formatted by :mod:`pgot.tables`, figures drawn by
:mod:`pgot.plots`, and reward preference accuracy and the user study live in :mod:`pgot.human_eval`. At the
end, :func:`run` prints the main table (win rate, JDR, JCR with intervals) and one-line definitions of JDR and JCR.

**Ground truth** (``eval.ground_truth=testbed``): in a world whose true quality is known (the reward-hacking
testbed), every image is also scored by its judge (:func:`ground_truth_quality`; a ``quality`` column, never a
reward), the Table 3 section gains the ground-truth columns of :func:`pgot.metrics.ground_truth_table` (quality
change, improved, fell, hacked rate per reward set) and the Table 5 section the mean quality. Every prompt must be a
sentence of the testbed grammar (:func:`ground_truth_problems`, checked before anything is generated).

``eval.runs`` entries are run folders, optionally labelled for the figure legend: ``PG-OT=runs/pgot``; without a
label the legend shows the folder name and what the run trained, from its ``config.yaml`` (``"pgot (PG-OT
offline)"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
import yaml

from pgot import human_eval, metrics, plots, tables
from pgot.arrays import table_tensor
from pgot.devices import launch_size, resolve_device
from pgot.files import atomic_write, atomic_write_json, atomic_write_parquet, hold_folder, source_hash
from pgot.images import load_image, save_png
from pgot.model import check_lora_file, load_lora, load_lora_soup, load_model, resolve_lora_file
from pgot.prompts import SAMPLE_KEY, find_table, read_table
from pgot.rewards import score_images
from pgot.testbed import judge

if TYPE_CHECKING:
    from pgot.config import Config, EvalModelConfig

__all__ = [
    "KEY",
    "ModelSpec",
    "check_bases",
    "generation_problems",
    "ground_truth_problems",
    "ground_truth_quality",
    "manifest_models",
    "model_specs",
    "read_manifest",
    "read_scores",
    "read_training_curves",
    "run",
]

log = logging.getLogger(__name__)

KEY = SAMPLE_KEY
"""Columns that pair rows across models (:data:`pgot.prompts.SAMPLE_KEY`)."""

_BASE_COLUMNS = ["model", "prompt_id", "prompt", "seed", "sample_index"]


# --------------------------------------------------------------------------------------------
# Model specs
# --------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """One model to evaluate, with resolved LoRA files."""

    name: str
    lora: Path | None = None
    """The LoRA file (resolved from a file, a folder or a run folder), or None for the base model."""
    lora_scale: float = 1.0
    soup: dict[Path, float] = field(default_factory=dict)
    """LoRA file -> weight of a reward soup."""
    key: str = ""
    """The config key of its LoRA files (``eval.models.1.lora``, ``eval.models.2.soup``), named in errors."""
    allow_lora_transfer: bool = False
    """Apply LoRAs recorded as trained on another base model (``eval.models.<i>.allow_lora_transfer``)."""

    @property
    def files(self) -> list[Path]:
        return list(self.soup) if self.soup else ([self.lora] if self.lora is not None else [])


def model_specs(models: Sequence[EvalModelConfig], fingerprint: str | None = None) -> list[ModelSpec]:
    """Resolve ``eval.models`` (default: the base model alone) into :class:`ModelSpec` with checked LoRA files.

    Every LoRA file is checked from its header (:func:`pgot.model.check_lora_file`: a LoRA of the SD3 transformer
    in a naming pgot reads, complete), before any model loads; every problem of every model is reported at once.
    The preflight (``--check``) calls this same function, so it refuses what the run refuses.

    Args:
        models: ``eval.models``.
        fingerprint: the base model's fingerprint, when known without loading it (the preflight): each LoRA that
            records another base is refused too (as :func:`check_bases`, unless ``allow_lora_transfer``).

    Raises:
        ValueError: a LoRA path that does not exist or is not a usable LoRA file, or two models with the same name
            (one line per problem).
    """
    if not models:
        return [ModelSpec(name="base")]
    specs, problems = [], []
    for i, m in enumerate(models):
        name = m.resolved_name(i)
        spec = ModelSpec(name=name, allow_lora_transfer=m.allow_lora_transfer)
        paths = list(m.soup) if m.soup else ([m.lora] if m.lora else [])
        spec.key = f"eval.models.{i}.soup" if m.soup else f"eval.models.{i}.lora"
        files = []
        for p in paths:
            try:
                files.append(resolve_lora_file(p, spec.key))
            except ValueError as exc:
                problems.append(str(exc))
                continue
            base = None if m.allow_lora_transfer else fingerprint
            problems += check_lora_file(files[-1], key=spec.key, fingerprint=base)
        if len(files) == len(paths):
            if m.soup:
                spec.soup = {f: float(w) for f, w in zip(files, m.soup.values(), strict=True)}
            elif m.lora:
                spec.lora, spec.lora_scale = files[0], m.lora_scale
        specs.append(spec)
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        problems.append(
            f"eval.models has several models named {', '.join(map(repr, dup))}; give each a distinct eval.models.<i>.name."
        )
    if problems:
        raise ValueError("\n".join(problems))
    return specs


def check_bases(specs: Sequence[ModelSpec], fingerprint: str) -> None:
    """Check, before anything is generated, that every LoRA of ``specs`` was trained on the base model ``fingerprint``
    (where the file records its base; :func:`pgot.model.check_lora_file`).

    Raises:
        ValueError: every LoRA recorded as trained on another base model whose eval model does not set
            ``eval.models.<i>.allow_lora_transfer``, one line each.
    """
    problems = []
    for spec in specs:
        if spec.allow_lora_transfer:
            continue
        for f in spec.files:
            problems += check_lora_file(f, key=spec.key, fingerprint=fingerprint)
    if problems:
        raise ValueError("\n".join(problems))


# --------------------------------------------------------------------------------------------
# Scores file
# --------------------------------------------------------------------------------------------


def read_scores(path: str | Path) -> pd.DataFrame:
    """``scores.parquet`` as a frame (empty frame with the key columns when the file does not exist)."""
    p = Path(path)
    if not p.is_file():
        return pd.DataFrame({c: pd.Series(dtype="int64" if c in KEY else "str") for c in _BASE_COLUMNS})
    return pd.read_parquet(p)


def _replace_model_rows(path: Path, model: str, rows: pd.DataFrame) -> pd.DataFrame:
    """Replace ``model``'s rows in ``scores.parquet`` by ``rows`` (atomic; other models untouched)."""
    old = read_scores(path)
    old = old[old["model"] != model]
    new = pd.concat([old, rows], ignore_index=True) if len(old) else rows.reset_index(drop=True)
    lead = [c for c in _BASE_COLUMNS if c in new]
    new = new[lead + [c for c in new.columns if c not in lead]]
    atomic_write_parquet(new, path)
    return new


def _is_complete(
    scores: pd.DataFrame, model: str, keys: pd.DataFrame, reward_names: Sequence[str], source: str
) -> bool:
    """True when ``scores`` holds exactly ``keys`` for ``model``, from ``source``, with every reward column (and the
    ``quality`` column when ``reward_names`` names it)."""
    if any(r not in scores.columns for r in reward_names) or "source" not in scores.columns:
        return False
    rows = scores[scores["model"] == model]
    if len(rows) != len(keys) or not (rows["source"] == source).all():
        return False
    have = set(map(tuple, rows[KEY].to_numpy().tolist()))
    want = set(map(tuple, keys[KEY].to_numpy().tolist()))
    return have == want


def _has_images(rows: pd.DataFrame, root: Path) -> bool:
    """Every row names an image file that exists (relative paths start at ``root``)."""
    if "path" not in rows:
        return False
    return all(bool(p) and (root / str(p)).is_file() for p in rows["path"].fillna(""))


def _sha1_file(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _reward_identity(cfg: Config) -> list[dict]:
    return [
        {"name": r.name, "path": r.path, "arch": r.arch, "dtype": r.dtype, "tiny_seed": r.tiny_seed}
        for r in cfg.rewards
    ]


def _identity(cfg: Config, ident: dict) -> dict:
    """``ident`` (what produced a model's rows) plus the ground truth when one judges them: rows scored without it are
    scored again (the key is absent without a ground truth, so existing evaluation folders keep their hashes)."""
    return ident | {"ground_truth": cfg.eval.ground_truth} if cfg.eval.ground_truth != "none" else ident


def _columns(cfg: Config) -> list[str]:
    """The score columns of every row: the rewards, then ``quality`` with a ground truth."""
    return cfg.reward_names + ([metrics.QUALITY] if cfg.eval.ground_truth != "none" else [])


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------


def ground_truth_quality(
    kind: str, images: torch.Tensor | Sequence[torch.Tensor], prompts: Sequence[str]
) -> torch.Tensor:
    """The ground-truth quality of images under ``eval.ground_truth=kind``: one home for every stage that judges.

    Args:
        kind: ``testbed`` (:func:`pgot.testbed.judge.quality`).
        images: ``(B, 3, H, W)`` in [0, 1], or B ``(3, H, W)`` images (read from disk) of one size.
        prompts: B prompt texts.

    Returns:
        ``(B,)`` float64 on the CPU, in [0, 1].

    Raises:
        ValueError: an unknown ``kind``, images of another size than the judge's world (32 x 32 for the testbed),
            or a prompt outside its grammar.
    """
    if kind != "testbed":
        raise ValueError(f"eval.ground_truth must be testbed to judge images, got {kind!r}.")
    if not isinstance(images, torch.Tensor):
        sizes = sorted({tuple(im.shape[-2:]) for im in images})
        if len(sizes) > 1:
            raise ValueError(
                f"eval.ground_truth=testbed: the images have several sizes ({', '.join(f'{h}x{w}' for h, w in sizes)}); "
                "the testbed judge scores 32 x 32 images of the testbed world."
            )
        images = torch.stack([im.float() for im in images]) if len(images) else torch.zeros(0, 3, 32, 32)
    try:
        return judge.quality(images.detach().float().cpu(), list(prompts)).double()
    except ValueError as exc:
        raise ValueError(f"eval.ground_truth=testbed: {exc}") from None


def ground_truth_problems(cfg: Config, prompts: Sequence[str] | None = None) -> list[str]:
    """What keeps ``eval.ground_truth`` from judging: one line per problem (empty when it can, or when it is ``none``).

    The testbed judge knows the testbed world only: 32 x 32 images (``model.resolution``, a config check) of prompts
    of its grammar (``a {size} {colour} {shape} on a {background} background``). Every prompt is parsed here, before
    any image is generated.

    Args:
        cfg: the config.
        prompts: the prompts to judge; default: those of ``prompts.path`` (with ``prompts.limit``).

    Returns:
        Problem lines naming ``eval.ground_truth`` and ``prompts.path``; at most 5 prompts are quoted.
    """
    if cfg.eval.ground_truth == "none":
        return []
    from pgot.prompts import load_prompts
    from pgot.testbed.scenes import grammar_problems

    if prompts is None:
        try:
            prompts = load_prompts(cfg.prompts).prompts
        except ValueError:
            return []  # the prompt file's own problems are reported by the preflight
    problem = grammar_problems(list(prompts))  # the grammar stated once, at most 5 prompts quoted
    if problem is None:
        return []
    return [
        f"eval.ground_truth=testbed judges prompts of the testbed grammar only; prompts.path={cfg.prompts.path}: "
        f"{problem} Use prompts.path=builtin:testbed (or a file of such prompts), or set eval.ground_truth=none."
    ]


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _eval_prompts(cfg: Config) -> tuple[list[str], list[int]]:
    from pgot.prompts import load_prompts, split

    ps = load_prompts(cfg.prompts)
    if cfg.prompts.eval_fraction > 0:
        ps = split(ps, cfg.prompts.eval_fraction, cfg.prompts.split_seed)[1]
    if not ps.prompts:
        raise ValueError("no prompts to evaluate. Check prompts.path, prompts.limit and prompts.eval_fraction.")
    return list(ps.prompts), [int(i) for i in ps.ids]


def _activate(model: Any, spec: ModelSpec) -> list[str]:
    """Load ``spec``'s LoRA or soup into ``model`` through :mod:`pgot.model`'s one loading path: every tensor of every
    file reaches the transformer, or nothing is loaded and the error names the config key."""
    if not spec.files:
        return []
    prefix = "eval_" + _safe(spec.name).replace(".", "_")  # peft adapter names must not hold dots
    kw = {
        "key": spec.key or None,
        "label": f" of eval model {spec.name!r}",
        "allow_other_base": spec.allow_lora_transfer,
    }
    if spec.soup:
        return load_lora_soup(model, {str(p): w for p, w in spec.soup.items()}, prefix=prefix, **kw)
    return [load_lora(model, str(spec.lora), scale=spec.lora_scale, adapter_name=prefix, **kw)]


def _deactivate(model: Any, names: list[str]) -> None:
    if names:
        model.transformer.delete_adapters(names)
    model.adapter_weights = {}


def _generate_batch(cfg: Config, model: Any, rewards: list, chunk: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(b, 3, H, W)`` of the rows of ``chunk`` (noise from eval.seed, prompt_id, sample_index) and scores ``(b, M)``."""
    from pgot.generate import generate

    with torch.no_grad():
        images = generate(
            model,
            chunk["prompt"].tolist(),
            table_tensor(chunk["prompt_id"].to_numpy()),
            table_tensor(chunk["sample_index"].to_numpy()),
            cfg.eval.seed,
            **dataclasses.asdict(cfg.draft) | {"k": 0},
            cache_dir=cfg.model.embedding_cache or None,
        ).float()
        s = score_images(rewards, list(images), chunk["prompt"].tolist(), len(chunk), images.device)
    return images, s


def _determinism_check(cfg: Config, model: Any, rewards: list, name: str, first: pd.DataFrame, out: Path) -> None:
    """Generate the baseline's first batch again and compare: the 0/0 sanity check of seeds and batch layout."""
    _, again = _generate_batch(cfg, model, rewards, first)
    before = table_tensor(first[cfg.reward_names].to_numpy(), "float64")
    diff = (again - before).abs()
    report = {
        "model": name,
        "images": len(first),
        "max_abs_diff": float(diff.nan_to_num(nan=float("inf")).max()) if diff.numel() else 0.0,
        "jdr": float(metrics.jdr(again, before)),
        "jcr": float(metrics.jcr(again, before)),
    }
    atomic_write_json(out / "determinism.json", report, indent=1)
    if report["max_abs_diff"] > 0:
        log.warning(
            "%s regenerated with the same seeds and batch layout gives different rewards (max |diff| %.3g, JDR %.3f, "
            "JCR %.3f): paired comparisons carry this noise (non-deterministic kernels?)",
            name, report["max_abs_diff"], report["jdr"], report["jcr"],
        )  # fmt: skip


def _generate_and_score(
    cfg: Config,
    specs: list[ModelSpec],
    baseline: str,
    scores_path: Path,
    out: Path,
    rewards_factory: Any,
) -> None:
    from tqdm.auto import tqdm

    e = cfg.eval
    prompts, ids = _eval_prompts(cfg)
    n = e.samples_per_prompt
    keys = pd.DataFrame(
        {
            "prompt_id": [pid for pid in ids for _ in range(n)],
            "prompt": [p for p in prompts for _ in range(n)],
            "seed": e.seed,
            "sample_index": [i for _ in ids for i in range(n)],
        }
    )  # prompt-major rows: the batch layout is the same for every model
    save_images = e.save_images or e.study_pairs > 0
    existing = read_scores(scores_path)
    sampler = {
        "draft": {
            "num_steps": cfg.draft.num_steps,
            "guidance_scale": cfg.draft.guidance_scale,
            "shift": cfg.draft.shift,
        },
        "resolution": cfg.model.resolution,
        "dtype": cfg.model.dtype,
        "batch_size": e.batch_size,
    }
    model = load_model(cfg.model)
    check_bases(specs, model.fingerprint)  # before generating anything
    rewards = None
    for spec in specs:
        ident = {
            "base": model.fingerprint,
            "sampler": sampler,
            "rewards": _reward_identity(cfg),
            "files": {str(f): _sha1_file(f) for f in spec.files},
            "weights": {str(f): w for f, w in spec.soup.items()} if spec.soup else spec.lora_scale,
        }
        source = source_hash(_identity(cfg, ident))
        mine = existing[existing["model"] == spec.name]
        if _is_complete(existing, spec.name, keys, _columns(cfg), source) and (
            not save_images or _has_images(mine, out)
        ):
            log.info("%s: already scored (%d rows), skipping", spec.name, len(keys))
            continue
        if rewards is None:
            rewards = rewards_factory(resolve_device(cfg.model.device))
        names = _activate(model, spec)
        try:
            log.info("%s: generating %d images (%d prompts x %d samples)", spec.name, len(keys), len(prompts), n)
            rows = []
            for start in tqdm(range(0, len(keys), e.batch_size), desc=spec.name, unit="batch", leave=False):
                chunk = keys.iloc[start : start + e.batch_size].copy()
                images, s = _generate_batch(cfg, model, rewards, chunk)
                for m, rname in enumerate(cfg.reward_names):
                    chunk[rname] = s[:, m].numpy()
                if e.ground_truth != "none":
                    chunk[metrics.QUALITY] = ground_truth_quality(e.ground_truth, images, chunk["prompt"]).numpy()
                chunk["path"] = ""
                if save_images:
                    for b, r in enumerate(chunk.itertuples()):
                        rel = Path("images") / _safe(spec.name) / f"{r.prompt_id}-{r.seed}-{r.sample_index}.png"
                        save_png(images[b], out / rel)
                        chunk.iloc[b, chunk.columns.get_loc("path")] = rel.as_posix()
                rows.append(chunk)
            if spec.name == baseline:
                _determinism_check(cfg, model, rewards, spec.name, rows[0], out)
        finally:
            _deactivate(model, names)
        frame = pd.concat(rows, ignore_index=True)
        frame.insert(0, "model", spec.name)
        frame["source"] = source
        existing = _replace_model_rows(scores_path, spec.name, frame)
        log.info("%s: scored, %s", spec.name, scores_path)


# --------------------------------------------------------------------------------------------
# Rescoring images on disk
# --------------------------------------------------------------------------------------------


def read_manifest(
    path: str | Path, default_seed: int = 0, prompt_texts: Mapping[int, str] | None = None
) -> pd.DataFrame:
    """Read and check a manifest of images on disk.

    The file is read by :func:`pgot.prompts.read_table` (BOM, CRLF, empty cells: an empty ``prompt`` cell is the
    prompt ``""``; an empty ``model`` or ``path`` cell, or a row with neither ``prompt`` nor ``prompt_id``, is an
    error naming its line and column; every unusable row is listed at once).

    Args:
        path: a .csv / .jsonl / .json / .parquet file, or a folder holding ``manifest.{csv,jsonl,json,parquet}``.
        default_seed: ``seed`` of rows when the manifest has no ``seed`` column.
        prompt_texts: prompt id -> text, for rows that give only ``prompt_id``.

    Returns:
        Columns ``model``, ``prompt_id``, ``prompt``, ``seed``, ``sample_index``, ``path`` (absolute); the index
        holds each row's line in the file. A row without ``prompt_id`` takes the id of the same text in another row,
        else its id in ``prompt_texts`` when that holds every such text, else a new id (distinct texts numbered in
        order of first appearance, after the ids in the file); a row without text takes it from ``prompt_texts``.
        Without ``sample_index`` it is 0 (pairs then match on ``seed``).

    Raises:
        ValueError: missing columns or values, prompt ids without text, duplicate keys, or images that do not exist
            (each named by its line).
    """
    file = find_table(str(path), "eval.manifest")
    df = read_table(
        file,
        required=["model", ("prompt", "prompt_id"), "path"],
        text_columns=["prompt"],
        integer_columns=["prompt_id", "seed", "sample_index"],
        key="eval.manifest",
        hint="A manifest needs the columns model, prompt (or prompt_id), path, and seed and/or sample_index.",
    )
    where = f"eval.manifest={str(file)!r}"
    lines = [int(x) for x in df.index]
    n = len(df)
    texts: list[str | None] = list(df["prompt"]) if "prompt" in df else [None] * n
    ids: list[int | None] = (
        [None if pd.isna(v) else int(v) for v in df["prompt_id"]] if "prompt_id" in df else [None] * n
    )
    by_text = {t: i for t, i in zip(texts, ids, strict=True) if t is not None and i is not None}
    known = dict(prompt_texts or {})
    unknown = [(line, i) for line, t, i in zip(lines, texts, ids, strict=True) if t is None and i not in known]
    if unknown:
        shown = ", ".join(f"line {line} (prompt_id {i})" for line, i in unknown[:10])
        raise ValueError(
            f"{where} gives prompt_id without prompt text in {len(unknown)} rows whose ids are not in the prompt set "
            f"(prompts.path): {shown}. Add a prompt column, or point prompts.path at the prompts the ids refer to."
        )
    missing_ids = [t for t, i in zip(texts, ids, strict=True) if i is None and t not in by_text]
    by_known_text = {t: i for i, t in known.items()}
    if missing_ids and all(t in by_known_text for t in missing_ids):
        by_text.update({t: by_known_text[t] for t in missing_ids})  # every text is in the prompt set: its ids
    else:
        start = max([i for i in ids if i is not None], default=-1) + 1
        for t in dict.fromkeys(missing_ids):
            by_text[t] = start
            start += 1
    out = pd.DataFrame(index=df.index)
    out["model"] = df["model"].astype(str)
    out["prompt_id"] = [i if i is not None else by_text[t] for t, i in zip(texts, ids, strict=True)]
    out["prompt_id"] = out["prompt_id"].astype("int64")
    out["prompt"] = [t if t is not None else known[i] for t, i in zip(texts, out["prompt_id"], strict=True)]
    out["seed"] = df["seed"].astype("int64") if "seed" in df else int(default_seed)
    out["sample_index"] = df["sample_index"].astype("int64") if "sample_index" in df else 0
    base = file.parent
    out["path"] = [str(p if p.is_absolute() else (base / p)) for p in map(Path, df["path"].astype(str))]
    dup = out.duplicated(subset=["model", *KEY], keep=False)
    if dup.any():
        groups = out[dup].groupby(["model", *KEY], sort=False)
        shown = "; ".join(
            f"lines {', '.join(str(x) for x in g.index)} (model {k[0]!r}, prompt_id {k[1]}, seed {k[2]}, "
            f"sample_index {k[3]})"
            for k, g in list(groups)[:5]
        )
        raise ValueError(
            f"{where} has {int(dup.sum())} rows sharing (model, prompt_id, seed, sample_index): {shown}. Give each "
            "image a distinct seed or sample_index, or delete the repeated rows."
        )
    absent = [(line, p) for line, p in zip(out.index, out["path"], strict=True) if not Path(p).is_file()]
    if absent:
        shown = "\n  ".join(f"line {line}: {p}" for line, p in absent[:5])
        raise ValueError(
            f"{where}: {len(absent)} of {len(out)} images do not exist, e.g.\n  {shown}\n"
            "Paths are relative to the manifest's folder; fix the paths or remove those rows."
        )
    return out[_BASE_COLUMNS + ["path"]]


def _rescore(
    cfg: Config, specs_order: list[str], manifest: pd.DataFrame, scores_path: Path, rewards_factory: Any
) -> None:
    existing = read_scores(scores_path)
    for name in specs_order:
        rows = manifest[manifest["model"] == name].reset_index(drop=True)
        files = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in rows["path"]]
        source = source_hash(
            _identity(
                cfg,
                {
                    "manifest": rows[KEY + ["prompt"]].to_numpy().tolist(),
                    "files": files,
                    "rewards": _reward_identity(cfg),
                },
            )
        )
        if _is_complete(existing, name, rows, _columns(cfg), source):
            log.info("%s: already scored (%d rows), skipping", name, len(rows))
            continue
        device = resolve_device(cfg.model.device)
        rewards = rewards_factory(device)  # built once
        log.info("%s: rescoring %d images", name, len(rows))
        chunks, judged = [], []
        for start in range(0, len(rows), cfg.eval.batch_size):
            part = rows.iloc[start : start + cfg.eval.batch_size]
            images = [load_image(p) for p in part["path"]]
            chunks.append(score_images(rewards, images, part["prompt"].tolist(), cfg.eval.batch_size, device))
            if cfg.eval.ground_truth != "none":
                try:
                    judged.append(ground_truth_quality(cfg.eval.ground_truth, images, part["prompt"]))
                except ValueError as exc:
                    raise ValueError(
                        f"eval.manifest, model {name!r} (lines {part.index[0]}-{part.index[-1]}): {exc}"
                    ) from None
        s = torch.cat(chunks) if chunks else torch.zeros(0, len(cfg.rewards), dtype=torch.float64)
        frame = rows[_BASE_COLUMNS].copy()
        for m, rname in enumerate(cfg.reward_names):
            frame[rname] = s[:, m].numpy()
        if cfg.eval.ground_truth != "none":
            frame[metrics.QUALITY] = (torch.cat(judged) if judged else torch.zeros(0, dtype=torch.float64)).numpy()
        frame["path"] = rows["path"]
        frame["source"] = source
        existing = _replace_model_rows(scores_path, name, frame)


# --------------------------------------------------------------------------------------------
# Pairing rows across models
# --------------------------------------------------------------------------------------------


def _paired(
    df: pd.DataFrame, models: Sequence[str], reward_names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rows of every model on the keys that all models share, in the same order: name -> (B, M), groups (B,)."""
    common = None
    for m in models:
        k = df.loc[df["model"] == m, KEY].drop_duplicates()
        common = k if common is None else common.merge(k, on=KEY)
    assert common is not None
    common = common.sort_values(KEY).reset_index(drop=True)
    for m in models:
        extra = int((df["model"] == m).sum()) - len(common)
        if extra:
            log.warning(
                "%s: %d samples have no counterpart in every model and are left out of the paired rates", m, extra
            )
    out = {}
    for m in models:
        rows = common.merge(df[df["model"] == m], on=KEY, how="left")
        out[m] = table_tensor(rows[list(reward_names)].to_numpy(), "float64")
    return out, table_tensor(common["prompt_id"].to_numpy(), "int64")


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


_OBJECTIVE_WORDS = {
    "pgot": "PG-OT",
    "single_reward": "single reward",
    "weighted_sum": "weighted sum",
    "hetero_weighted_sum": "weighted sum, per-prompt bounds",
    "separate_constraints": "separate constraints",
}


def _split_label(entry: str) -> tuple[str, str]:
    """``"label=path"`` -> ``(label, path)``; a plain path (or an existing path holding ``=``) -> ``("", path)``."""
    if "=" in entry and not Path(entry).expanduser().exists():
        label, path = (x.strip() for x in entry.split("=", 1))
        if label and path:
            return label, path
    return "", entry


def _run_config(folder: Path) -> dict:
    """A run's ``config.yaml`` as a dict (empty when missing or unreadable)."""
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _run_description(cfg: Mapping[str, Any]) -> str:
    """What a run trained, in words (``"PG-OT offline"``, ``"single reward: hps"``), from its config; may be empty."""
    train = cfg.get("train")
    if not isinstance(train, dict) or "objective" not in train:
        return ""
    objective = str(train["objective"])
    words = _OBJECTIVE_WORDS.get(objective, objective)
    if objective == "pgot" and train.get("strategy"):
        words += f" {train['strategy']}"
    active = train.get("active_rewards") or []
    if objective == "single_reward" and active:
        words += ": " + ", ".join(map(str, active))
    return words


def _probe_reward_sets(cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """The reward sets of a run's probe JDR / JCR (``train.reward_sets``, default all rewards as ``all``)."""
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    sets = train.get("reward_sets") if isinstance(train.get("reward_sets"), dict) else {}
    if sets:
        return {str(k): [str(n) for n in v] for k, v in sets.items() if isinstance(v, list)}
    rewards = cfg.get("rewards") if isinstance(cfg.get("rewards"), list) else []
    names = [str(r["name"]) for r in rewards if isinstance(r, dict) and r.get("name")]
    return {"all": names} if names else {}


def read_training_curves(runs: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Read ``probe/*`` metrics from each run's ``metrics.jsonl``: run label -> frame (``step`` + probe columns).

    Each entry of ``runs`` (``eval.runs``) is a run folder (or its ``metrics.jsonl``), optionally preceded by
    the label to show in figure legends: ``"PG-OT=runs/pgot"``. Without a label, the label is the folder's name
    followed by what the run trained, read from the run's ``config.yaml`` (``"pgot (PG-OT offline)"``,
    ``"ws (weighted sum)"``), or the folder's name alone without a readable config. A label already taken is
    prefixed by the parent folder's name. Lines that are not JSON objects (a run killed mid-write) are skipped
    with a warning. Event lines (``{"event": ...}``) are not metrics; at an agent revert (``{"event": "revert",
    "to_step": s}``) the lines of the abandoned branch (steps after ``s``) are dropped, so each curve is the
    history of the model the run ended with. Each frame's ``attrs["reward_sets"]`` holds the run's probe reward
    sets (set -> rewards) when its config says, for figure titles.

    Raises:
        ValueError: an entry without a ``metrics.jsonl``.
    """
    curves: dict[str, pd.DataFrame] = {}
    for entry in runs:
        given, run = _split_label(str(entry))
        p = Path(run).expanduser()
        f = p / "metrics.jsonl" if p.is_dir() else p
        if not f.is_file():
            raise ValueError(
                f"eval.runs names {entry!r}, which has no metrics.jsonl. Point eval.runs at pgot-train run folders "
                "(optionally labelled: 'label=folder')."
            )
        records = []
        for i, line in enumerate(f.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON; skipped", f, i + 1)
                continue
            if isinstance(rec, dict) and rec.get("event") == "revert" and "to_step" in rec:
                records = [r for r in records if r["step"] <= rec["to_step"]]  # the abandoned branch
            elif (
                isinstance(rec, dict)
                and "event" not in rec
                and "step" in rec
                and any(k.startswith("probe/") for k in rec)
            ):
                records.append({"step": rec["step"], **{k: v for k, v in rec.items() if k.startswith("probe/")}})
        run_cfg = _run_config(f.parent)
        label = given
        if not label:
            what = _run_description(run_cfg)
            label = f"{f.parent.name} ({what})" if what else f.parent.name
        if label in curves:
            label = f"{f.parent.parent.name}/{label}"
        frame = pd.DataFrame(records, columns=None if records else ["step"])
        frame.attrs["reward_sets"] = _probe_reward_sets(run_cfg)
        curves[label] = frame
    return curves


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


def _baseline(cfg: Config, models: Sequence[str]) -> str:
    """``eval.baseline``, or the first model; it must be one of the evaluated ``models``."""
    baseline = cfg.eval.baseline or models[0]
    if baseline not in models:
        raise ValueError(f"eval.baseline is {baseline!r}, not one of the evaluated models ({', '.join(models)}).")
    return baseline


def _rewards_factory(cfg: Config) -> Any:
    """A function device -> the configured rewards, built once on first call."""
    built: list = []

    def build(device: torch.device) -> list:
        if not built:
            from pgot.rewards import build as build_rewards

            built.extend(build_rewards(list(cfg.rewards), device=device))
        return built

    return build


def manifest_models(cfg: Config, manifest: pd.DataFrame) -> list[str]:
    """The models of ``eval.manifest`` to rescore (``eval.models``' names, default: every model of the manifest),
    checked before anything is scored; the preflight calls this same function.

    Raises:
        ValueError: ``eval.models`` names a model the manifest lacks; ``eval.ground_truth`` cannot judge the
            manifest's prompts (:func:`ground_truth_problems`); ``eval.baseline`` is not among the models.
    """
    e = cfg.eval
    in_manifest = list(dict.fromkeys(manifest["model"]))
    models = [m.name for m in e.models if m.name] or in_manifest
    unknown = [m for m in models if m not in in_manifest]
    if unknown:
        raise ValueError(
            f"eval.models names {', '.join(map(repr, unknown))}, which eval.manifest does not have (it has "
            f"{', '.join(in_manifest)}). Name models as in the manifest's model column, or leave eval.models empty."
        )
    problems = ground_truth_problems(cfg, manifest.loc[manifest["model"].isin(models), "prompt"].tolist())
    if problems:
        raise ValueError(
            "\n".join(p.replace(f"prompts.path={cfg.prompts.path}", f"eval.manifest={e.manifest}") for p in problems)
        )
    _baseline(cfg, models)
    return models


def generation_problems(cfg: Config, prompts: Sequence[str], fingerprint: str | None = None) -> list[str]:
    """Everything :func:`run` checks before it loads weights to generate: ``eval.models`` (:func:`model_specs`:
    LoRA files, distinct names, and the base of each LoRA when ``fingerprint`` is given), the ground truth's
    prompts (:func:`ground_truth_problems` on ``prompts``, the eval prompts) and ``eval.baseline``.

    Returns:
        One line per problem (empty when generation may start); the preflight reports these with ``--check``.
    """
    problems: list[str] = []
    specs: list[ModelSpec] = []
    try:
        specs = model_specs(cfg.eval.models, fingerprint)
    except ValueError as exc:
        problems += str(exc).splitlines()
    problems += ground_truth_problems(cfg, prompts)
    if specs:
        try:
            _baseline(cfg, [s.name for s in specs])
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def _score_manifest(
    cfg: Config, scores_path: Path, factory: Any, started: Callable[[], None]
) -> tuple[pd.DataFrame, list[str]]:
    e = cfg.eval
    try:
        from pgot.prompts import load_prompts

        ps = load_prompts(cfg.prompts)
        prompt_texts = dict(zip(ps.ids, ps.prompts, strict=True))
    except (ValueError, FileNotFoundError):
        prompt_texts = None
    manifest = read_manifest(e.manifest, default_seed=e.seed, prompt_texts=prompt_texts)
    models = manifest_models(cfg, manifest)
    started()
    _rescore(cfg, models, manifest, scores_path, factory)
    keys = manifest.loc[manifest["model"].isin(models), ["model", *KEY]]
    return read_scores(scores_path).merge(keys, on=["model", *KEY]), models


def _score_generated(
    cfg: Config, out: Path, scores_path: Path, factory: Any, started: Callable[[], None]
) -> tuple[pd.DataFrame, list[str]]:
    e = cfg.eval
    problems = generation_problems(cfg, _eval_prompts(cfg)[0])  # before any weight loads
    if problems:
        raise ValueError("\n".join(problems))
    specs = model_specs(e.models)
    models = [s.name for s in specs]
    started()
    _generate_and_score(cfg, specs, _baseline(cfg, models), scores_path, out, factory)
    _, ids = _eval_prompts(cfg)
    scores = read_scores(scores_path)
    keep = scores["model"].isin(models) & scores["prompt_id"].isin(ids) & (scores["seed"] == e.seed)
    keep &= scores["sample_index"] < e.samples_per_prompt
    return scores[keep].reset_index(drop=True), models


def _preference_section(cfg: Config, factory: Any) -> tables.Section:
    e = cfg.eval
    data = human_eval.read_preference_data(e.preference_data)
    device = resolve_device(cfg.model.device)
    acc = human_eval.preference_accuracy(
        factory(device),
        data,
        batch_size=e.batch_size,
        num_resamples=e.bootstrap,
        confidence=e.confidence,
        seed=e.seed,
        device=device,
    )
    return tables.preference_section(acc, num_pairs=len(data), source=e.preference_data, ci=e.bootstrap > 0)


def _votes_section(cfg: Config, out: Path, baseline: str) -> tables.Section:
    e = cfg.eval
    key_file = out / "study" / "key.json"
    if not key_file.is_file():
        raise ValueError(
            f"eval.votes is set but {key_file} does not exist. Tally votes with the eval.output_dir whose "
            "study/study.html the annotators used (written with eval.study_pairs > 0)."
        )
    tally = human_eval.tally_votes(e.votes, key_file, e.confidence)
    return tables.study_section(tally, baseline, confidence=e.confidence, num_files=len(e.votes))


def run(cfg: Config) -> Path:
    """Evaluate ``eval.models`` (or the images of ``eval.manifest``) and write the evaluation folder.

    Steps: check settings; generate (or read) and score every model not already in ``scores.parquet``;
    tables (results.md/.csv/.tex); figures; reward preference accuracy (``eval.preference_data``); user-study
    page (``eval.study_pairs``); tally of study votes (``eval.votes``). Prints the main table (win rate, JDR and
    JCR against the baseline, with intervals) and the definitions of JDR and JCR to stdout.

    Returns:
        The evaluation folder.

    One process at a time works in ``eval.output_dir`` (a folder lock, :func:`pgot.files.hold_folder`).

    Raises:
        ValueError: a user mistake (unknown reward in a reward set, LoRA that does not fit the base model,
            missing images, ...), with what to change; another process holds ``eval.output_dir``; started as
            several processes. Scores already written stay in ``scores.parquet``.
    """
    from pgot.preflight import preflight  # it imports this module

    preflight(cfg, "eval")  # every input checked before any weight loads or any image is generated; one process
    # a refusal before any score is written leaves no trace (config.yaml, the lock, a folder this run created)
    with hold_folder(cfg.eval.output_dir, key="eval.output_dir", what="pgot-eval", scratch=("config.yaml",)):
        return _run(cfg)


def launch_problems() -> list[str]:
    """pgot-eval runs in one process: the line that says so when this one was started as one of several
    (``accelerate launch`` / ``torchrun``: ``WORLD_SIZE`` > 1), else nothing."""
    world = launch_size()
    if world <= 1:
        return []
    return [
        f"pgot-eval runs in one process, but it was started as one of {world} (accelerate launch / torchrun): "
        "every process would evaluate every model into the same eval.output_dir. Start it as a plain command: "
        "pgot-eval --config ..."
    ]


def _run(cfg: Config) -> Path:
    from pgot.config import save_config

    e = cfg.eval
    names = cfg.reward_names
    out = Path(e.output_dir)

    def started() -> None:  # written once the run's own checks pass: a refused run leaves an old config.yaml as is
        atomic_write(out / "config.yaml", lambda tmp: save_config(cfg, tmp))

    scores_path = out / "scores.parquet"
    factory = _rewards_factory(cfg)
    if e.manifest:
        scores, models = _score_manifest(cfg, scores_path, factory, started)
    else:
        scores, models = _score_generated(cfg, out, scores_path, factory, started)
    baseline = _baseline(cfg, models)
    ordered = [baseline] + [m for m in models if m != baseline]

    boot = {"num_resamples": e.bootstrap, "confidence": e.confidence, "seed": e.seed}
    columns = _columns(cfg)  # the rewards, then the ground-truth quality when there is one
    paired, groups = _paired(scores, ordered, columns)
    quality = {m: v[:, len(names)] for m, v in paired.items()} if len(columns) > len(names) else None
    paired = {m: v[:, : len(names)] for m, v in paired.items()}
    rates = metrics.comparison_table(paired, groups, baseline, names, e.reward_sets, **boot)
    truth = None
    if quality is not None:
        truth = metrics.ground_truth_table(
            paired, quality, groups, baseline, names, e.reward_sets, tol=e.quality_tol, **boot
        )
    per_model = {m: scores[scores["model"] == m] for m in ordered}
    means = metrics.mean_score_table(
        {m: table_tensor(d[columns].to_numpy(), "float64") for m, d in per_model.items()},
        {m: table_tensor(d["prompt_id"].to_numpy(), "int64") for m, d in per_model.items()},
        columns,
        **boot,
    )
    ci = e.bootstrap > 0
    sections = [
        tables.rate_section(rates, names, e.reward_sets, baseline, ci, e.confidence, ground_truth=truth),
        tables.mean_section(means, columns, ci, e.confidence),
    ]
    if truth is not None:
        means_note = (
            f" Column {metrics.QUALITY}: the ground-truth quality (eval.ground_truth={e.ground_truth}), not a reward."
        )
        sections[1].note += means_note
    det = out / "determinism.json"
    if not e.manifest and det.is_file():
        d = json.loads(det.read_text())
        if d.get("model") == baseline:
            sections[0].note += (
                f" Determinism check: {baseline}'s first batch generated again gives max |reward difference| "
                f"{d['max_abs_diff']:.3g}, JDR {100 * d['jdr']:.2f}%, JCR {100 * d['jcr']:.2f}% ({d['images']} images; "
                "expected 0, 0, 0)."
            )
    if e.preference_data:
        sections.append(_preference_section(cfg, factory))
    if e.study_pairs > 0:
        human_eval.write_study(
            scores, out, out / "study", baseline, ordered[1:], e.study_pairs, seed=e.seed, image_size=e.study_image_size
        )
    if e.votes:
        sections.append(_votes_section(cfg, out, baseline))

    source = (
        f"images of {e.manifest}"
        if e.manifest
        else f"{e.samples_per_prompt} samples per prompt, seed {e.seed}, batch size {e.batch_size}"
    )
    preamble = (
        f"Models: {', '.join(ordered)} (baseline: {baseline}). {scores['prompt_id'].nunique()} prompts, {source}. "
        f"Rewards: {', '.join(names)}."
    )
    if truth is not None:
        preamble += (
            f" Ground truth: eval.ground_truth={e.ground_truth} (every image judged; quality tolerance "
            f"eval.quality_tol={e.quality_tol:g})."
        )
    tables.write_tables(out, sections, preamble)
    _write_figures(cfg, scores, ordered, baseline, out / "figures")
    log.info("evaluation written to %s", out)
    num_prompts = int(groups.unique().numel())
    brackets = (
        f"[low, high]: {100 * e.confidence:g}% percentile bootstrap intervals over the {num_prompts} prompts "
        f"({e.bootstrap} resamples)."
        if ci
        else "No intervals (eval.bootstrap=0)."
    )
    note = f"{brackets} All tables: {out / 'results.md'}"
    if truth is not None:
        note = "\n".join([*tables.ground_truth_definitions(e.reward_sets, baseline, e.quality_tol), note])
    print("\n" + tables.summary_markdown(sections[0], baseline, e.reward_sets, note=note), flush=True)
    return out


def _save_figure(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), fsync=False)


def _write_figures(cfg: Config, scores: pd.DataFrame, models: list[str], baseline: str, folder: Path) -> None:
    """Every figure shows every model (``models``, baseline first): Pareto scatter, per-prompt box plots, and the
    training curves of ``eval.runs``."""
    names = cfg.reward_names
    e = cfg.eval
    pids = list(dict.fromkeys(scores.loc[scores["model"] == baseline, "prompt_id"]))[: max(e.figure_prompts, 1)]
    if len(names) >= 2:
        x, y = e.scatter_rewards if e.scatter_rewards else names[:2]
        _save_figure(plots.pareto_scatter(scores, x, y, pids, models), folder / f"pareto_{_safe(x)}_{_safe(y)}.png")
    _save_figure(plots.prompt_boxplots(scores, names, pids, models), folder / "prompt_boxplots.png")
    if e.runs:
        _save_figure(plots.training_curves(read_training_curves(e.runs)), folder / "training_curves.png")
