"""Checkpoints from the Hugging Face hub: where each one comes from, ``pgot-fetch``, and hub ids as paths.

Every checkpoint pgot loads has a known source (:data:`SOURCES`): hub repos, the files pgot reads
from them, their licence, and the folder layout the loaders expect::

    <dest>/stable-diffusion-3.5-large-turbo/   model_index.json, transformer/, vae/, scheduler/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/
    <dest>/clip-vit-large-patch14/             config.json, model.safetensors              (openai/clip-vit-large-patch14)
    <dest>/ICT/                                pytorch_model.bin (8y/ICT), config.json (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)
    <dest>/HP/                                 hp_backbone/pytorch_model.bin, hp_scorer/mlp_pytorch_model.bin (8y/HP)
    <dest>/HPSv2/HPS_v2.1_compressed.pt        (xswu/HPSv2)
    <dest>/PickScore_v1/                       config.json, model.safetensors              (yuvalkirstain/PickScore_v1)
    <dest>/ImageReward/                        ImageReward.pt, med_config.json (THUDM/ImageReward), vocab.txt (google-bert/bert-base-uncased)
    <dest>/aesthetic/                          aesthetic-model.pth (trl-lib/ddpo-aesthetic-predictor), clip/ (openai/clip-vit-large-patch14)

``pgot-fetch --config FILE [key=value ...] --dest DIR`` downloads what a config names into that layout
(through the hub cache, so downloads resume and are shared), links or copies the files into ``DIR``,
and writes the config again with the local paths filled in. :func:`resolve` lets ``model.path`` and a
reward's ``path`` be a hub id (``org/name`` or ``org/name/file``) that is read from the local hub cache:
never downloaded at run time, so a training job does not start a 30 GB download on every process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from pgot.config import Config, config_to_dict
from pgot.files import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE",
    "SOURCES",
    "FetchError",
    "Item",
    "Part",
    "Source",
    "describe",
    "fetch",
    "fetch_command",
    "is_hub_id",
    "main",
    "plan",
    "resolve",
    "write_local_config",
]

GB = 1e9

# --------------------------------------------------------------------------------------------
# The table of sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """Files from one hub repo that go into one checkpoint folder."""

    repo: str
    """Hub repo id, ``org/name``."""
    files: tuple[str, ...] | None
    """``allow_patterns`` (file names or globs, relative to the repo root); None: the whole repo minus :data:`IGNORE`."""
    required: tuple[str, ...] = ()
    """Files the loader reads: a download that lacks one is an error."""
    into: str = ""
    """Subfolder of the checkpoint folder the files land in ("" = the folder itself)."""
    licence: str = "not stated here: read the model card"
    gated: bool = False
    """The hub asks you to accept the licence on the model page (and to be logged in) before downloading."""
    size: float | None = None
    """Approximate download size in bytes, for ``--dry-run`` (model cards and parameter counts)."""
    optional: bool = False
    """The loader also works without this part (ICT's config.json: the built-in ViT-H-14 shape; SD3's T5)."""


@dataclass(frozen=True)
class Source:
    """One checkpoint in pgot's layout: a folder (or a file in it) assembled from one or more :class:`Part`."""

    name: str
    """Folder name under ``--dest``."""
    parts: tuple[Part, ...]
    file: str = ""
    """The config points at this file inside the folder (HPSv2); "" = at the folder."""
    description: str = ""

    @property
    def repo(self) -> str:
        """The main repo (a hub id naming it selects this source)."""
        return self.parts[0].repo


_SD3_CORE = (
    "model_index.json",
    "scheduler/*",
    "transformer/*",
    "vae/*",
    "text_encoder/*",
    "text_encoder_2/*",
    "tokenizer/*",
    "tokenizer_2/*",
)
_SD3_REQUIRED = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "transformer/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer_config.json",
)
_SD3_T5 = ("text_encoder_3/*", "tokenizer_3/*")
_STABILITY = "Stability AI Community License (free below USD 1M annual revenue)"

IGNORE = ("*.msgpack", "*.h5", "*.onnx", "*.ot", "*.tflite", "tf_model*", "flax_model*", "*.md", ".gitattributes")
"""Never downloaded from a repo that is not in :data:`SOURCES` (other frameworks' copies of the weights)."""


def _sd3(repo: str, core_gb: float | None, licence: str = _STABILITY, gated: bool = True) -> Source:
    return Source(
        name=repo.split("/")[-1],
        parts=(
            Part(repo, _SD3_CORE, _SD3_REQUIRED, licence=licence, gated=gated, size=core_gb and core_gb * GB),
            Part(
                repo,
                _SD3_T5,
                ("text_encoder_3/config.json",),
                licence=licence,
                gated=gated,
                size=core_gb and 9.5 * GB,
                optional=True,
            ),
        ),
        description="SD3 / SD3.5 diffusers folder; the T5 encoder only with model.use_t5=true",
    )


_CLIP_L = Part(
    "openai/clip-vit-large-patch14",
    ("config.json", "model.safetensors"),
    ("config.json", "model.safetensors"),
    licence="MIT (OpenAI CLIP)",
    size=1.71 * GB,
)
_ICTHP = "not stated on the model card; code MIT (github.com/BarretBa/ICTHP)"

SOURCES: dict[str, dict[str, Source]] = {
    "model": {
        s.repo: s
        for s in (
            _sd3("stabilityai/stable-diffusion-3.5-large-turbo", 18.1),
            _sd3("stabilityai/stable-diffusion-3.5-large", 18.1),
            _sd3("stabilityai/stable-diffusion-3.5-medium", 6.8),
            _sd3("stabilityai/stable-diffusion-3-medium-diffusers", 6.0),
        )
    },
    "clip": {
        "openai/clip-vit-large-patch14": Source("clip-vit-large-patch14", (_CLIP_L,), description="CLIP ViT-L/14")
    },
    "ict": {
        "8y/ICT": Source(
            "ICT",
            (
                Part("8y/ICT", ("pytorch_model.bin",), ("pytorch_model.bin",), licence=_ICTHP, size=3.94 * GB),
                Part(
                    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                    ("config.json",),
                    ("config.json",),
                    licence="MIT",
                    size=5e3,
                    optional=True,
                ),
            ),
            description="ICT: the CLIPModel state dict of 8y/ICT with the config of the laion ViT-H-14 it was tuned from",
        )
    },
    "hp": {
        "8y/HP": Source(
            "HP",
            (
                Part(
                    "8y/HP",
                    ("hp_backbone/config.json", "hp_backbone/pytorch_model.bin", "hp_scorer/mlp_pytorch_model.bin"),
                    ("hp_backbone/pytorch_model.bin", "hp_scorer/mlp_pytorch_model.bin"),
                    licence=_ICTHP,
                    size=3.95 * GB,
                ),
            ),
            description="HP: ViT-H-14 image tower + MLP head",
        )
    },
    "hps": {
        f: Source(
            "HPSv2",
            (Part("xswu/HPSv2", (f,), (f,), licence="Apache-2.0", size=1.97 * GB),),
            file=f,
            description=f"HPSv{'2.1' if '2.1' in f else '2.0'} (open_clip ViT-H-14)",
        )
        for f in ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")
    },
    "pickscore": {
        "yuvalkirstain/PickScore_v1": Source(
            "PickScore_v1",
            (
                Part(
                    "yuvalkirstain/PickScore_v1",
                    ("config.json", "model.safetensors"),
                    ("config.json", "model.safetensors"),
                    licence="not stated on the model card; code MIT (github.com/yuvalkirstain/PickScore)",
                    size=3.94 * GB,
                ),
            ),
            description="PickScore v1 (CLIPModel)",
        )
    },
    "imagereward": {
        "THUDM/ImageReward": Source(
            "ImageReward",
            (
                Part(
                    "THUDM/ImageReward",
                    ("ImageReward.pt", "med_config.json"),
                    ("ImageReward.pt", "med_config.json"),
                    licence="Apache-2.0",
                    size=1.79 * GB,
                ),
                Part("google-bert/bert-base-uncased", ("vocab.txt",), ("vocab.txt",), licence="Apache-2.0", size=2.3e5),
            ),
            description="ImageReward: BLIP + MLP, with bert-base-uncased's WordPiece vocabulary",
        )
    },
    "aesthetic": {
        "trl-lib/ddpo-aesthetic-predictor": Source(
            "aesthetic",
            (
                Part(
                    "trl-lib/ddpo-aesthetic-predictor",
                    ("aesthetic-model.pth",),
                    ("aesthetic-model.pth",),
                    licence="Apache-2.0 (LAION improved-aesthetic-predictor, linearMSE head; hub copy by TRL)",
                    size=3.7e6,
                ),
                dataclasses.replace(_CLIP_L, into="clip"),
            ),
            description="LAION aesthetic predictor: linear MLP on the OpenAI ViT-L/14 image embedding",
        )
    },
}
"""Known checkpoints: ``"model"`` or a reward name -> variant -> :class:`Source`; the first variant is the default."""


# --------------------------------------------------------------------------------------------
# Hub ids
# --------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.+-]+)*$")


def is_hub_id(path: str) -> bool:
    """Whether ``path`` reads as a hub id: ``org/name`` or ``org/name/file`` (not ``/x``, ``./x``, ``~/x``)."""
    return bool(path) and not path.startswith(("/", ".", "~")) and bool(_HUB_ID.match(path))


def _split(hub_id: str) -> tuple[str, str]:
    parts = hub_id.split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])


def _lookup(kind: str, repo: str, filename: str = "") -> Source | None:
    """The known source of ``kind`` whose main repo is ``repo`` (and whose file is ``filename``, when given)."""
    kinds = [kind] if kind else list(SOURCES)
    for k in kinds:
        for source in SOURCES.get(k, {}).values():
            if source.repo == repo and (not filename or filename == source.file):
                return source
    return None


def _cache_dir(cache_dir: str | Path | None = None) -> str:
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def _fetch_hint(repo: str, filename: str, key: str) -> str:
    return (
        "Download it with `pgot-fetch --config <your config>` (every checkpoint the config names, the licences to "
        f"accept first, and a config with local paths; a rerun resumes), or `hf download {repo}"
        f"{' ' + filename if filename else ''}`; or point {key} at a local copy."
    )


def resolve(
    path_or_id: str,
    *,
    key: str,
    kind: str = "",
    allow_patterns: Sequence[str] | None = None,
    subject: str = "",
    hint: str = "",
    cache_dir: str | Path | None = None,
) -> Path:
    """A local path as is, or a hub id resolved through the local hub cache (never downloaded).

    A hub id is ``org/name`` (the snapshot folder) or ``org/name/file`` (that file). Only the local
    hub cache is read (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``), with or without
    ``HF_HUB_OFFLINE``: downloading is :func:`fetch`'s job, where licences are shown first.

    Args:
        path_or_id: the configured value.
        key: the config key as typed (``model.path``, ``rewards.2.path``), for the error message.
        kind: ``"model"`` or a reward name: a known repo of that kind (:data:`SOURCES`) gives the files to
            check and, for a checkpoint assembled from several repos, an error that says so.
        allow_patterns: the files the folder must hold (default: from :data:`SOURCES`).
        subject: how the error message names the value (default ``key=value``).
        hint: how to get the checkpoint, for the error message (default: ``pgot-fetch`` and ``hf download``).
        cache_dir: hub cache folder (default: huggingface_hub's).

    Returns:
        The local path, the cached snapshot folder, or the cached file (for a source with a ``file``).

    Raises:
        ValueError: the path does not exist and the hub id is not (completely) in the cache, or names a
            checkpoint that needs files from several repos; the message names ``key`` and what to run.
    """
    local = Path(path_or_id).expanduser()
    if local.exists():
        return local
    subject = subject or f"{key}={path_or_id!r}"
    if not is_hub_id(path_or_id):
        raise ValueError(
            f"{subject} does not exist. Point {key} at a local copy, or at a hub id (org/name) downloaded with "
            "`pgot-fetch --config <your config>`."
        )
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, filename = _split(path_or_id)
    cache = _cache_dir(cache_dir)
    source = _lookup(kind, repo, filename) or (_adhoc(kind, repo, "") if kind == "model" else None)
    if kind == "model" and filename:
        raise ValueError(f"{subject}: a model is a hub repo (org/name), not a file in one. Set {key}={repo}.")
    if source is not None:
        others = [p for p in source.parts if p.repo != repo and not p.optional]
        if others:
            need = "; ".join(f"{p.repo}: {', '.join(p.required)}" for p in others)
            raise ValueError(
                f"{subject} names the hub repo {repo!r}, but this checkpoint also needs files from other repos ({need}). "
                f"Run `pgot-fetch --config <your config>`: it assembles them in one folder ({source.name}/) and "
                f"writes a config whose {key} points there."
            )
        if source.file and not filename:
            filename = source.file
    fix = hint or _fetch_hint(repo, filename, key)
    where = f"does not exist locally, and the hub repo {repo!r}"
    if filename:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=cache, local_files_only=True))
        except LocalEntryNotFoundError:
            raise ValueError(
                f"{subject} {where} with {filename!r} is not in the local hub cache ({cache}). {fix}"
            ) from None
        except ValueError as err:  # HFValidationError: not a valid repo id after all
            raise ValueError(f"{subject} {where}: {err}. Point {key} at a local path or a hub id.") from None
    mine = [p for p in (source.parts if source else ()) if p.repo == repo and not p.optional]
    patterns = (
        list(allow_patterns) if allow_patterns is not None else [f for p in mine for f in (p.files or ())] or None
    )
    try:
        folder = Path(snapshot_download(repo, allow_patterns=patterns, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError as err:  # IncompleteSnapshotError is one: the cached listing shows missing files
        state = "is only partly (an interrupted download)" if "incomplete" in str(err) else "is not"
        raise ValueError(f"{subject} {where} {state} in the local hub cache ({cache}). {fix}") from None
    except ValueError as err:
        raise ValueError(f"{subject} {where}: {err}. Point {key} at a local path or a hub id.") from None
    missing = [f for p in mine for f in p.required if not (folder / f).exists()]
    if missing:
        raise ValueError(
            f"{subject} {where} is only partly in the local hub cache ({cache}): no {', '.join(missing)}. {fix}"
        )
    return folder


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One checkpoint a config names, and what :func:`fetch` does with it."""

    key: str
    """Config key as typed: ``model.path``, ``rewards.2.path``."""
    kind: str
    """``"model"`` or the reward name."""
    value: str
    """The configured path or hub id."""
    source: Source | None = None
    """Where it comes from (None for a local path that is kept)."""
    parts: tuple[Part, ...] = ()
    """The parts of ``source`` to fetch (SD3's T5 only with ``model.use_t5``)."""
    target: Path | None = None
    """The path the written config will name (in ``dest``); None for a local path kept as it is."""
    status: str = "download"
    """``local`` (an existing path, kept), ``present`` (already in dest), ``cached`` (in the hub cache: linked
    or copied, no download), ``download``, ``fetched`` (after :func:`fetch`) or ``error``."""
    note: str = ""
    """Why, for ``error`` and ``local`` items."""

    @property
    def folder(self) -> Path | None:
        """The checkpoint folder in dest."""
        if self.target is None or self.source is None:
            return None
        return self.target.parent if self.source.file else self.target

    def size(self) -> float | None:
        """Approximate download size in bytes (None when unknown)."""
        sizes = [p.size for p in self.parts]
        return None if any(s is None for s in sizes) else float(sum(sizes))  # type: ignore[arg-type]


def _marker(dest: Path, name: str) -> Path:
    # Outside the checkpoint folder: model.py fingerprints every file of the model folder.
    return dest / ".pgot-fetch" / f"{name}.json"


def _is_present(item: Item, dest: Path) -> bool:
    """Whether a previous :func:`fetch` placed every file of this item (recorded in its marker) and they are still there."""
    if item.source is None or item.folder is None:
        return False
    marker = _marker(dest, item.source.name)
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if record.get("repos") != sorted({p.repo for p in item.parts}) or not record.get("files"):
        return False
    for rel, size in record["files"].items():
        f = item.folder / rel
        if not f.is_file() or f.stat().st_size != size:
            return False
    return all((item.folder / p.into / r).is_file() for p in item.parts for r in p.required)


def _is_cached(item: Item, cache_dir: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return all(
        isinstance(try_to_load_from_cache(p.repo, r, cache_dir=cache_dir), str) for p in item.parts for r in p.required
    )


def _unique_name(source: Source, taken: dict[str, Source]) -> Source:
    if taken.get(source.name, source) == source:
        taken[source.name] = source
        return source
    renamed = dataclasses.replace(source, name=source.repo.replace("/", "--"))
    taken[renamed.name] = renamed
    return renamed


def _adhoc(kind: str, repo: str, filename: str) -> Source:
    """A repo that is not in :data:`SOURCES`: the named file, or the repo without other frameworks' weights."""
    name = repo.split("/")[-1]
    if kind == "model":
        return _sd3(repo, None, licence="not in pgot's table: read the model card", gated=False)
    if filename:
        return Source(name, (Part(repo, (filename,), (filename,), size=None),), file=filename)
    return Source(name, (Part(repo, None, size=None),))


def _item(kind: str, key: str, value: str, use_t5: bool, dest: Path, taken: dict[str, Source]) -> Item:
    item = Item(key=key, kind=kind, value=value)
    local = Path(value).expanduser()
    if local.exists():
        item.status, item.note = "local", "an existing local path: kept as it is"
        return item
    source: Source | None
    if is_hub_id(value):
        repo, filename = _split(value)
        if kind == "model" and filename:
            item.status, item.note = "error", f"{key}={value!r}: a model is a hub repo (org/name). Set {key}={repo}."
            return item
        source = _lookup(kind, repo, filename) or _adhoc(kind, repo, filename)
    else:
        variants = SOURCES[kind]
        if kind == "model":
            source = next((s for s in variants.values() if s.name == local.name), None)
            if source is None:
                item.status = "error"
                item.note = (
                    f"{key}={value!r} does not exist, and pgot-fetch cannot tell which model it names. Set {key} to a "
                    f"hub id (e.g. {key}=stabilityai/stable-diffusion-3.5-large-turbo) or to an existing folder."
                )
                return item
        else:  # the reward's default source; a known file name (HPSv2) picks its variant
            source = next((s for s in variants.values() if s.file and s.file == local.name), None)
            source = source or next(iter(variants.values()))
    item.source = _unique_name(source, taken)
    item.parts = tuple(p for p in item.source.parts if use_t5 or kind != "model" or not p.optional)
    folder = dest / item.source.name
    item.target = folder / item.source.file if item.source.file else folder
    return item


def plan(
    cfg: Config,
    dest: str | Path = "weights",
    *,
    only: str | None = None,
    cache_dir: str | Path | None = None,
) -> list[Item]:
    """Every checkpoint ``cfg`` names (``model.path``, each learned reward's ``path``) and what to do with it.

    Tiny, random and analytic models need nothing. An existing local path is kept. A hub id names its
    repo; a missing local path names the reward's default source (for the model, the known repo whose
    name is the folder's name). Nothing is downloaded.

    Args:
        cfg: a loaded config.
        dest: folder the checkpoints go into, in pgot's layout.
        only: ``"model"`` or ``"rewards"`` to plan one of the two.
        cache_dir: hub cache folder (default: huggingface_hub's).

    Returns:
        One :class:`Item` per checkpoint, in config order; items that cannot be planned have status ``error``.
    """
    dest = Path(dest).expanduser().absolute()
    cache = _cache_dir(cache_dir)
    taken: dict[str, Source] = {}
    items = []
    if only in (None, "model") and not cfg.model.tiny:
        items.append(_item("model", "model.path", cfg.model.path, cfg.model.use_t5, dest, taken))
    if only in (None, "rewards"):
        for i, r in enumerate(cfg.rewards):
            if r.name in SOURCES and r.name != "model" and r.path not in ("", "tiny", "random"):
                items.append(_item(r.name, f"rewards.{i}.path", r.path, True, dest, taken))
    for item in items:
        if item.status == "download":
            if _is_present(item, dest):
                item.status = "present"
            elif _is_cached(item, cache):
                item.status = "cached"
    return items


# --------------------------------------------------------------------------------------------
# Fetch
# --------------------------------------------------------------------------------------------


class FetchError(ValueError):
    """Some items could not be fetched; ``problems`` has one line per item; ``user_error`` is False for network trouble."""

    def __init__(self, problems: list[str], user_error: bool = True):
        self.problems = list(problems)
        self.user_error = user_error
        super().__init__("\n".join(self.problems))


def _place(src: Path, dst: Path) -> str:
    """Hard-link the cached blob behind ``src`` to ``dst`` (a copy across file systems); atomic; skips equal files."""
    blob = src.resolve()
    if dst.is_file() and (os.path.samefile(blob, dst) or dst.stat().st_size == blob.stat().st_size):
        return "present"
    how = ["linked"]

    def place(tmp: Path) -> None:
        try:
            os.link(blob, tmp)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(blob, tmp)
            how[0] = "copied"

    atomic_write(dst, place, fsync=False)
    return how[0]


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _gated_help(part: Part) -> str:
    return (
        f"accept the licence ({part.licence}) at https://huggingface.co/{part.repo} with your account, log in with "
        "`hf auth login` (or set HF_TOKEN), then rerun"
    )


def _fetch_part(item: Item, part: Part, cache: str) -> tuple[str, dict[str, int]]:
    """Download (or find in the cache) one part and place its files; returns (commit, {relative path: size})."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    snapshot = Path(
        snapshot_download(
            part.repo,
            allow_patterns=list(part.files) if part.files else None,
            ignore_patterns=None if part.files else list(IGNORE),
            cache_dir=cache,
        )
    )
    found = sorted(
        filter_repo_objects(
            (p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()),
            allow_patterns=list(part.files) if part.files else None,
            ignore_patterns=None if part.files else list(IGNORE),
        )
    )
    missing = [r for r in part.required if r not in found]
    if missing and _offline():
        raise FetchError(
            [
                f"{item.key}={item.value!r}: {part.repo} is only partly in the local hub cache (no {', '.join(missing)}) "
                "and HF_HUB_OFFLINE is set. Unset HF_HUB_OFFLINE and rerun (downloads resume)."
            ]
        )
    if missing:
        raise FetchError(
            [
                f"{item.key}={item.value!r}: {part.repo} (commit {snapshot.name}) has no {', '.join(missing)}, which "
                f"pgot reads. The repo may have changed: check it on the hub, and point {item.key} at a local copy."
            ]
        )
    if not found:
        raise FetchError([f"{item.key}={item.value!r}: no files of {part.repo} matched; check the repo on the hub."])
    assert item.folder is not None
    files = {}
    for rel in found:
        dst = item.folder / part.into / rel
        _place(snapshot / rel, dst)
        files[dst.relative_to(item.folder).as_posix()] = dst.stat().st_size
    return snapshot.name, files


def _explain(item: Item, part: Part, err: Exception) -> tuple[str, bool]:
    """A one-line message and whether it is the user's to fix (else: network trouble, rerun)."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    head = f"{item.key}={item.value!r}: {part.repo}"
    if isinstance(err, GatedRepoError):
        return f"{head} is gated: {_gated_help(part)}.", True
    if isinstance(err, RepositoryNotFoundError):
        return (
            f"{head} does not exist on the hub, or is private or gated for your account. Check the id; for a gated "
            f"repo {_gated_help(part)}.",
            True,
        )
    if isinstance(err, LocalEntryNotFoundError):
        offline = _offline()
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        return (
            f"{head} is not in the local hub cache and {why}. "
            f"{'Unset HF_HUB_OFFLINE' if offline else 'Check the connection'} and rerun (downloads resume).",
            offline,
        )
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{head}: download failed ({type(err).__name__}: {first}). Rerun to resume.", False


def fetch(
    cfg: Config,
    dest: str | Path = "weights",
    *,
    only: str | None = None,
    cache_dir: str | Path | None = None,
    items: list[Item] | None = None,
    report: Callable[[str], None] = print,
) -> list[Item]:
    """Download every checkpoint of :func:`plan` and place it in ``dest`` in pgot's layout.

    Files come through the hub cache (``snapshot_download`` with ``allow_patterns``: only the files pgot
    reads; interrupted downloads resume; huggingface_hub draws the progress bars) and are hard-linked into
    ``dest`` (copied across file systems). An item already complete in ``dest`` is reported ``present`` and
    skipped; a rerun after a failure fetches only what is missing. Every item is tried before failing.

    Args:
        cfg: a loaded config.
        dest: destination folder.
        only: ``"model"`` or ``"rewards"``.
        cache_dir: hub cache folder (default: huggingface_hub's).
        items: a plan made by :func:`plan` with the same arguments (default: planned here).
        report: receives one line per item.

    Returns:
        The items, with status ``local``, ``present`` or ``fetched``.

    Raises:
        FetchError: one line per item that could not be planned or fetched.
    """
    dest = Path(dest).expanduser().absolute()
    cache = _cache_dir(cache_dir)
    items = plan(cfg, dest, only=only, cache_dir=cache) if items is None else items
    problems = [i.note for i in items if i.status == "error"]
    if problems:
        raise FetchError(problems)
    user_error = True
    for item in items:
        if item.status in ("local", "present"):
            report(f"{item.key}: {item.status} ({item.value if item.status == 'local' else item.target})")
            continue
        assert item.source is not None and item.folder is not None
        record: dict = {"key": item.key, "value": item.value, "repos": sorted({p.repo for p in item.parts})}
        commits, files, failed = {}, {}, set()
        for part in item.parts:
            if part.repo in failed:  # the same repo's next part (SD3's T5) would fail the same way
                continue
            try:
                commits[part.repo], placed = _fetch_part(item, part, cache)
                files.update(placed)
            except FetchError as err:
                problems.extend(err.problems)
                failed.add(part.repo)
            except Exception as err:  # hub and network errors: explained, then the next part and item
                message, mine = _explain(item, part, err)
                problems.append(message)
                user_error = user_error and mine
                failed.add(part.repo)
        if failed:
            continue
        record |= {"commits": commits, "files": files, "fetched": datetime.now(timezone.utc).isoformat()}
        marker = _marker(dest, item.source.name)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(record, indent=2) + "\n")
        item.status = "fetched"
        report(f"{item.key}: fetched {len(files)} files into {item.folder}")
    if problems:
        raise FetchError(problems, user_error=user_error)
    return items


def write_local_config(cfg: Config, items: Sequence[Item], out: str | Path, *, origin: str = "") -> Path:
    """Write ``cfg`` with each fetched item's path replaced by its local path in dest; ``load_config`` reads it.

    Args:
        cfg: the config the items were planned from (overrides included).
        items: from :func:`plan` / :func:`fetch`; items kept as local paths leave their key unchanged.
        out: the YAML file to write.
        origin: the input config and overrides, for the header comment.

    Returns:
        The written file.
    """
    data = config_to_dict(cfg)
    for item in items:
        if item.target is None or item.status == "local":
            continue
        if item.key == "model.path":
            data["model"]["path"] = str(item.target)
        else:
            data["rewards"][int(item.key.split(".")[1])]["path"] = str(item.target)
    out = Path(out)
    header = (
        f"# Written by pgot-fetch{f' from {origin}' if origin else ''}: the same config with local checkpoint paths.\n"
        f"# Use it as any pgot config, e.g. pgot-train --config {out}\n"
    )
    return atomic_write_text(out, header + yaml.safe_dump(data, sort_keys=False))


# --------------------------------------------------------------------------------------------
# pgot-fetch
# --------------------------------------------------------------------------------------------


def _human(size: float | None) -> str:
    if size is None:
        return "size unknown"
    if size >= 0.1 * GB:
        return f"~{size / GB:.1f} GB"
    return f"~{size / 1e6:.1f} MB" if size >= 1e5 else f"~{size / 1e3:.0f} kB"


def _exact_size(item: Item, cache: str) -> float | None:
    """The size from the hub cache's tree listing (kept by earlier downloads), when every part has one."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.utils import filter_repo_objects

    total = 0.0
    for part in item.parts:
        try:
            tree = get_cached_repo_tree(part.repo, cache_dir=cache)
        except Exception:  # no listing cached: the table's estimate serves
            return None
        total += sum(
            f.size
            for f in filter_repo_objects(
                tree,
                allow_patterns=list(part.files) if part.files else None,
                ignore_patterns=None if part.files else list(IGNORE),
                key=lambda f: f.path,
            )
        )
    return total


def describe(items: Sequence[Item], cache_dir: str | Path | None = None) -> list[str]:
    """The plan as text: licences first (gated ones to accept before downloading), then one block per item."""
    cache = _cache_dir(cache_dir)
    lines = []
    parts = {p.repo: p for i in items if i.status not in ("local", "error") for p in i.parts}
    if parts:
        gated = [p for p in parts.values() if p.gated]
        if gated:
            lines.append(
                "Gated: accept each licence on its hub page with your account, and log in (`hf auth login` or HF_TOKEN):"
            )
            lines += [f"  {p.repo}: {p.licence}  https://huggingface.co/{p.repo}" for p in gated]
        lines.append("Licences of the checkpoints (the terms you use them under):")
        lines += [f"  {p.repo}: {p.licence}" for p in parts.values()]
    total, unknown = 0.0, False
    for item in items:
        if item.status == "error":  # reported by the caller
            continue
        if item.status == "local":
            lines.append(f"{item.key}: local, kept ({item.value})")
            continue
        size = _exact_size(item, cache)
        size = item.size() if size is None else size
        if item.status == "download":
            total += size or 0.0
            unknown = unknown or size is None
        state = {"present": "present", "cached": "in the hub cache", "download": "to download"}[item.status]
        what = f" ({item.source.description})" if item.source and item.source.description else ""
        lines.append(f"{item.key}: {item.value} -> {item.target}  [{state}, {_human(size)}]{what}")
        for p in item.parts:
            files = ", ".join(p.files) if p.files else f"all files except {', '.join(IGNORE)}"
            into = f" into {p.into}/" if p.into else ""
            lines.append(f"    {p.repo}: {files}{into}")
    if any(i.status == "download" for i in items):
        lines.append(f"To download: {_human(total)}{' plus items of unknown size' if unknown else ''}.")
    return lines


def fetch_command(
    cfg: Config,
    *,
    config: str,
    overrides: Sequence[str] = (),
    dest: str | Path = "weights",
    out_config: str | Path | None = None,
    dry_run: bool = False,
    only: str | None = None,
    cache_dir: str | Path | None = None,
) -> int:
    """What ``pgot-fetch`` does once its config is loaded: plan, print the plan, fetch, write the local config.

    Args:
        cfg: the loaded config.
        config: the config file as given (names the written config and its header).
        overrides: the overrides given, for the header of the written config.
        dest: folder for the checkpoints.
        out_config: the config to write (default ``<dest>/<config name>.yaml``).
        dry_run: print the plan only.
        only: ``"model"`` or ``"rewards"``.
        cache_dir: hub cache folder.

    Returns:
        0.

    Raises:
        FetchError: items that could not be planned or fetched (``user_error`` False for network trouble).
    """
    dest = Path(dest).expanduser().absolute()
    out = Path(out_config) if out_config else dest / f"{Path(config).stem}.yaml"
    items = plan(cfg, dest, only=only, cache_dir=cache_dir)
    if not items:
        print("nothing to fetch: the config names no checkpoint (tiny, random or analytic models only).")
        return 0
    print(f"pgot-fetch {config} -> {dest} (through the hub cache {_cache_dir(cache_dir)})")
    for line in describe(items, cache_dir):
        print(line)
    errors = [i.note for i in items if i.status == "error"]
    if errors:
        raise FetchError(errors)
    if dry_run:
        print(f"dry run: nothing downloaded; would write {out}")
        return 0
    try:
        fetch(cfg, dest, cache_dir=cache_dir, items=items)
    except FetchError:
        print("the config with local paths is written once every item is there; rerun to continue.", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("interrupted; completed downloads are kept in the hub cache and a rerun resumes", file=sys.stderr)
        raise
    written = write_local_config(cfg, items, out, origin=" ".join([str(config), *overrides]))
    print(f"wrote {written}: use it with --config {written}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``pgot-fetch``: the command of :func:`fetch_command`, with pgot's CLI conventions (:func:`pgot.cli.fetch_main`)."""
    from pgot.cli import fetch_main  # the CLI imports this module

    return fetch_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
