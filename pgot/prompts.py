"""Prompt sets: loading from local files, stable ids, train/eval splits, the P x N sample layout; user tables.

A prompt's **id** is its 0-based row index in the file after blank rows (empty or whitespace-only text) are
dropped; ``prompts.limit`` keeps the first ids, so ids do not change with the limit. Ids are as stable as the
file: editing or reordering rows renumbers prompts. Every prompt also carries ``hash``, the first 12 hex digits
of the sha1 of its UTF-8 text (:func:`prompt_hash`), which frontier stores and evaluations keep so that a
changed file is detected rather than silently mismatched.

Formats: ``.txt`` (one prompt per line, no header), ``.csv``, ``.jsonl`` and ``.parquet`` (text in the column
``prompts.column``), and ``builtin:demo`` for the prompts shipped in ``pgot/data/demo_prompts.txt``.

Reading rules, the same for every format (:func:`read_table` implements them for .csv/.jsonl/.json/.parquet and
is the one reader of pgot's user tables: prompt files, eval manifests, preference data):

* **Encoding:** UTF-8; a byte-order mark is removed (UTF-8, and UTF-16/UTF-32 files, which carry one, are decoded
  accordingly). It never ends up in the first prompt or the first column name.
* **Line ends:** ``\n``, ``\r\n`` and ``\r`` all end a line; nothing else does (``str.splitlines`` would also
  split a prompt at U+2028, U+0085 or a form feed). Line numbers are 1-based, as an editor shows them.
* **Empty cells:** in a free-text column (the prompt) an empty cell is the empty string ``""``, never NaN, and
  CSV cells are text exactly as written (``NA``, ``null``, ``nan``, ``007`` stay that text). A cell with *no
  value* (JSON ``null``, a missing JSON field, a parquet null, a CSV row with too few fields, or an empty cell
  of any other column) in a required column is an error naming the line and the column.
* **Unusable rows** (malformed JSON, a JSON line that is not an object, a missing field, a CSV row with more
  fields than the header, a .txt header line) are never dropped silently: all of them are reported with their
  line numbers in one error.
* **.txt header:** a .txt file has no header; a first line that reads like one (``prompt``, ``prompts``,
  ``text``, ``caption``, ``captions`` or ``prompts.column``, ignoring case and surrounding spaces) is reported
  as an unusable row rather than trained on as a prompt. Delete it, or use a .csv file.

For prompt files, blank prompts (the empty string, or whitespace only) are then dropped as blank rows (the id
rule above); other tables keep ``""`` as a value (an empty prompt is the prompt ``""``).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from pgot.config import PromptsConfig

__all__ = [
    "BUILTIN",
    "MANIFEST_NAMES",
    "SAMPLE_KEY",
    "PromptSet",
    "expand",
    "find_table",
    "load_prompts",
    "prompt_hash",
    "read_table",
    "split",
]

logger = logging.getLogger(__name__)

BUILTIN = {"builtin:demo": "demo_prompts.txt", "builtin:testbed": "testbed_prompts.txt"}
"""Names usable as ``prompts.path`` -> file in ``pgot/data``."""

_FORMATS = (".txt", ".csv", ".jsonl", ".parquet")
TABLE_FORMATS = (".csv", ".jsonl", ".json", ".parquet")
"""Formats :func:`read_table` reads."""
MANIFEST_NAMES = tuple(f"manifest{s}" for s in TABLE_FORMATS)
"""The table :func:`find_table` picks in a folder (the first that exists)."""
SAMPLE_KEY = ["prompt_id", "seed", "sample_index"]
"""Columns that identify a sample (its noise depends on them alone) and pair samples of different models."""

_TXT_HEADERS = ("prompt", "prompts", "text", "caption", "captions")
_MAX_LISTED = 50  # problems listed in one error; the rest are counted
_BOMS = (  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def prompt_hash(text: str) -> str:
    """First 12 hex digits of sha1(text as UTF-8): a check that a stored id still names the same prompt."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


@dataclass
class PromptSet:
    """Prompts with their stable ids.

    Attributes:
        prompts: prompt texts.
        ids: stable ids (row index after blank rows are dropped), same length.
        hashes: :func:`prompt_hash` of each prompt.
        source: where they came from (file path or builtin name).
    """

    prompts: list[str]
    ids: list[int]
    hashes: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.ids):
            raise ValueError(f"PromptSet has {len(self.prompts)} prompts but {len(self.ids)} ids.")
        if not self.hashes:
            self.hashes = [prompt_hash(p) for p in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, positions: list[int]) -> PromptSet:
        """The prompts at list positions ``positions`` (not ids), in that order."""
        return PromptSet(
            [self.prompts[i] for i in positions],
            [self.ids[i] for i in positions],
            [self.hashes[i] for i in positions],
            self.source,
        )

    def by_id(self) -> dict[int, str]:
        """id -> prompt text."""
        return dict(zip(self.ids, self.prompts, strict=True))


# --------------------------------------------------------------------------------------------
# Reading user files: decoding, line ends, one error listing every unusable row
# --------------------------------------------------------------------------------------------


def _where(key: str, path: Path | str) -> str:
    return f"{key}={str(path)!r}"


def _decode(data: bytes, key: str, path: Path | str) -> str:
    """Bytes -> text: a byte-order mark selects the encoding and is dropped; otherwise strict UTF-8.

    Raises:
        ValueError: the bytes are not valid in that encoding (naming the line and the byte).
    """
    encoding, start = "utf-8", 0
    for bom, enc in _BOMS:
        if data.startswith(bom):
            encoding, start = enc, len(bom)
            break
    try:
        return data[start:].decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: start + exc.start].count(b"\n") + 1
        raise ValueError(
            f"{_where(key, path)} could not be read as {encoding.upper()} text: byte "
            f"0x{data[start + exc.start]:02x} on line {line} is invalid ({exc.reason}). Save the file as UTF-8."
        ) from None


def _lines(text: str) -> list[str]:
    """Split on \\n, \\r\\n and \\r only (``str.splitlines`` also splits at U+2028, U+0085, form feeds...)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _listing(problems: list[tuple[int, str]], unit: str) -> str:
    """'has 3 rows that cannot be used:' and one indented line per problem (the first _MAX_LISTED)."""
    rows = len({n for n, _ in problems})
    shown = [f"  {unit} {n}{msg}" for n, msg in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        shown.append(f"  ... and {len(problems) - _MAX_LISTED} more")
    return f"has {rows} row{'s' if rows > 1 else ''} that cannot be used:\n" + "\n".join(shown)


def _fail(key: str, path: Path | str, problems: list[tuple[int, str]], unit: str = "line") -> None:
    """Raise one ValueError listing every unusable row (``problems``: (row number, message)), if any."""
    if problems:
        raise ValueError(
            f"{_where(key, path)} {_listing(problems, unit)}\n"
            "Fix or delete these rows (pgot does not skip rows silently)."
        )


def _missing(v: Any) -> bool:
    """No value: None, NaN, pandas NA/NaT (by type name: no pandas import in this per-cell test)."""
    if v is None:
        return True
    if isinstance(v, float):
        return math.isnan(v)
    return type(v).__name__ in ("NAType", "NaTType")


def _clean_name(name: Any) -> str:
    return str(name).lstrip("\ufeff").strip()


def _column_names(raw: Sequence[Any], wanted: set[str], where: str) -> list[str]:
    """Cleaned column names; an empty one becomes ``Unnamed: i`` and a repeated one ``name.i`` (as pandas does),
    unless the caller asked for it, which is an error: which of the two would it mean?"""
    names = [_clean_name(h) or f"Unnamed: {i}" for i, h in enumerate(raw)]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            if n in wanted:
                raise ValueError(
                    f"{where} has the column {n!r} twice (columns {seen[n] + 1} and {i + 1}). Rename or delete one."
                )
            names[i] = f"{n}.{i}"
        seen.setdefault(n, i)
    return names


_ABSENT = object()  # a JSON field that is not there (vs. null) or a CSV field past the end of its row


def _read_csv_cells(text: str, key: str, path: Path) -> tuple[list[str], list[int], list[list[Any]], list]:
    """Header, line numbers, rows of raw cells (str, or _ABSENT past the end of a short row), problems."""
    problems: list[tuple[int, str]] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    lines: list[int] = []
    rows: list[list[Any]] = []
    start = 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            spaces_only = len(record) == 1 and not record[0].strip() and header is not None and len(header) > 1
            if not record or spaces_only:
                continue  # a blank line (or one of spaces only, in a file with several columns)
            if header is None:
                header = record
                continue
            if len(record) > len(header):
                problems.append(
                    (
                        line,
                        f" has {len(record)} fields, the header has {len(header)} "
                        "(a comma in an unquoted cell? Quote it)",
                    )
                )
                continue
            lines.append(line)
            rows.append(record + [_ABSENT] * (len(header) - len(record)))
    except csv.Error as exc:
        problems.append((start, f" cannot be parsed as CSV ({exc}); the rest of the file was not read"))
    if header is None:
        raise ValueError(f"{_where(key, path)} is empty: a .csv file needs a header line naming its columns.")
    return header, lines, rows, problems


def _read_json_records(text: str, key: str, path: Path, lines_format: bool) -> tuple[list[int], list[dict], list]:
    """Line (or record) numbers, JSON objects, problems."""
    problems: list[tuple[int, str]] = []
    numbers: list[int] = []
    records: list[dict] = []
    if lines_format:
        items = []
        for n, line in enumerate(_lines(text), start=1):
            if not line.strip():
                continue
            try:
                items.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                problems.append((n, f" is not valid JSON ({exc.msg} at column {exc.colno})"))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{_where(key, path)} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
        if not isinstance(data, list):
            raise ValueError(
                f"{_where(key, path)} must hold a JSON array of objects (one per row), got a {type(data).__name__}. "
                "Or write one object per line to a .jsonl file."
            )
        items = list(enumerate(data, start=1))
    for n, obj in items:
        if not isinstance(obj, dict):
            problems.append((n, f" is not a JSON object (got {type(obj).__name__})"))
            continue
        numbers.append(n)
        records.append({_clean_name(k): v for k, v in obj.items()})
    return numbers, records, problems


def _as_int(v: Any) -> int | None:
    """An integer value of a cell (int, integral float, or such a string), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        v = v.strip()
        try:
            return int(v)
        except ValueError:
            try:
                v = float(v)
            except ValueError:
                return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f) or not f.is_integer():
        return None
    x = int(f) if isinstance(v, float) else int(v)
    return x if -(2**63) <= x < 2**63 else None


def _as_float(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        f = float(v.strip() if isinstance(v, str) else v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def find_table(path: str | Path, key: str) -> Path:
    """The table file ``path`` names: the file itself, or the first of ``manifest.{csv,jsonl,json,parquet}`` in a
    folder.

    Args:
        path: as the user typed it.
        key: the config key that gave it (``eval.manifest``, ``eval.preference_data``), for the error.

    Raises:
        ValueError: a folder without a manifest, or a path that does not exist.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        for name in MANIFEST_NAMES:
            if (p / name).is_file():
                return p / name
        raise ValueError(
            f"{key}={str(path)!r} is a folder without {', '.join(MANIFEST_NAMES)}. Point {key} at the table file."
        )
    if not p.is_file():
        raise ValueError(
            f"{key}={str(path)!r} does not exist. Point {key} at a {'/'.join(TABLE_FORMATS)} file or a folder holding "
            "manifest.csv."
        )
    return p


def read_table(
    path: str | Path,
    *,
    required: Sequence[str | Sequence[str]] = (),
    text_columns: Sequence[str] = ("prompt",),
    key: str,
    integer_columns: Sequence[str] = (),
    float_columns: Sequence[str] = (),
    hint: str = "",
) -> pd.DataFrame:
    """Read a user table (.csv, .jsonl, .json array of objects, .parquet) by the reading rules of this module.

    Checks everything before returning and raises one error listing every problem: a missing column, or every
    row that cannot be used, each named by its line (CSV: the line where the record starts, header = line 1;
    JSONL: its line; JSON: its record number; parquet: its 1-based row) and column. Example::

        read_table("runs/eval/manifest.csv", required=["model", ("prompt", "prompt_id"), "path"],
                   text_columns=["prompt"], integer_columns=["prompt_id", "seed", "sample_index"],
                   key="eval.manifest")

    Args:
        path: the file.
        required: columns every row needs a value in. An entry that is a tuple of names is satisfied by any one
            of them (the table needs one of those columns, and each row a value in one of those present).
        text_columns: free-text columns (the prompt): values are ``str`` exactly as in the file, and an empty
            value (an empty CSV cell, ``""``) is the empty string, which counts as a value. JSON and parquet values
            must be strings there. In every other column an empty or whitespace-only string is *no value* (an
            error in a required column). Columns not in the file are ignored.
        key: the config key the path came from, named in errors (``prompts.path``, ``eval.manifest``).
        integer_columns: columns, where present, whose every cell must be an integer (``3``, ``3.0``, ``"3"``);
            returned as int64.
        float_columns: columns, where present, whose every cell must be a number (not NaN); returned as float64.
        hint: appended to the missing-column error (e.g. which config key selects the column).

    Returns:
        A DataFrame with the file's columns (names with a byte-order mark and surrounding spaces removed), in
        file order, one row per usable record; its index, named ``line``, holds each row's line (or record, or
        row) number for the caller's own error messages. Typed columns are int64 (nullable ``Int64`` when an
        alternative column held some rows' values) or float64; other CSV columns are text as written (``007``
        stays ``"007"``; NaN where empty), other JSON and parquet columns as stored.

    Raises:
        ValueError: the file is missing, not a supported format, unreadable or not UTF-8 (the line named);
            a required column is absent (the columns there are listed); or rows cannot be used (all listed).
    """
    import pandas as pd

    p = Path(path).expanduser()
    where = _where(key, path)
    suffix = p.suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise ValueError(f"{where} has an unknown format {p.suffix!r}; use one of {', '.join(TABLE_FORMATS)}.")
    if not p.is_file():
        raise ValueError(f"{where} does not exist or is not a file.")
    text_set, int_set, float_set = set(text_columns), set(integer_columns), set(float_columns)
    wanted = {c for r in required for c in ([r] if isinstance(r, str) else r)} | text_set | int_set | float_set
    problems: list[tuple[int, str]] = []
    unit, noun = "line", "column"
    raw = p.read_bytes() if suffix != ".parquet" else b""
    if suffix == ".csv":
        header, numbers, cells, problems = _read_csv_cells(_decode(raw, key, path), key, p)
        names = _column_names(header, wanted, where)
        columns = {n: [row[i] for row in cells] for i, n in enumerate(names)}
    elif suffix in (".jsonl", ".json"):
        numbers, records, problems = _read_json_records(_decode(raw, key, path), key, p, suffix == ".jsonl")
        unit, noun = ("line", "field") if suffix == ".jsonl" else ("record", "field")
        names = list(dict.fromkeys(k for r in records for k in r))
        columns = {n: [r.get(n, _ABSENT) for r in records] for n in names}
    else:
        try:
            df = pd.read_parquet(p)
        except Exception as exc:  # pyarrow raises many types for a file that is not parquet
            raise ValueError(f"{where} could not be read as .parquet: {type(exc).__name__}: {exc}") from None
        unit = "row"
        names = _column_names(list(df.columns), wanted, where)
        numbers = list(range(1, len(df) + 1))
        columns = {n: df.iloc[:, i].tolist() if n in wanted else [] for i, n in enumerate(names)}

    # table-level: required columns (reported with any rows that could not be parsed)
    absent = []
    for r in required:
        alts = (r,) if isinstance(r, str) else tuple(r)
        if not any(a in columns for a in alts):
            absent.append(repr(alts[0]) + (f" (or {' or '.join(map(repr, alts[1:]))})" if len(alts) > 1 else ""))
    if absent and (numbers or not problems):
        s = "s" if len(absent) > 1 else ""
        also = f"\nIt also {_listing(sorted(problems), unit)}" if problems else ""
        raise ValueError(
            f"{where} has no {noun}{s} {', '.join(absent)} ({noun}s: {', '.join(names) or 'none'}). "
            + (hint or f"Add the {noun}{s}, or rename the one{s} holding {'them' if s else 'it'}.")
            + also
        )

    # row-level: every cell of the required, text and typed columns
    text_cols = [c for c in names if c in text_set]
    for c in text_cols:
        col = columns[c]
        for i, v in enumerate(col):
            if isinstance(v, str):
                continue
            if v is _ABSENT or _missing(v):
                col[i] = None  # judged below if the column is required
            elif suffix == ".parquet" and isinstance(v, (bytes, bytearray)):
                problems.append((numbers[i], f", {noun} {c!r}: holds bytes, not text"))
            else:
                problems.append((numbers[i], f", {noun} {c!r}: {v!r} is a {type(v).__name__}, not text (quote it)"))
    for c in names:
        if c in text_set or (suffix == ".parquet" and c not in wanted):
            continue  # parquet columns nobody asked about are returned as read
        col = columns[c]
        for i, v in enumerate(col):
            if v is _ABSENT or _missing(v) or (isinstance(v, str) and not v.strip()):
                col[i] = None  # outside text columns an empty string is no value
    for r in required:
        alts = [a for a in ((r,) if isinstance(r, str) else r) if a in columns]
        for i in range(len(numbers)):
            if alts and all(columns[a][i] is None for a in alts):
                what = " or ".join(map(repr, alts))
                if suffix in (".jsonl", ".json") and all(records[i].get(a, _ABSENT) is _ABSENT for a in alts):
                    problems.append((numbers[i], f" has no {noun} {what} ({noun}s: {', '.join(records[i]) or 'none'})"))
                else:
                    problems.append((numbers[i], f", {noun} {what}: no value"))
    for c, conv, kind in [(c, _as_int, "an integer") for c in integer_columns] + [
        (c, _as_float, "a number") for c in float_columns
    ]:
        if c not in columns:
            continue
        col = columns[c]
        for i, v in enumerate(col):
            if v is None:
                if not any(c == r or (not isinstance(r, str) and c in r) for r in required):
                    problems.append((numbers[i], f", {noun} {c!r}: no value (give {kind} in every row)"))
                continue
            x = conv(v)
            if x is None:
                problems.append((numbers[i], f", {noun} {c!r}: {v!r} is not {kind}"))
            else:
                col[i] = x
    problems.sort(key=lambda t: t[0])
    _fail(key, path, problems, unit)

    out = {}
    for c in names:
        col = columns[c]
        if c in int_set:  # nullable Int64 only where an alternative column held the value
            out[c] = pd.Series(col, dtype="int64" if None not in col else "Int64")
        elif c in float_set:
            out[c] = pd.Series(col, dtype="float64")
        elif c in text_set:
            out[c] = pd.Series(col, dtype=object)
        elif suffix == ".csv":  # text as written: no guessing that "007" is 7 (cast it, or name it a typed column)
            out[c] = pd.Series([v if v is not None else float("nan") for v in col], dtype=object)
        elif suffix == ".parquet":
            out[c] = df.iloc[:, names.index(c)].reset_index(drop=True)
        else:
            out[c] = pd.Series([float("nan") if v is None else v for v in col], dtype=object).infer_objects()
    frame = pd.DataFrame(out, columns=names)
    frame.index = pd.Index(numbers, name="line")
    return frame


def _read_txt(text: str, key: str, path: Path | str, column: str) -> list[str]:
    """Prompts of a .txt file (one per line, no header): every line, blank ones included (dropped later)."""
    rows = _lines(text)
    if rows and rows[-1] == "":
        rows.pop()  # the newline that ends the last line
    first = next((i for i, r in enumerate(rows) if r.strip()), None)
    if first is not None and rows[first].strip().lower() in {*_TXT_HEADERS, column.strip().lower()}:
        _fail(
            key,
            path,
            [
                (
                    first + 1,
                    f" looks like a header ({rows[first].strip()!r}), not a prompt: a .txt file has one prompt per "
                    "line and no header. Delete the line, or use a .csv file with a header",
                )
            ],
        )
    return rows


def load_prompts(cfg: PromptsConfig) -> PromptSet:
    """Read the prompt set named by ``prompts.path`` (blank rows dropped, ids assigned, ``prompts.limit`` applied).

    Files are read by the reading rules of this module (BOMs, line ends, empty cells, every unusable row
    reported); .csv, .jsonl and .parquet through :func:`read_table` with ``prompts.column`` as the one
    required text column. Prompt texts are stripped of surrounding whitespace.

    Raises:
        ValueError: missing, empty or unreadable file, unknown format, missing column (the message lists
            the columns there are), or rows that cannot be used (all listed with their line numbers).
    """
    name = cfg.path.strip()
    if name.startswith("builtin:"):
        if name not in BUILTIN:
            raise ValueError(f"prompts.path={name!r} is not a builtin prompt set; builtins: {', '.join(BUILTIN)}.")
        res = resources.files("pgot") / "data" / BUILTIN[name]
        rows = _read_txt(_decode(res.read_bytes(), "prompts.path", name), "prompts.path", name, cfg.column)
        source = name
    else:
        if not name:
            raise ValueError(
                "prompts.path is empty. Set it to a .txt/.csv/.jsonl/.parquet file or a builtin prompt set "
                f"({', '.join(BUILTIN)})."
            )
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(
                f"prompts.path={name!r} does not exist or is not a file. Give a prompt file or a builtin prompt set "
                f"({', '.join(BUILTIN)})."
            )
        if path.suffix.lower() not in _FORMATS:
            raise ValueError(
                f"prompts.path={name!r} has an unknown format {path.suffix!r}; use one of {', '.join(_FORMATS)}."
            )
        if path.suffix.lower() == ".txt":
            rows = _read_txt(_decode(path.read_bytes(), "prompts.path", name), "prompts.path", name, cfg.column)
        else:
            noun = "field" if path.suffix.lower() == ".jsonl" else "column"
            hint = f"Set prompts.column to the {noun} that holds the prompt text."
            table = read_table(path, required=[cfg.column], text_columns=[cfg.column], key="prompts.path", hint=hint)
            rows = table[cfg.column].tolist()
        source = str(path)
    prompts = [r.strip() for r in rows if r.strip()]
    if not prompts:
        raise ValueError(f"prompts.path={name!r} holds no prompts (every row is blank).")
    if cfg.limit < 0:
        raise ValueError(f"prompts.limit must be >= 0, got {cfg.limit}.")
    if cfg.limit:
        prompts = prompts[: cfg.limit]
    return PromptSet(prompts, list(range(len(prompts))), source=source)


def _rank_key(seed: int, prompt_id: int) -> bytes:
    return hashlib.blake2b(struct.pack("<qq", int(seed), int(prompt_id)), digest_size=8).digest()


def split(prompt_set: PromptSet, eval_fraction: float, seed: int = 0) -> tuple[PromptSet, PromptSet]:
    """Deterministic train / eval split.

    Prompts are ranked by ``blake2b(seed, id)``; the first ``round(eval_fraction * P)`` (at least one when
    ``eval_fraction > 0``) form the eval split. A prompt's side depends only on ``(seed, id)`` and the set size,
    not on Python's or numpy's random generators. Both splits keep file order.

    Args:
        prompt_set: the prompts.
        eval_fraction: in [0, 1) (``prompts.eval_fraction``).
        seed: ``prompts.split_seed``.

    Returns:
        (train, eval); eval is empty when ``eval_fraction == 0``.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"prompts.eval_fraction must be in [0, 1), got {eval_fraction}.")
    n = len(prompt_set)
    n_eval = 0 if eval_fraction == 0 else max(1, round(eval_fraction * n))
    if n_eval >= n and n_eval > 0:
        raise ValueError(
            f"prompts.eval_fraction={eval_fraction} leaves no training prompts out of {n}. "
            "Lower prompts.eval_fraction or use more prompts (prompts.limit)."
        )
    order = sorted(range(n), key=lambda i: _rank_key(seed, prompt_set.ids[i]))
    eval_pos = set(order[:n_eval])
    train = prompt_set.subset([i for i in range(n) if i not in eval_pos])
    ev = prompt_set.subset([i for i in range(n) if i in eval_pos])
    return train, ev


def expand(prompt_set: PromptSet, samples_per_prompt: int, start: int = 0) -> tuple[list[str], list[int], list[int]]:
    """The ``B = P * N`` layout: each prompt repeated N times in a row with sample indices ``start .. start+N-1``.

    Returns:
        (prompts (B,), prompt_ids (B,), sample_indices (B,)), ready for ``pgot.generate.generate``.
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples per prompt must be >= 1, got {samples_per_prompt}.")
    prompts, ids, idx = [], [], []
    for p, i in zip(prompt_set.prompts, prompt_set.ids, strict=True):
        for s in range(start, start + samples_per_prompt):
            prompts.append(p)
            ids.append(i)
            idx.append(s)
    return prompts, ids, idx
