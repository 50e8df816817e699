"""``pgot-eval``: compare models on the same prompts and noise; write scores, tables, figures and a user study.

:func:`run` reads the ``eval`` section and writes an evaluation folder::

    <eval.output_dir>/
      config.yaml          the resolved config
      scores.parquet       one row per image: model, prompt_id, prompt, seed, sample_index, one column per
                           reward, path (image file, may be empty), source (hash of what produced the row)
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
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from pgot import metrics

if TYPE_CHECKING:
    from pgot.config import Config, EvalModelConfig

__all__ = [
    "ModelSpec",
    "load_image",
    "model_specs",
    "preference_accuracy",
    "read_manifest",
    "read_preference_data",
    "read_scores",
    "read_training_curves",
    "run",
    "tally_votes",
    "write_study",
    "write_tables",
]

log = logging.getLogger(__name__)

KEY = ["prompt_id", "seed", "sample_index"]
"""Columns that pair rows across models."""

_BASE_COLUMNS = ["model", "prompt_id", "prompt", "seed", "sample_index"]
_MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl", "manifest.parquet")
_IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


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

    @property
    def files(self) -> list[Path]:
        return list(self.soup) if self.soup else ([self.lora] if self.lora is not None else [])


def _default_name(m: EvalModelConfig, i: int) -> str:
    if m.soup:
        return "soup-" + ":".join(f"{w:g}" for w in m.soup.values())
    if m.lora:  # runs/x, runs/x/final, runs/x/final/pytorch_lora_weights.safetensors -> x; y.safetensors -> y
        p = Path(m.lora)
        if p.suffix == ".safetensors":
            if not p.name.startswith("pytorch_lora_weights"):
                return p.stem
            p = p.parent
        return p.parent.name if p.name == "final" else p.name
    return "base" if i == 0 else f"model{i}"


def model_specs(models: Sequence[EvalModelConfig]) -> list[ModelSpec]:
    """Resolve ``eval.models`` (default: the base model alone) into :class:`ModelSpec` with checked LoRA files.

    Raises:
        ValueError: a LoRA path that does not exist, or two models with the same name.
    """
    from pgot.model import resolve_lora_file

    if not models:
        return [ModelSpec(name="base")]
    specs = []
    for i, m in enumerate(models):
        name = m.name or _default_name(m, i)
        if m.soup:
            soup = {resolve_lora_file(p, f"eval.models.{i}.soup"): float(w) for p, w in m.soup.items()}
            specs.append(ModelSpec(name=name, soup=soup))
        elif m.lora:
            specs.append(
                ModelSpec(name=name, lora=resolve_lora_file(m.lora, f"eval.models.{i}.lora"), lora_scale=m.lora_scale)
            )
        else:
            specs.append(ModelSpec(name=name))
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(
            f"eval.models has several models named {', '.join(map(repr, dup))}; give each a distinct eval.models.<i>.name."
        )
    return specs


# --------------------------------------------------------------------------------------------
# Scores file
# --------------------------------------------------------------------------------------------


def read_scores(path: str | Path) -> pd.DataFrame:
    """``scores.parquet`` as a frame (empty frame with the key columns when the file does not exist)."""
    p = Path(path)
    if not p.is_file():
        return pd.DataFrame({c: pd.Series(dtype="int64" if c in KEY else "str") for c in _BASE_COLUMNS})
    return pd.read_parquet(p)


def _write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _replace_model_rows(path: Path, model: str, rows: pd.DataFrame) -> pd.DataFrame:
    """Replace ``model``'s rows in ``scores.parquet`` by ``rows`` (atomic; other models untouched)."""
    old = read_scores(path)
    old = old[old["model"] != model]
    new = pd.concat([old, rows], ignore_index=True) if len(old) else rows.reset_index(drop=True)
    lead = [c for c in _BASE_COLUMNS if c in new]
    new = new[lead + [c for c in new.columns if c not in lead]]
    _write_parquet_atomic(new, path)
    return new


def _is_complete(
    scores: pd.DataFrame, model: str, keys: pd.DataFrame, reward_names: Sequence[str], source: str
) -> bool:
    """True when ``scores`` holds exactly ``keys`` for ``model``, from ``source``, with every reward column."""
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


def _source_hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reward_identity(cfg: Config) -> list[dict]:
    return [
        {"name": r.name, "path": r.path, "arch": r.arch, "dtype": r.dtype, "tiny_seed": r.tiny_seed}
        for r in cfg.rewards
    ]


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def load_image(source: str | Path | bytes) -> torch.Tensor:
    """An image file (or its encoded bytes) as a ``(3, H, W)`` float tensor in ``[0, 1]``."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


def _save_image(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def _score_images(
    rewards: list,
    images: Sequence[torch.Tensor],
    prompts: Sequence[str],
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Score a list of ``(3, H, W)`` images, batching runs of equal size; returns ``(B, M)`` float64 on CPU."""
    from pgot.rewards import score

    out: list[torch.Tensor] = []
    i = 0
    while i < len(images):
        j = i + 1
        while j < len(images) and j - i < batch_size and images[j].shape == images[i].shape:
            j += 1
        batch = torch.stack(list(images[i:j])).to(device)
        with torch.no_grad():
            out.append(score(rewards, batch, list(prompts[i:j])).double().cpu())
        i = j
    return torch.cat(out) if out else torch.zeros(0, len(rewards), dtype=torch.float64)


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
    """Load ``spec``'s LoRA or soup into ``model``; check every tensor of the file found a module."""
    from pgot.model import load_lora, load_lora_soup

    if not spec.files:
        return []
    what = f"model {model.path or 'tiny'!r} (fingerprint {model.fingerprint})"
    prefix = "eval_" + _safe(spec.name)
    try:
        with warnings.catch_warnings():
            # peft warns when a second adapter is added after the first was deleted; that is intended here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            if spec.soup:
                names = load_lora_soup(model, {str(p): w for p, w in spec.soup.items()}, prefix=prefix)
            else:
                names = [load_lora(model, str(spec.lora), scale=spec.lora_scale, adapter_name=prefix)]
    except (RuntimeError, KeyError, ValueError) as exc:
        _deactivate(model, [n for n in (getattr(model.transformer, "peft_config", None) or {}) if n.startswith(prefix)])
        files = ", ".join(repr(str(f)) for f in spec.files)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "mismatch" in line or "Missing" in line), lines[0] if lines else "")
        raise ValueError(
            f"LoRA {files} of eval model {spec.name!r} does not fit the base {what}: {detail[:300].rstrip('.')}. "
            "Evaluate it with the base model it was trained on (model.path, model.tiny_seed)."
        ) from None
    from safetensors import safe_open

    for name, f in zip(names, spec.files, strict=True):
        with safe_open(str(f), framework="pt") as fh:
            expected = sum(1 for k in fh.keys() if k.startswith("transformer.") and "lora_" in k)
        loaded = sum(1 for pname, _ in model.transformer.named_parameters() if f".{name}." in pname)
        if loaded < expected:
            _deactivate(model, names)
            raise ValueError(
                f"LoRA {str(f)!r} of eval model {spec.name!r} does not fit the base {what}: only {loaded} of its "
                f"{expected} LoRA tensors match a module of the transformer. Evaluate it with the base model it was "
                "trained on (model.path, model.tiny_seed)."
            )
    return names


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
            torch.tensor(chunk["prompt_id"].to_numpy()),
            torch.tensor(chunk["sample_index"].to_numpy()),
            cfg.eval.seed,
            **dataclasses.asdict(cfg.draft) | {"k": 0},
            cache_dir=cfg.model.embedding_cache or None,
        ).float()
        s = _score_images(rewards, list(images), chunk["prompt"].tolist(), len(chunk), images.device)
    return images, s


def _determinism_check(cfg: Config, model: Any, rewards: list, name: str, first: pd.DataFrame, out: Path) -> None:
    """Generate the baseline's first batch again and compare: the 0/0 sanity check of seeds and batch layout."""
    _, again = _generate_batch(cfg, model, rewards, first)
    before = torch.tensor(first[cfg.reward_names].to_numpy(dtype="float64"))
    diff = (again - before).abs()
    report = {
        "model": name,
        "images": len(first),
        "max_abs_diff": float(diff.nan_to_num(nan=float("inf")).max()) if diff.numel() else 0.0,
        "jdr": float(metrics.jdr(again, before)),
        "jcr": float(metrics.jcr(again, before)),
    }
    (out / "determinism.json").write_text(json.dumps(report, indent=1))
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

    from pgot.devices import resolve_device
    from pgot.model import load_model

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
    model = None
    rewards = None
    for spec in specs:
        if model is None:
            model = load_model(cfg.model)
        ident = {
            "base": model.fingerprint,
            "sampler": sampler,
            "rewards": _reward_identity(cfg),
            "files": {str(f): _sha1_file(f) for f in spec.files},
            "weights": {str(f): w for f, w in spec.soup.items()} if spec.soup else spec.lora_scale,
        }
        source = _source_hash(ident)
        mine = existing[existing["model"] == spec.name]
        if _is_complete(existing, spec.name, keys, cfg.reward_names, source) and (
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
                chunk["path"] = ""
                if save_images:
                    for b, r in enumerate(chunk.itertuples()):
                        rel = Path("images") / _safe(spec.name) / f"{r.prompt_id}-{r.seed}-{r.sample_index}.png"
                        _save_image(images[b], out / rel)
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


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl")
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise ValueError(f"{str(path)!r}: unsupported table format {suffix!r}; use .csv, .jsonl or .parquet.")


def _find_table(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for name in _MANIFEST_NAMES:
            if (p / name).is_file():
                return p / name
        raise ValueError(
            f"{key}={path!r} is a folder without {', '.join(_MANIFEST_NAMES)}. Point {key} at the manifest file."
        )
    if not p.is_file():
        raise ValueError(
            f"{key}={path!r} does not exist. Point {key} at a .csv/.jsonl/.parquet manifest or a folder holding manifest.csv."
        )
    return p


def read_manifest(
    path: str | Path, default_seed: int = 0, prompt_texts: Mapping[int, str] | None = None
) -> pd.DataFrame:
    """Read and check a manifest of images on disk.

    Args:
        path: a .csv / .jsonl / .parquet file, or a folder holding ``manifest.{csv,jsonl,parquet}``.
        default_seed: ``seed`` of rows without one.
        prompt_texts: prompt id -> text, for manifests that give only ``prompt_id``.

    Returns:
        Columns ``model``, ``prompt_id``, ``prompt``, ``seed``, ``sample_index``, ``path`` (absolute).
        Without ``prompt_id``, ids are those of ``prompt_texts`` when it holds every text, else the distinct
        texts numbered in order of first appearance;
        without ``sample_index`` it is 0 (pairs then match on ``seed``).

    Raises:
        ValueError: missing columns, duplicate keys, or images that do not exist (the first few listed).
    """
    file = _find_table(str(path), "eval.manifest")
    df = _read_table(file)
    missing_cols = [c for c in ("model", "path") if c not in df.columns]
    if "prompt" not in df.columns and "prompt_id" not in df.columns:
        missing_cols.append("prompt (or prompt_id)")
    if missing_cols:
        raise ValueError(
            f"eval.manifest {str(file)!r} lacks the column(s) {', '.join(missing_cols)}; it has {', '.join(map(str, df.columns))}. "
            "A manifest needs model, prompt (or prompt_id), seed and/or sample_index, and path."
        )
    out = pd.DataFrame({"model": df["model"].astype(str)})
    if "prompt_id" in df.columns:
        out["prompt_id"] = df["prompt_id"].astype("int64")
        if "prompt" in df.columns:
            out["prompt"] = df["prompt"].astype(str)
        else:
            texts = dict(prompt_texts or {})
            unknown = sorted(set(out["prompt_id"]) - set(texts))
            if unknown:
                raise ValueError(
                    f"eval.manifest {str(file)!r} gives prompt_id without prompt text, and prompt ids {unknown[:5]} are not "
                    "in the prompt set (prompts.path). Add a prompt column, or point prompts.path at the prompts the ids refer to."
                )
            out["prompt"] = out["prompt_id"].map(texts)
    else:
        out["prompt"] = df["prompt"].astype(str)
        known = {t: i for i, t in (prompt_texts or {}).items()}
        if known and set(out["prompt"]) <= set(known):
            codes = known  # every text is in the prompt set: keep its ids
        else:
            codes = {p: i for i, p in enumerate(dict.fromkeys(out["prompt"]))}
        out["prompt_id"] = out["prompt"].map(codes).astype("int64")
    out["seed"] = df["seed"].astype("int64") if "seed" in df.columns else int(default_seed)
    out["sample_index"] = df["sample_index"].astype("int64") if "sample_index" in df.columns else 0
    base = file.parent
    out["path"] = [str(p if p.is_absolute() else (base / p)) for p in map(Path, df["path"].astype(str))]
    dup = out.duplicated(subset=["model", *KEY], keep=False)
    if dup.any():
        first = out[dup].iloc[0]
        raise ValueError(
            f"eval.manifest {str(file)!r} has {int(dup.sum())} rows sharing (model, prompt_id, seed, sample_index), e.g. model "
            f"{first.model!r} prompt {first.prompt!r} seed {first.seed} sample_index {first.sample_index}. Give each image a "
            "distinct seed or sample_index."
        )
    absent = [p for p in out["path"] if not Path(p).is_file()]
    if absent:
        shown = "\n  ".join(absent[:5])
        raise ValueError(
            f"eval.manifest {str(file)!r}: {len(absent)} of {len(out)} images do not exist, e.g.\n  {shown}\n"
            "Paths are relative to the manifest's folder; fix the paths or remove those rows."
        )
    return out[_BASE_COLUMNS + ["path"]]


def _rescore(
    cfg: Config, specs_order: list[str], manifest: pd.DataFrame, scores_path: Path, rewards_factory: Any
) -> None:
    from pgot.devices import resolve_device

    existing = read_scores(scores_path)
    for name in specs_order:
        rows = manifest[manifest["model"] == name].reset_index(drop=True)
        files = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in rows["path"]]
        source = _source_hash(
            {"manifest": rows[KEY + ["prompt"]].to_numpy().tolist(), "files": files, "rewards": _reward_identity(cfg)}
        )
        if _is_complete(existing, name, rows, cfg.reward_names, source):
            log.info("%s: already scored (%d rows), skipping", name, len(rows))
            continue
        device = resolve_device(cfg.model.device)
        rewards = rewards_factory(device)  # built once
        log.info("%s: rescoring %d images", name, len(rows))
        chunks = []
        for start in range(0, len(rows), cfg.eval.batch_size):
            part = rows.iloc[start : start + cfg.eval.batch_size]
            images = [load_image(p) for p in part["path"]]
            chunks.append(_score_images(rewards, images, part["prompt"].tolist(), cfg.eval.batch_size, device))
        s = torch.cat(chunks) if chunks else torch.zeros(0, len(cfg.rewards), dtype=torch.float64)
        frame = rows[_BASE_COLUMNS].copy()
        for m, rname in enumerate(cfg.reward_names):
            frame[rname] = s[:, m].numpy()
        frame["path"] = rows["path"]
        frame["source"] = source
        existing = _replace_model_rows(scores_path, name, frame)


# --------------------------------------------------------------------------------------------
# Tables
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
        out[m] = torch.tensor(rows[list(reward_names)].to_numpy(dtype="float64"))
    return out, torch.tensor(common["prompt_id"].to_numpy(dtype="int64"))


def _fmt_pct(v: float, lo: float, hi: float, ci: bool) -> str:
    if math.isnan(v):
        return "–"
    s = f"{100 * v:.2f}"
    return f"{s} [{100 * lo:.2f}, {100 * hi:.2f}]" if ci and not math.isnan(lo) else s


def _fmt_num(v: float, lo: float, hi: float, ci: bool) -> str:
    if math.isnan(v):
        return "nan"
    digits = 4 if abs(v) < 100 else 2
    s = f"{v:.{digits}f}"
    return f"{s} [{lo:.{digits}f}, {hi:.{digits}f}]" if ci and not math.isnan(lo) else s


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _tex_escape(s: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", s).replace("–", "--")


def _tex_table(caption: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    body = [" & ".join(_tex_escape(h) for h in header) + r" \\", r"\midrule"]
    body += [" & ".join(_tex_escape(c) for c in r) + r" \\" for r in rows]
    return "\n".join(
        [
            r"\begin{table}[t]",
            r"\centering\small",
            rf"\caption{{{_tex_escape(caption)}}}",
            r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}",
            r"\toprule",
            *body,
            r"\bottomrule",
            r"\end{tabular}",
            r"\end{table}",
        ]
    )


@dataclass
class _Section:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    long: list[dict] = field(default_factory=list)
    """Tidy rows for results.csv: table, model/row, metric, value, low, high, n."""


def _rate_section(
    table: pd.DataFrame,
    reward_names: Sequence[str],
    reward_sets: Mapping[str, Sequence[str]],
    baseline: str,
    ci: bool,
    conf: float,
) -> _Section:
    cols = metrics.rate_columns(reward_names, reward_sets)
    header = [
        "Model",
        *[c.removeprefix("win_") + " win (%)" if c.startswith("win_") else c + " (%)" for c in cols],
        "pairs",
    ]
    rows, long = [], []
    for model, r in table.iterrows():
        label = f"{model} (baseline)" if model == baseline else str(model)
        rows.append([label, *[_fmt_pct(r[c], r[f"{c}_low"], r[f"{c}_high"], ci) for c in cols], str(int(r["pairs"]))])
        long += _long_rows("joint", model, r, cols, int(r["pairs"]))
    sets = "; ".join(
        f"{metrics.rate_columns([], {k: v})[0]}/{metrics.rate_columns([], {k: v})[1]}: {', '.join(v)}"
        for k, v in reward_sets.items()
    )
    note = (
        f"Paired samples (same prompt, seed, sample index) against **{baseline}**. Win: strictly higher reward; "
        f"JDR: strictly higher on every reward of the set; JCR: strictly lower on every reward of the set "
        f"(ties count as neither). Reward sets: {sets}. The baseline row compares the baseline with itself and "
        "reads 0 by construction (when generating, the baseline's first batch is also generated twice: the determinism check)."
    )
    if ci:
        note += f" Brackets: {100 * conf:g}% percentile bootstrap intervals over prompts."
    return _Section("Win rate, JDR and JCR (paper Table 3 layout)", header, rows, note, long)


def _long_rows(table: str, model: object, r: pd.Series, columns: Sequence[str], n: int) -> list[dict]:
    """results.csv rows (one per metric) of one model: value and interval bounds."""
    return [
        {"table": table, "row": model, "metric": c, "value": r[c], "low": r[f"{c}_low"], "high": r[f"{c}_high"], "n": n}
        for c in columns
    ]


def _mean_section(table: pd.DataFrame, reward_names: Sequence[str], ci: bool, conf: float) -> _Section:
    header = ["Model", *reward_names, "samples"]
    show_nan = bool((table["nan"] > 0).any())
    if show_nan:
        header.append("rows with NaN")
    rows, long = [], []
    for model, r in table.iterrows():
        row = [
            str(model),
            *[_fmt_num(r[n], r[f"{n}_low"], r[f"{n}_high"], ci) for n in reward_names],
            str(int(r["samples"])),
        ]
        if show_nan:
            row.append(str(int(r["nan"])))
        rows.append(row)
        long += _long_rows("mean", model, r, reward_names, int(r["samples"]))
    note = "Mean over all samples of each model (NaN scores skipped and counted)."
    if ci:
        note += f" Brackets: {100 * conf:g}% bootstrap intervals over prompts."
    return _Section("Mean reward scores (paper Table 5 layout)", header, rows, note, long)


def write_tables(out: Path, sections: Sequence[_Section], preamble: str = "") -> None:
    """Write results.md, results.csv (tidy: table, row, metric, value, low, high, n) and results.tex."""
    md = ["# pgot evaluation", ""]
    if preamble:
        md += [preamble, ""]
    tex = ["% pgot evaluation tables; needs \\usepackage{booktabs}"]
    long: list[dict] = []
    for s in sections:
        md += [f"## {s.title}", "", _md_table(s.header, s.rows), ""]
        if s.note:
            md += [s.note, ""]
        tex += ["", _tex_table(s.title, s.header, s.rows)]
        long += s.long
    (out / "results.md").write_text("\n".join(md))
    (out / "results.tex").write_text("\n".join(tex) + "\n")
    pd.DataFrame(long, columns=["table", "row", "metric", "value", "low", "high", "n"]).to_csv(
        out / "results.csv", index=False
    )


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


def read_training_curves(runs: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Read ``probe/*`` metrics from each run's ``metrics.jsonl``: run label -> frame (``step`` + probe columns).

    The label is the run folder's name (made unique with its parent when two runs share a name).
    Lines that are not JSON objects (a run killed mid-write) are skipped with a warning.
    """
    curves: dict[str, pd.DataFrame] = {}
    for run in runs:
        p = Path(run).expanduser()
        f = p / "metrics.jsonl" if p.is_dir() else p
        if not f.is_file():
            raise ValueError(
                f"eval.runs names {run!r}, which has no metrics.jsonl. Point eval.runs at pgot-train run folders."
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
            if isinstance(rec, dict) and "step" in rec and any(k.startswith("probe/") for k in rec):
                records.append({"step": rec["step"], **{k: v for k, v in rec.items() if k.startswith("probe/")}})
        label = f.parent.name
        if label in curves:
            label = f"{f.parent.parent.name}/{label}"
        curves[label] = pd.DataFrame(records, columns=None if records else ["step"])
    return curves


# --------------------------------------------------------------------------------------------
# Reward preference accuracy (paper Table 1)
# --------------------------------------------------------------------------------------------


def read_preference_data(path: str | Path) -> pd.DataFrame:
    """Pairs of images with a human choice, Pick-a-Pic style.

    Accepts a .parquet / .csv / .jsonl file or a folder holding ``manifest.*``, with columns ``prompt``,
    ``image_0`` and ``image_1`` (paths relative to the file's folder, or encoded image bytes; Pick-a-Pic's
    ``jpg_0`` / ``jpg_1`` also work) and ``label``: the index of the preferred image (0 or 1; 0.5 is a tie).
    Pick-a-Pic's ``label_0`` (1 when image 0 won, 0.5 for a tie) works in place of ``label``.

    Returns:
        Columns ``prompt``, ``image_0``, ``image_1`` (absolute path strings or bytes) and ``label`` (0 or 1),
        ties removed.
    """
    file = _find_table(str(path), "eval.preference_data")
    df = _read_table(file)
    cols = {}
    for i in (0, 1):
        for cand in (f"image_{i}", f"jpg_{i}"):
            if cand in df.columns:
                cols[i] = cand
                break
    if "label" in df.columns:
        label = df["label"].astype(float)
    elif "label_0" in df.columns:
        label = 1.0 - df["label_0"].astype(float)
    else:
        label = None
    if len(cols) < 2 or "prompt" not in df.columns or label is None:
        raise ValueError(
            f"eval.preference_data {str(file)!r} needs columns prompt, image_0, image_1 and label (0/1: which image won; "
            f"0.5: tie); it has {', '.join(map(str, df.columns))}."
        )
    bad = ~label.isin([0.0, 0.5, 1.0])
    if bad.any():
        raise ValueError(
            f"eval.preference_data {str(file)!r}: label must be 0, 1 or 0.5 (tie), got {sorted(set(label[bad]))[:5]}."
        )
    keep = label != 0.5
    out = pd.DataFrame({"prompt": df["prompt"].astype(str), "label": label.astype("int64")})
    for i in (0, 1):
        col = df[cols[i]]
        vals = []
        for v in col:
            if isinstance(v, dict) and "bytes" in v:  # datasets' Image feature stored as a struct
                v = v["bytes"]
            if isinstance(v, (bytes, bytearray)):
                vals.append(bytes(v))
            else:
                p = Path(str(v))
                vals.append(str(p if p.is_absolute() else file.parent / p))
        out[f"image_{i}"] = vals
    out = out[keep.to_numpy()].reset_index(drop=True)
    absent = [v for c in ("image_0", "image_1") for v in out[c] if isinstance(v, str) and not Path(v).is_file()]
    if absent:
        shown = "\n  ".join(absent[:5])
        raise ValueError(f"eval.preference_data {str(file)!r}: {len(absent)} images do not exist, e.g.\n  {shown}")
    if not len(out):
        raise ValueError(f"eval.preference_data {str(file)!r} has no pair with a clear choice (label 0 or 1).")
    return out[["prompt", "image_0", "image_1", "label"]]


def preference_accuracy(
    rewards: list,
    data: pd.DataFrame,
    *,
    batch_size: int = 4,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> pd.DataFrame:
    """Accuracy of each reward at predicting which image of a pair the human preferred.

    A reward predicts the image it scores higher; an exact tie counts as half right, a NaN score as wrong.

    Returns:
        One row per reward (index ``reward``): ``accuracy``, ``low``, ``high`` (bootstrap over prompts), ``pairs``.
    """
    if device is None:
        device = next((p.device for r in rewards for p in r.parameters()), torch.device("cpu"))
    s0_parts, s1_parts = [], []
    for start in range(0, len(data), batch_size):  # stream: never more than a batch of pairs in memory
        part = data.iloc[start : start + batch_size]
        prompts = part["prompt"].tolist()
        s0_parts.append(_score_images(rewards, [load_image(v) for v in part["image_0"]], prompts, batch_size, device))
        s1_parts.append(_score_images(rewards, [load_image(v) for v in part["image_1"]], prompts, batch_size, device))
    k = len(data)
    s0, s1 = torch.cat(s0_parts), torch.cat(s1_parts)  # (K, M) each
    label = torch.tensor(data["label"].to_numpy(), dtype=torch.long)[:, None]  # (K, 1)
    right = torch.where(label == 0, (s0 > s1).double(), (s1 > s0).double()) + 0.5 * (s0 == s1).double()  # (K, M)
    groups = torch.tensor(pd.factorize(data["prompt"])[0])
    low, high = metrics.bootstrap_ci(right, groups, num_resamples=num_resamples, confidence=confidence, seed=seed)
    acc = right.mean(dim=0)
    names = [r.name for r in rewards]
    return pd.DataFrame(
        {"accuracy": acc.numpy(), "low": low.numpy(), "high": high.numpy(), "pairs": k},
        index=pd.Index(names, name="reward"),
    )


# --------------------------------------------------------------------------------------------
# User study (paper Table 6)
# --------------------------------------------------------------------------------------------


def _data_uri(path: Path, max_side: int) -> str:
    if max_side <= 0:
        mime = _IMAGE_SUFFIXES.get(path.suffix.lower(), "image/png")
        return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if max(im.size) > max_side:
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=92)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_study(
    scores: pd.DataFrame,
    root: Path,
    out_dir: Path,
    baseline: str,
    candidates: Sequence[str],
    pairs_per_candidate: int,
    *,
    seed: int = 0,
    image_size: int = 512,
    title: str = "Which image is better?",
) -> Path:
    """Write a self-contained user-study page of randomised (candidate vs baseline) pairs.

    For every candidate, ``pairs_per_candidate`` keys (prompt, seed, sample index) are drawn at random
    among those both models have images for; each pair's left/right order is random, and all pairs are
    shuffled together. The page (``study.html``) embeds the images as data URIs and never shows model
    names; which model is on which side is kept in ``key.json`` next to it, which :func:`tally_votes` reads.

    Args:
        scores: rows with ``model``, key columns, ``prompt`` and ``path`` (relative to ``root`` or absolute).
        root: folder that relative image paths start from.
        out_dir: where ``study.html`` and ``key.json`` go (created).
        baseline: the baseline model.
        candidates: models compared with it.
        pairs_per_candidate: pairs per candidate (fewer when fewer images exist).
        seed: seed of the draws and the left/right order.
        image_size: longest side of embedded images (0: the original files, unchanged).
        title: page heading.

    Returns:
        The path of ``study.html``.
    """
    rng = random.Random(seed)
    has = scores[scores["path"].astype(str) != ""] if "path" in scores else scores.iloc[0:0]
    base = has[has["model"] == baseline].set_index(KEY)
    study_id = _source_hash(
        {"seed": seed, "baseline": baseline, "candidates": list(candidates), "n": pairs_per_candidate}
    )[:10]
    pairs, key = [], {}
    for cand in candidates:
        c = has[has["model"] == cand].set_index(KEY)
        common = sorted(set(c.index) & set(base.index))
        if not common:
            log.warning("user study: %s and %s share no images; no pairs for %s", cand, baseline, cand)
            continue
        chosen = rng.sample(common, min(pairs_per_candidate, len(common)))
        for k in chosen:
            pid = f"p{len(key):04d}"
            cand_left = rng.random() < 0.5
            cpath, bpath = Path(str(c.loc[k, "path"])), Path(str(base.loc[k, "path"]))
            cpath, bpath = (p if p.is_absolute() else root / p for p in (cpath, bpath))
            left, right = (cpath, bpath) if cand_left else (bpath, cpath)
            prompt = str(c.loc[k, "prompt"])
            pairs.append(
                {
                    "id": pid,
                    "prompt": prompt,
                    "left": _data_uri(left, image_size),
                    "right": _data_uri(right, image_size),
                }
            )
            key[pid] = {
                "candidate": cand,
                "baseline": baseline,
                "left": cand if cand_left else baseline,
                "right": baseline if cand_left else cand,
                "prompt": prompt,
                **{kk: int(v) for kk, v in zip(KEY, k, strict=True)},
            }
    order = list(range(len(pairs)))
    rng.shuffle(order)
    pairs = [pairs[i] for i in order]
    out_dir.mkdir(parents=True, exist_ok=True)
    template = resources.files("pgot").joinpath("data/study.html").read_text(encoding="utf-8")
    payload = json.dumps({"study_id": study_id, "title": title, "pairs": pairs}).replace("</", "<\\/")
    html = template.replace("/*__STUDY_DATA__*/", payload)
    (out_dir / "study.html").write_text(html, encoding="utf-8")
    (out_dir / "key.json").write_text(json.dumps({"study_id": study_id, "baseline": baseline, "pairs": key}, indent=1))
    log.info("user study: %d pairs written to %s", len(pairs), out_dir / "study.html")
    return out_dir / "study.html"


def tally_votes(vote_files: Sequence[str | Path], key_file: str | Path, confidence: float = 0.95) -> pd.DataFrame:
    """Tally vote files downloaded from the study page into win rates of each candidate against the baseline.

    Every vote counts (several annotators may rate the same pair); a later vote of the same annotator on
    the same pair replaces the earlier one. ``win_rate = (wins + ties / 2) / votes`` with a Wilson score
    interval (:func:`pgot.metrics.wilson_interval`).

    Returns:
        One row per candidate (index ``candidate``): ``votes``, ``wins``, ``ties``, ``losses``, ``win_rate``,
        ``low``, ``high``, ``annotators``.

    Raises:
        ValueError: a file that is not a vote file of this study.
    """
    key = json.loads(Path(key_file).read_text())
    pairs = key["pairs"]
    by: dict[tuple[str, str], str] = {}
    for i, vf in enumerate(vote_files):
        p = Path(vf)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"eval.votes.{i}={str(vf)!r} is not a readable JSON vote file: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != "pgot-study-votes":
            raise ValueError(f"eval.votes.{i}={str(vf)!r} is not a pgot study vote file (no format: pgot-study-votes).")
        if data.get("study_id") != key["study_id"]:
            raise ValueError(
                f"eval.votes.{i}={str(vf)!r} belongs to study {data.get('study_id')!r}, but {str(key_file)!r} is study "
                f"{key['study_id']!r}. Tally votes with the evaluation folder that wrote their page."
            )
        annotator = str(data.get("annotator") or f"file{i}")
        for v in data.get("votes", []):
            if v.get("pair") not in pairs or v.get("choice") not in ("left", "right", "tie"):
                raise ValueError(f"eval.votes.{i}={str(vf)!r} has a vote for unknown pair or choice: {v!r}.")
            by[(annotator, v["pair"])] = v["choice"]
    rows: dict[str, dict[str, Any]] = {}
    for (annotator, pair), choice in by.items():
        info = pairs[pair]
        r = rows.setdefault(info["candidate"], {"votes": 0, "wins": 0, "ties": 0, "losses": 0, "annotators": set()})
        r["votes"] += 1
        r["annotators"].add(annotator)
        if choice == "tie":
            r["ties"] += 1
        elif info[choice] == info["candidate"]:
            r["wins"] += 1
        else:
            r["losses"] += 1
    out = []
    for cand, r in rows.items():
        wins = r["wins"] + 0.5 * r["ties"]
        lo, hi = metrics.wilson_interval(wins, r["votes"], confidence)
        out.append(
            {
                "candidate": cand,
                **{k: r[k] for k in ("votes", "wins", "ties", "losses")},
                "win_rate": wins / r["votes"],
                "low": lo,
                "high": hi,
                "annotators": len(r["annotators"]),
            }
        )
    cols = ["candidate", "votes", "wins", "ties", "losses", "win_rate", "low", "high", "annotators"]
    return pd.DataFrame(out, columns=cols).set_index("candidate")


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


def _check_reward_sets(cfg: Config, scored: Sequence[str]) -> None:
    problems = []
    for set_name, members in cfg.eval.reward_sets.items():
        if not members:
            problems.append(f"eval.reward_sets.{set_name} is empty; list at least one reward.")
        for n in members:
            if n not in scored:
                problems.append(
                    f"eval.reward_sets.{set_name} names {n!r}, which is not a scored reward ({', '.join(scored) or 'none'}). "
                    f"Add it to rewards, or set eval.reward_sets, e.g. eval.reward_sets='{{all: [{', '.join(scored)}]}}'."
                )
    sr = cfg.eval.scatter_rewards
    if sr and (len(sr) != 2 or any(n not in scored for n in sr)):
        problems.append(f"eval.scatter_rewards must name two scored rewards ({', '.join(scored)}), got {sr}.")
    if not scored:
        problems.append("rewards is empty; list the reward models to score, e.g. rewards.0.name=clip.")
    if problems:
        raise ValueError("\n".join(problems))


def _rewards_factory(cfg: Config) -> Any:
    """A function device -> the configured rewards, built once on first call."""
    built: list = []

    def build(device: torch.device) -> list:
        if not built:
            from pgot.rewards import build as build_rewards

            built.extend(build_rewards(list(cfg.rewards), device=device))
        return built

    return build


def _score_manifest(cfg: Config, scores_path: Path, factory: Any) -> tuple[pd.DataFrame, list[str]]:
    e = cfg.eval
    try:
        from pgot.prompts import load_prompts

        ps = load_prompts(cfg.prompts)
        prompt_texts = dict(zip(ps.ids, ps.prompts, strict=True))
    except (ValueError, FileNotFoundError):
        prompt_texts = None
    manifest = read_manifest(e.manifest, default_seed=e.seed, prompt_texts=prompt_texts)
    in_manifest = list(dict.fromkeys(manifest["model"]))
    models = [m.name for m in e.models if m.name] or in_manifest
    unknown = [m for m in models if m not in in_manifest]
    if unknown:
        raise ValueError(
            f"eval.models names {', '.join(map(repr, unknown))}, which eval.manifest does not have (it has "
            f"{', '.join(in_manifest)}). Name models as in the manifest's model column, or leave eval.models empty."
        )
    _rescore(cfg, models, manifest, scores_path, factory)
    keys = manifest.loc[manifest["model"].isin(models), ["model", *KEY]]
    return read_scores(scores_path).merge(keys, on=["model", *KEY]), models


def _score_generated(cfg: Config, out: Path, scores_path: Path, factory: Any) -> tuple[pd.DataFrame, list[str]]:
    e = cfg.eval
    specs = model_specs(e.models)
    models = [s.name for s in specs]
    if e.baseline and e.baseline not in models:
        raise ValueError(f"eval.baseline is {e.baseline!r}, not one of eval.models ({', '.join(models)}).")
    _generate_and_score(cfg, specs, e.baseline or models[0], scores_path, out, factory)
    _, ids = _eval_prompts(cfg)
    scores = read_scores(scores_path)
    keep = scores["model"].isin(models) & scores["prompt_id"].isin(ids) & (scores["seed"] == e.seed)
    keep &= scores["sample_index"] < e.samples_per_prompt
    return scores[keep].reset_index(drop=True), models


def _preference_section(cfg: Config, factory: Any) -> _Section:
    from pgot.devices import resolve_device

    e = cfg.eval
    data = read_preference_data(e.preference_data)
    device = resolve_device(cfg.model.device)
    acc = preference_accuracy(
        factory(device),
        data,
        batch_size=e.batch_size,
        num_resamples=e.bootstrap,
        confidence=e.confidence,
        seed=e.seed,
        device=device,
    )
    ci = e.bootstrap > 0
    rows = [[str(r), _fmt_pct(a.accuracy, a.low, a.high, ci), str(int(a.pairs))] for r, a in acc.iterrows()]
    long = [
        {
            "table": "preference",
            "row": r,
            "metric": "accuracy",
            "value": a.accuracy,
            "low": a.low,
            "high": a.high,
            "n": int(a.pairs),
        }
        for r, a in acc.iterrows()
    ]
    note = (
        f"Fraction of the {len(data)} human-labelled pairs of {e.preference_data} where the reward scores the "
        "preferred image higher (human ties excluded; reward ties count half)."
    )
    return _Section(
        "Reward preference accuracy (paper Table 1 layout)", ["Reward", "accuracy (%)", "pairs"], rows, note, long
    )


def _votes_section(cfg: Config, out: Path, baseline: str) -> _Section:
    e = cfg.eval
    key_file = out / "study" / "key.json"
    if not key_file.is_file():
        raise ValueError(
            f"eval.votes is set but {key_file} does not exist. Tally votes with the eval.output_dir whose "
            "study/study.html the annotators used (written with eval.study_pairs > 0)."
        )
    tally = tally_votes(e.votes, key_file, e.confidence)
    header = ["Candidate", "win rate (%)", "votes", "wins", "ties", "losses", "annotators"]
    rows = [
        [
            str(c),
            _fmt_pct(t.win_rate, t.low, t.high, True),
            *(str(int(t[k])) for k in ("votes", "wins", "ties", "losses", "annotators")),
        ]
        for c, t in tally.iterrows()
    ]
    long = [
        {
            "table": "user_study",
            "row": c,
            "metric": "win_rate",
            "value": t.win_rate,
            "low": t.low,
            "high": t.high,
            "n": int(t.votes),
        }
        for c, t in tally.iterrows()
    ]
    note = f"Win rate = (wins + ties / 2) / votes, {100 * e.confidence:g}% Wilson intervals; {len(e.votes)} vote files."
    return _Section(f"User study: win rate against {baseline} (paper Table 6 layout)", header, rows, note, long)


def run(cfg: Config) -> Path:
    """Evaluate ``eval.models`` (or the images of ``eval.manifest``) and write the evaluation folder.

    Steps: check settings; generate (or read) and score every model not already in ``scores.parquet``;
    tables (results.md/.csv/.tex); figures; reward preference accuracy (``eval.preference_data``); user-study
    page (``eval.study_pairs``); tally of study votes (``eval.votes``).

    Returns:
        The evaluation folder.

    Raises:
        ValueError: a user mistake (unknown reward in a reward set, LoRA that does not fit the base model,
            missing images, ...), with what to change. Scores already written stay in ``scores.parquet``.
    """
    from pgot.config import save_config

    e = cfg.eval
    names = cfg.reward_names
    _check_reward_sets(cfg, names)
    out = Path(e.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    scores_path = out / "scores.parquet"
    factory = _rewards_factory(cfg)
    if e.manifest:
        scores, models = _score_manifest(cfg, scores_path, factory)
    else:
        scores, models = _score_generated(cfg, out, scores_path, factory)
    baseline = e.baseline or models[0]
    if baseline not in models:
        raise ValueError(f"eval.baseline is {baseline!r}, not one of the evaluated models ({', '.join(models)}).")
    ordered = [baseline] + [m for m in models if m != baseline]

    boot = {"num_resamples": e.bootstrap, "confidence": e.confidence, "seed": e.seed}
    paired, groups = _paired(scores, ordered, names)
    rates = metrics.comparison_table(paired, groups, baseline, names, e.reward_sets, **boot)
    per_model = {m: scores[scores["model"] == m] for m in ordered}
    means = metrics.mean_score_table(
        {m: torch.tensor(d[names].to_numpy(dtype="float64")) for m, d in per_model.items()},
        {m: torch.tensor(d["prompt_id"].to_numpy(dtype="int64")) for m, d in per_model.items()},
        names,
        **boot,
    )
    ci = e.bootstrap > 0
    sections = [
        _rate_section(rates, names, e.reward_sets, baseline, ci, e.confidence),
        _mean_section(means, names, ci, e.confidence),
    ]
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
        write_study(
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
    write_tables(out, sections, preamble)
    _write_figures(cfg, scores, ordered, baseline, out / "figures")
    log.info("evaluation written to %s", out)
    return out


def _write_figures(cfg: Config, scores: pd.DataFrame, models: list[str], baseline: str, folder: Path) -> None:
    from pgot import plots

    folder.mkdir(parents=True, exist_ok=True)
    names = cfg.reward_names
    e = cfg.eval
    pids = list(dict.fromkeys(scores.loc[scores["model"] == baseline, "prompt_id"]))[: max(e.figure_prompts, 1)]
    if len(names) >= 2:
        x, y = e.scatter_rewards if e.scatter_rewards else names[:2]
        plots.pareto_scatter(scores, x, y, pids, models).savefig(folder / f"pareto_{_safe(x)}_{_safe(y)}.png", dpi=110)
    plots.prompt_boxplots(scores, names, pids, baseline).savefig(folder / "prompt_boxplots.png", dpi=110)
    if e.runs:
        plots.training_curves(read_training_curves(e.runs)).savefig(folder / "training_curves.png", dpi=110)
