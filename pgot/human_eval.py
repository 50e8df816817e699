"""Human judgement: how well rewards predict human choices (paper Table 1), and a blind user study (Table 6).

* **Reward preference accuracy.** :func:`read_preference_data` reads pairs of images with the image a human
  preferred (Pick-a-Pic style); :func:`preference_accuracy` scores both images of every pair with each reward
  and reports how often the reward prefers the human's choice, with a bootstrap interval over prompts.
* **User study.** :func:`write_study` writes a self-contained page (``study.html``, template
  ``pgot/data/study.html``) of randomised candidate-vs-baseline pairs that never shows model names, and the key
  of which model is on which side (``key.json``); annotators download their votes as JSON files, and
  :func:`tally_votes` turns them into win rates with Wilson intervals.

``pgot-eval`` calls these when ``eval.preference_data``, ``eval.study_pairs`` or ``eval.votes`` is set; the
tables are formatted by :func:`pgot.tables.preference_section` and :func:`pgot.tables.study_section`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import random
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image

from pgot import metrics
from pgot.arrays import table_tensor
from pgot.files import atomic_write_json, atomic_write_text, source_hash
from pgot.images import load_image
from pgot.prompts import SAMPLE_KEY as KEY
from pgot.prompts import find_table, read_table
from pgot.rewards import score_images

__all__ = ["preference_accuracy", "read_preference_data", "tally_votes", "write_study"]

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


# --------------------------------------------------------------------------------------------
# Reward preference accuracy (paper Table 1)
# --------------------------------------------------------------------------------------------


def read_preference_data(path: str | Path) -> pd.DataFrame:
    """Pairs of images with a human choice, Pick-a-Pic style.

    Accepts a .parquet / .csv / .jsonl / .json file or a folder holding ``manifest.*``, read by
    :func:`pgot.prompts.read_table` (BOM, CRLF, empty cells: an empty ``prompt`` cell is the prompt ``""``; a row
    without an image or a label is an error naming its line and column; every unusable row is listed at once), with
    columns ``prompt``, ``image_0`` and ``image_1`` (paths relative to the file's folder, or encoded image bytes,
    also as a ``{"bytes": ...}`` struct; Pick-a-Pic's ``jpg_0`` / ``jpg_1`` also work) and ``label``: the index of
    the preferred image (0 or 1; 0.5 is a tie). Pick-a-Pic's ``label_0`` (1 when image 0 won, 0.5 for a tie)
    works in place of ``label``.

    Returns:
        Columns ``prompt``, ``image_0``, ``image_1`` (absolute path strings or bytes) and ``label`` (0 or 1),
        ties removed; the index holds each row's line in the file.

    Raises:
        ValueError: a missing file, column or value, a label other than 0, 1, 0.5, images that do not exist, or no
            pair with a clear choice (rows named by their lines).
    """
    file = find_table(str(path), "eval.preference_data")
    df = read_table(
        file,
        required=["prompt", ("image_0", "jpg_0"), ("image_1", "jpg_1"), ("label", "label_0")],
        text_columns=["prompt"],
        float_columns=["label", "label_0"],
        key="eval.preference_data",
        hint="Preference data needs the columns prompt, image_0, image_1 (or jpg_0, jpg_1) and label (or label_0).",
    )
    where = f"eval.preference_data={str(file)!r}"

    def first(*columns: str) -> list[Any]:
        present = [df[c].tolist() for c in columns if c in df]
        return [next((v for v in vals if not _empty(v)), None) for vals in zip(*present, strict=True)]

    label = [
        (float(a) if not _empty(a) else 1.0 - float(b))
        for a, b in zip(
            df["label"] if "label" in df else [None] * len(df),
            df["label_0"] if "label_0" in df else [None] * len(df),
            strict=True,
        )
    ]
    bad = [(line, x) for line, x in zip(df.index, label, strict=True) if x not in (0.0, 0.5, 1.0)]
    if bad:
        shown = ", ".join(f"line {line}: {x:g}" for line, x in bad[:10])
        raise ValueError(
            f"{where}: label must be 0 or 1 (the preferred image) or 0.5 (a tie); label_0 1, 0 or 0.5. Got {shown}."
        )
    out = pd.DataFrame({"prompt": df["prompt"].astype(object), "label": label}, index=df.index)
    absent = []
    for i in (0, 1):
        values = []
        for line, v in zip(df.index, first(f"image_{i}", f"jpg_{i}"), strict=True):
            if isinstance(v, dict):  # datasets' Image feature stored as a struct: bytes, or a path
                v = v.get("bytes") or v.get("path")
            if isinstance(v, (bytes, bytearray)):
                values.append(bytes(v))
                continue
            p = Path(str(v))
            p = p if p.is_absolute() else file.parent / p
            if not p.is_file():
                absent.append(f"line {line}: {p}")
            values.append(str(p))
        out[f"image_{i}"] = values
    if absent:
        shown = "\n  ".join(absent[:5])
        raise ValueError(
            f"{where}: {len(absent)} images do not exist, e.g.\n  {shown}\nPaths are relative to the file's folder."
        )
    out = out[out["label"] != 0.5]
    if not len(out):
        raise ValueError(f"{where} has no pair with a clear choice (label 0 or 1).")
    out["label"] = out["label"].astype("int64")
    return out[["prompt", "image_0", "image_1", "label"]]


def _empty(v: Any) -> bool:
    """No value in a cell (None, NaN, pandas NA)."""
    return v is None or (not isinstance(v, (bytes, bytearray, str, dict)) and bool(pd.isna(v)))


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

    Args:
        rewards: built reward models (:func:`pgot.rewards.build`).
        data: :func:`read_preference_data`'s K pairs.
        batch_size: pairs scored per forward pass (images are streamed, never all in memory).
        num_resamples, confidence, seed: the bootstrap over prompts (:func:`pgot.metrics.bootstrap_ci`).
        device: where to score (default: the first reward parameter's device).

    Returns:
        One row per reward (index ``reward``): ``accuracy``, ``low``, ``high`` (bootstrap over prompts), ``pairs``.
    """
    if device is None:
        device = next((p.device for r in rewards for p in r.parameters()), torch.device("cpu"))
    s0_parts, s1_parts = [], []
    for start in range(0, len(data), batch_size):  # stream: never more than a batch of pairs in memory
        part = data.iloc[start : start + batch_size]
        prompts = part["prompt"].tolist()
        s0_parts.append(score_images(rewards, [load_image(v) for v in part["image_0"]], prompts, batch_size, device))
        s1_parts.append(score_images(rewards, [load_image(v) for v in part["image_1"]], prompts, batch_size, device))
    k = len(data)
    s0, s1 = torch.cat(s0_parts), torch.cat(s1_parts)  # (K, M) each
    label = table_tensor(data["label"].to_numpy(), "int64")[:, None]  # (K, 1)
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
    """An image file as a data URI: the file unchanged (``max_side <= 0``), else a JPEG of at most ``max_side`` px."""
    if max_side <= 0:
        mime = _IMAGE_SUFFIXES.get(path.suffix.lower(), "image/png")
        return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()
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
    study_id = source_hash(
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
    template = resources.files("pgot").joinpath("data/study.html").read_text(encoding="utf-8")
    payload = json.dumps({"study_id": study_id, "title": title, "pairs": pairs}).replace("</", "<\\/")
    page = atomic_write_text(Path(out_dir) / "study.html", template.replace("/*__STUDY_DATA__*/", payload))
    atomic_write_json(Path(out_dir) / "key.json", {"study_id": study_id, "baseline": baseline, "pairs": key}, indent=1)
    log.info("user study: %d pairs written to %s", len(pairs), page)
    return page


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
