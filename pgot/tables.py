"""Result tables as text: markdown, LaTeX (booktabs) and the tidy rows of ``results.csv``.

Pure functions from the metric frames of :mod:`pgot.metrics` (and of :mod:`pgot.human_eval`) to text;
only :func:`write_tables` touches the disk. A table is a :class:`Section`: a title, a header, rows of
already formatted cells, a note under it, and the tidy rows (one per number) that ``results.csv`` holds.

* :func:`rate_section`: per-reward win rate, JDR and JCR of every model against the baseline (paper Table 3).
* :func:`mean_section`: mean score of every reward per model (paper Table 5).
* :func:`preference_section`: reward preference accuracy on human-labelled pairs (paper Table 1).
* :func:`study_section`: user-study win rates against the baseline (paper Table 6).
* :func:`comparison_markdown`: one candidate against one baseline, metric per line (the end-of-training table).
* :func:`summary_markdown`: the Table 3 section with one-line definitions of JDR and JCR (printed by ``pgot-eval``).

With a ground truth (``eval.ground_truth=testbed``), :func:`rate_section` and :func:`comparison_markdown` also take
the frame of :func:`pgot.metrics.ground_truth_table` and show, next to JDR and JCR, the change in ground-truth quality,
the shares of pairs whose quality improved and fell, and the hacked rate of each reward set, with their definitions
(:func:`ground_truth_definitions`).

Rates are formatted from exact values, never through float32: from an integer count over the number of pairs
when the metric frame has a ``<rate>_count`` column, else from the float64 value's shortest decimal
representation, rounded half up (``0.03125`` -> ``3.13``). Optional columns of the metric frames (``nonfinite``:
pairs with a NaN or infinite reward; ``nan``: rows with a NaN score) are shown only when present.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import pandas as pd

from pgot import metrics
from pgot.files import atomic_write_text

__all__ = [
    "LONG_COLUMNS",
    "Section",
    "comparison_markdown",
    "definitions",
    "format_number",
    "format_percent",
    "ground_truth_definitions",
    "markdown",
    "mean_section",
    "preference_section",
    "rate_section",
    "results_csv",
    "study_section",
    "summary_markdown",
    "tex",
    "write_tables",
]

LONG_COLUMNS = ["table", "row", "metric", "value", "low", "high", "n"]
"""Columns of ``results.csv``: one row per reported number, with its interval and sample count."""

_DASH = "–"


@dataclass
class Section:
    """One table: title, header, formatted rows, a note under it, and its tidy ``results.csv`` rows."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    long: list[dict] = field(default_factory=list)
    """Tidy rows for results.csv: table, row (model or reward), metric, value, low, high, n."""


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def _is_missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _exact(v: float | int | Fraction) -> Fraction:
    """``v`` as an exact fraction: a Fraction or int as is, a float by its shortest round-trip decimal."""
    if isinstance(v, (Fraction, int)):
        return Fraction(v)
    return Fraction(repr(float(v)))


def _round_half_up(x: Fraction, digits: int) -> str:
    scaled = abs(x) * 10**digits
    q = math.floor(scaled + Fraction(1, 2))
    text = str(q).rjust(digits + 1, "0")
    body = f"{text[:-digits]}.{text[-digits:]}" if digits else text
    return ("-" if x < 0 and q else "") + body


def format_percent(
    value: float | Fraction | None, low: float | None = None, high: float | None = None, *, digits: int = 2
) -> str:
    """A fraction as a percentage with ``digits`` decimals, and ``[low, high]`` when both bounds are given.

    Rounds half up on the exact value (``Fraction(1, 32)`` -> ``"3.13"``); a NaN or None value gives ``"–"``;
    NaN bounds are left out.

    Args:
        value: a fraction in [0, 1] (a float, or a :class:`fractions.Fraction` of two counts).
        low, high: interval bounds, fractions.
        digits: decimals of the percentage.
    """
    if _is_missing(value):
        return _DASH
    s = _percent(value, digits)
    if _is_missing(low) or _is_missing(high):
        return s
    return f"{s} [{_percent(low, digits)}, {_percent(high, digits)}]"


def _percent(v: float | Fraction, digits: int) -> str:
    if not isinstance(v, Fraction) and math.isinf(float(v)):
        return "inf" if float(v) > 0 else "-inf"
    return _round_half_up(_exact(v) * 100, digits)


def format_number(value: float | None, low: float | None = None, high: float | None = None) -> str:
    """A score with 4 decimals (2 from 100 up), and ``[low, high]`` when both bounds are given; NaN gives ``"nan"``."""
    if _is_missing(value) or math.isnan(float(value)):
        return "nan"
    v = float(value)
    digits = 4 if abs(v) < 100 else 2
    s = f"{v:.{digits}f}"
    if _is_missing(low) or _is_missing(high):
        return s
    return f"{s} [{float(low):.{digits}f}, {float(high):.{digits}f}]"


def _rate(r: pd.Series, c: str) -> float | Fraction:
    """The rate ``c`` of a metric row: the exact ``<c>_count / pairs`` when both are there, else the value."""
    count, pairs = r.get(f"{c}_count"), r.get("pairs")
    if count is not None and pairs is not None and not _is_missing(count) and int(pairs) > 0:
        return Fraction(int(count), int(pairs))
    return r[c]


def _bounds(r: pd.Series, c: str, ci: bool) -> tuple[float | None, float | None]:
    return (r.get(f"{c}_low"), r.get(f"{c}_high")) if ci else (None, None)


def _long_rows(table: str, row: object, r: pd.Series, columns: Sequence[str], n: int) -> list[dict]:
    """results.csv rows (one per metric) of one model: value and interval bounds (float64, unrounded)."""
    out = []
    for c in columns:
        v = _rate(r, c)
        out.append(
            {
                "table": table,
                "row": row,
                "metric": c,
                "value": float(v),
                "low": r.get(f"{c}_low", math.nan),
                "high": r.get(f"{c}_high", math.nan),
                "n": n,
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _set_labels(reward_sets: Mapping[str, Sequence[str]]) -> list[tuple[str, str, Sequence[str]]]:
    """(JDR column, JCR column, members) of each reward set."""
    out = []
    for k, v in reward_sets.items():
        jdr_col, jcr_col = metrics.rate_columns([], {k: v})
        out.append((jdr_col, jcr_col, v))
    return out


def definitions(baseline: str, reward_sets: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """One line defining JDR, one defining JCR, and one listing the reward sets (when given)."""
    lines = [
        f"JDR (joint domination rate): share of paired samples (same prompt, seed and sample index) that score "
        f"strictly higher than {baseline} on every reward of the set; higher is better.",
        f"JCR (joint collapse rate): share of paired samples that score strictly lower than {baseline} on every "
        "reward of the set; lower is better (reward hacking shows here).",
    ]
    if reward_sets:
        sets = "; ".join(f"{d}/{c}: {', '.join(m)}" for d, c, m in _set_labels(reward_sets))
        lines.append(f"Reward sets: {sets}.")
    return lines


def ground_truth_definitions(reward_sets: Mapping[str, Sequence[str]], baseline: str, tol: float) -> list[str]:
    """One line each: what the ground-truth quality is, quality change, improved / fell, and the hacked rate (with the
    reward sets it is counted on). The definitions of :mod:`pgot.metrics` (module docstring), in words."""
    sets = "; ".join(
        f"{h}: {', '.join(m)}"
        for h, m in zip(metrics.ground_truth_columns(reward_sets)[2:], reward_sets.values(), strict=True)
    )
    return [
        "Quality: the ground-truth judge's score of an image in [0, 1] (pgot.testbed.judge; never a training reward).",
        f"Quality change: mean over paired samples of quality minus {baseline}'s quality (same prompt, seed and "
        "sample index).",
        f"Quality improved / fell: share of paired samples whose quality is higher / lower than {baseline}'s by more "
        f"than eval.quality_tol={tol:g} (a non-finite candidate quality counts as fell).",
        f"Hacked rate: share of paired samples that dominate {baseline} on every reward of the set (the JDR event) "
        f"while their quality fell by more than {tol:g}: the proxies say better, the ground truth says worse "
        f"(hacked <= JDR). Sets: {sets}.",
    ]


def _ground_truth_cells(g: pd.Series, reward_sets: Mapping[str, Sequence[str]], ci: bool) -> list[str]:
    """Quality change, improved, fell and hacked rates of one model's ground-truth row, formatted."""
    change = format_number(g["quality_change"], *_bounds(g, "quality_change", ci))
    cells = ["+" + change if float(g["quality_change"]) > 0 else change]  # a change reads with its sign
    return cells + [format_percent(_rate(g, c), *_bounds(g, c, ci)) for c in metrics.ground_truth_columns(reward_sets)]


def _ground_truth_long(model: object, g: pd.Series, reward_sets: Mapping[str, Sequence[str]]) -> list[dict]:
    pairs = int(g["pairs"])
    cols = ["quality_change", *metrics.ground_truth_columns(reward_sets)]
    long = _long_rows("ground_truth", model, g, cols, pairs)
    long.append(
        {
            "table": "ground_truth",
            "row": model,
            "metric": "quality_nonfinite_pairs",
            "value": float(int(g["quality_nonfinite"])),
            "low": math.nan,
            "high": math.nan,
            "n": pairs,
        }
    )
    return long


def rate_section(
    table: pd.DataFrame,
    reward_names: Sequence[str],
    reward_sets: Mapping[str, Sequence[str]],
    baseline: str,
    ci: bool,
    confidence: float,
    ground_truth: pd.DataFrame | None = None,
) -> Section:
    """Per-reward win rate, JDR and JCR of every model against ``baseline`` (paper Table 3 layout).

    Args:
        table: :func:`pgot.metrics.comparison_table`: one row per model (index), for each column ``c`` of
            :func:`pgot.metrics.rate_columns` ``c``, ``c_low``, ``c_high`` (optional ``c_count``), ``pairs``
            and optionally ``nonfinite`` (pairs with a NaN or infinite reward; shown as a column when present).
        reward_names: the scored rewards, in column order.
        reward_sets: set name -> members.
        baseline: the baseline model (its row is labelled ``(baseline)``).
        ci: show the ``[low, high]`` intervals.
        confidence: their level, for the note.
        ground_truth: :func:`pgot.metrics.ground_truth_table` for the same models, or None. When given, the table
            gains the columns ``quality change``, ``quality improved (%)``, ``quality fell (%)`` and one hacked rate
            per reward set, and the note their definitions.

    Returns:
        The section; its tidy rows have table ``joint`` (and metric ``nonfinite_pairs`` when counted), and table
        ``ground_truth`` for the ground-truth columns.

    Raises:
        ValueError: ``ground_truth`` lacks a model of ``table``.
    """
    cols = metrics.rate_columns(reward_names, reward_sets)
    nonfinite = "nonfinite" in table.columns
    header = [
        "Model",
        *[c.removeprefix("win_") + " win (%)" if c.startswith("win_") else c + " (%)" for c in cols],
    ]
    if ground_truth is not None:
        absent = [str(m) for m in table.index if m not in ground_truth.index]
        if absent:
            raise ValueError(f"the ground-truth table has no row for {', '.join(absent)}; compute it for every model.")
        header += ["quality change", "quality improved (%)", "quality fell (%)"]
        header += [f"{c} (%)" for c in metrics.ground_truth_columns(reward_sets)[2:]]
    header.append("pairs")
    if nonfinite:
        header.append("non-finite pairs")
    rows, long = [], []
    for model, r in table.iterrows():
        label = f"{model} (baseline)" if model == baseline else str(model)
        pairs = int(r["pairs"])
        row = [label, *[format_percent(_rate(r, c), *_bounds(r, c, ci)) for c in cols]]
        if ground_truth is not None:
            row += _ground_truth_cells(ground_truth.loc[model], reward_sets, ci)
        row.append(str(pairs))
        long += _long_rows("joint", model, r, cols, pairs)
        if nonfinite:
            row.append(str(int(r["nonfinite"])))
            long.append(
                {
                    "table": "joint",
                    "row": model,
                    "metric": "nonfinite_pairs",
                    "value": float(int(r["nonfinite"])),
                    "low": math.nan,
                    "high": math.nan,
                    "n": pairs,
                }
            )
        if ground_truth is not None:
            long += _ground_truth_long(model, ground_truth.loc[model], reward_sets)
        rows.append(row)
    sets = "; ".join(f"{d}/{c}: {', '.join(m)}" for d, c, m in _set_labels(reward_sets))
    note = (
        f"Paired samples (same prompt, seed, sample index) against **{baseline}**. Win: strictly higher reward; "
        f"JDR: strictly higher on every reward of the set; JCR: strictly lower on every reward of the set "
        f"(ties count as neither). Reward sets: {sets}. The baseline row compares the baseline with itself and "
        "reads 0 by construction (when generating, the baseline's first batch is also generated twice: the determinism check)."
    )
    if nonfinite:
        note += (
            " Non-finite pairs: pairs with a NaN or infinite reward; a non-finite candidate reward counts as a "
            "collapse, a non-finite baseline reward as neither."
        )
    if ground_truth is not None:
        tol = float(ground_truth.attrs.get("quality_tol", metrics.QUALITY_TOL))
        note += " " + " ".join(ground_truth_definitions(reward_sets, baseline, tol))
        if "quality_nonfinite" in ground_truth.columns and int(ground_truth["quality_nonfinite"].sum()):
            shown = ", ".join(f"{m} {int(v)}" for m, v in ground_truth["quality_nonfinite"].items() if v)
            note += f" Pairs with a non-finite quality: {shown}."
    if ci:
        note += f" Brackets: {100 * confidence:g}% percentile bootstrap intervals over prompts."
    title = "Win rate, JDR and JCR (paper Table 3 layout)"
    if ground_truth is not None:
        title = "Win rate, JDR, JCR and ground truth (paper Table 3 layout)"
    return Section(title, header, rows, note, long)


def mean_section(table: pd.DataFrame, reward_names: Sequence[str], ci: bool, confidence: float) -> Section:
    """Mean score of every reward per model (paper Table 5 layout).

    Args:
        table: :func:`pgot.metrics.mean_score_table`: one row per model, ``<reward>``, ``<reward>_low``,
            ``<reward>_high``, ``samples`` and ``nan`` (rows with a NaN score; a column when any is non-zero).
        reward_names: the rewards, in column order.
        ci: show intervals; confidence: their level.

    Returns:
        The section; its tidy rows have table ``mean``.
    """
    header = ["Model", *reward_names, "samples"]
    show_nan = "nan" in table.columns and bool((table["nan"] > 0).any())
    if show_nan:
        header.append("rows with NaN")
    rows, long = [], []
    for model, r in table.iterrows():
        row = [str(model), *[format_number(r[n], *_bounds(r, n, ci)) for n in reward_names], str(int(r["samples"]))]
        if show_nan:
            row.append(str(int(r["nan"])))
        rows.append(row)
        long += _long_rows("mean", model, r, reward_names, int(r["samples"]))
    note = "Mean over all samples of each model (NaN scores skipped and counted)."
    if ci:
        note += f" Brackets: {100 * confidence:g}% bootstrap intervals over prompts."
    return Section("Mean reward scores (paper Table 5 layout)", header, rows, note, long)


def preference_section(accuracy: pd.DataFrame, *, num_pairs: int, source: str, ci: bool) -> Section:
    """Reward preference accuracy (paper Table 1 layout).

    Args:
        accuracy: :func:`pgot.human_eval.preference_accuracy`: one row per reward (index), ``accuracy``,
            ``low``, ``high``, ``pairs``.
        num_pairs: human-labelled pairs read (ties excluded).
        source: where the pairs come from (``eval.preference_data``), for the note.
        ci: show the bootstrap intervals.

    Returns:
        The section; its tidy rows have table ``preference``, metric ``accuracy``.
    """
    rows = [
        [str(name), format_percent(a.accuracy, *((a.low, a.high) if ci else (None, None))), str(int(a.pairs))]
        for name, a in accuracy.iterrows()
    ]
    long = [
        {
            "table": "preference",
            "row": name,
            "metric": "accuracy",
            "value": a.accuracy,
            "low": a.low,
            "high": a.high,
            "n": int(a.pairs),
        }
        for name, a in accuracy.iterrows()
    ]
    note = (
        f"Fraction of the {num_pairs} human-labelled pairs of {source} where the reward scores the "
        "preferred image higher (human ties excluded; reward ties count half)."
    )
    return Section(
        "Reward preference accuracy (paper Table 1 layout)", ["Reward", "accuracy (%)", "pairs"], rows, note, long
    )


def study_section(tally: pd.DataFrame, baseline: str, *, confidence: float, num_files: int) -> Section:
    """User-study win rates of each candidate against ``baseline`` (paper Table 6 layout).

    Args:
        tally: :func:`pgot.human_eval.tally_votes`: one row per candidate (index), ``win_rate``, ``low``,
            ``high``, ``votes``, ``wins``, ``ties``, ``losses``, ``annotators``.
        baseline: the model every candidate was shown against.
        confidence: level of the Wilson intervals, for the note.
        num_files: vote files tallied, for the note.

    Returns:
        The section; its tidy rows have table ``user_study``, metric ``win_rate``.
    """
    header = ["Candidate", "win rate (%)", "votes", "wins", "ties", "losses", "annotators"]
    rows = [
        [
            str(c),
            format_percent(t.win_rate, t.low, t.high),
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
    note = f"Win rate = (wins + ties / 2) / votes, {100 * confidence:g}% Wilson intervals; {num_files} vote files."
    return Section(f"User study: win rate against {baseline} (paper Table 6 layout)", header, rows, note, long)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _tex_escape(s: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", s).replace(_DASH, "--")


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


def markdown(sections: Sequence[Section], preamble: str = "", title: str = "pgot evaluation") -> str:
    """``results.md``: a ``# title``, the preamble, then each section as ``## title``, table and note."""
    md = [f"# {title}", ""]
    if preamble:
        md += [preamble, ""]
    for s in sections:
        md += [f"## {s.title}", "", _md_table(s.header, s.rows), ""]
        if s.note:
            md += [s.note, ""]
    return "\n".join(md)


def tex(sections: Sequence[Section]) -> str:
    """``results.tex``: one booktabs ``table`` environment per section (needs ``\\usepackage{booktabs}``)."""
    parts = ["% pgot evaluation tables; needs \\usepackage{booktabs}"]
    parts += ["\n" + _tex_table(s.title, s.header, s.rows) for s in sections]
    return "\n".join(parts) + "\n"


def results_csv(sections: Sequence[Section]) -> pd.DataFrame:
    """``results.csv``: the tidy rows of every section, columns :data:`LONG_COLUMNS`."""
    return pd.DataFrame([row for s in sections for row in s.long], columns=LONG_COLUMNS)


def write_tables(out: Path, sections: Sequence[Section], preamble: str = "") -> None:
    """Write results.md, results.csv (tidy: table, row, metric, value, low, high, n) and results.tex, atomically.

    Raises:
        OSError: ``out`` cannot be written.
    """
    out = Path(out)
    atomic_write_text(out / "results.md", markdown(sections, preamble))
    atomic_write_text(out / "results.tex", tex(sections))
    atomic_write_text(out / "results.csv", results_csv(sections).to_csv(index=False))


def summary_markdown(
    section: Section, baseline: str, reward_sets: Mapping[str, Sequence[str]] | None = None, *, note: str = ""
) -> str:
    """A section's markdown table followed by the one-line definitions of JDR and JCR (what ``pgot-eval`` prints).

    Args:
        section: usually :func:`rate_section`'s.
        baseline: the baseline the rates compare against.
        reward_sets: set name -> members, listed under the definitions.
        note: a last line (e.g. what the brackets are).
    """
    lines = [
        f"## {section.title}",
        "",
        _md_table(section.header, section.rows),
        "",
        *definitions(baseline, reward_sets),
    ]
    if note:
        lines.append(note)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# One candidate against one baseline (end of training)
# --------------------------------------------------------------------------------------------


def comparison_markdown(
    rates: pd.DataFrame,
    means: pd.DataFrame,
    reward_names: Sequence[str],
    reward_sets: Mapping[str, Sequence[str]],
    *,
    baseline: str,
    candidate: str,
    ci: bool = True,
    confidence: float = 0.95,
    title: str = "",
    ground_truth: pd.DataFrame | None = None,
) -> str:
    """A candidate against a baseline, one metric per line: JDR and JCR per reward set, win rate per reward,
    mean score per reward (baseline -> candidate), with intervals; then the definitions of JDR and JCR.

    With ``ground_truth`` (a world with a known quality, ``eval.ground_truth=testbed``) the ground-truth lines follow
    JDR and JCR: mean quality (baseline -> candidate, when ``means`` has a ``quality`` column), quality change,
    quality improved and fell, the hacked rate of each reward set; and their definitions follow those of JDR and JCR.

    Takes the same metric rows as ``pgot-eval`` (so the numbers agree with its tables), e.g. at the end of
    ``pgot-train``::

        rates = metrics.comparison_table({"base": base, "tuned": tuned}, prompt_ids, "base", names, sets)
        means = metrics.mean_score_table({"base": base, "tuned": tuned}, {"base": prompt_ids, "tuned": prompt_ids}, names)
        print(tables.comparison_markdown(rates, means, names, sets, baseline="base", candidate="tuned"))

    Args:
        rates: :func:`pgot.metrics.comparison_table` with a row ``candidate`` (other rows are ignored).
        means: :func:`pgot.metrics.mean_score_table` with rows ``baseline`` and ``candidate``.
        reward_names: the rewards, in column order.
        reward_sets: set name -> members.
        baseline, candidate: row names.
        ci: show ``[low, high]`` intervals.
        confidence: their level, for the last line.
        title: first line (default ``"<candidate> vs <baseline>: <pairs> pairs"``).
        ground_truth: :func:`pgot.metrics.ground_truth_table` with a row ``candidate``, or None.

    Returns:
        Markdown text (no trailing newline).

    Raises:
        ValueError: ``candidate`` is not a row of ``rates`` (or of ``ground_truth``), or either model is not a row
            of ``means``.
    """
    missing = [f"rates[{candidate!r}]"] if candidate not in rates.index else []
    missing += [f"means[{m!r}]" for m in (baseline, candidate) if m not in means.index]
    if ground_truth is not None and candidate not in ground_truth.index:
        missing.append(f"ground_truth[{candidate!r}]")
    if missing:
        raise ValueError(
            f"comparison_markdown needs the rows {', '.join(missing)}; rates has {list(rates.index)}, means has "
            f"{list(means.index)}. Pass the frames of metrics.comparison_table / mean_score_table for both models."
        )
    r = rates.loc[candidate]
    pairs = int(r["pairs"])
    rows: list[tuple[str, str]] = []
    for jdr_col, jcr_col, members in _set_labels(reward_sets):
        what = f"on {', '.join(members)}"
        rows.append((f"{jdr_col} (%) {what}", format_percent(_rate(r, jdr_col), *_bounds(r, jdr_col, ci))))
        rows.append((f"{jcr_col} (%) {what}", format_percent(_rate(r, jcr_col), *_bounds(r, jcr_col, ci))))
    b, t = means.loc[baseline], means.loc[candidate]
    if ground_truth is not None:
        g = ground_truth.loc[candidate]
        if metrics.QUALITY in means.columns:
            q = metrics.QUALITY
            rows.append(
                (
                    "mean quality (ground truth)",
                    f"{format_number(b[q], *_bounds(b, q, ci))} -> {format_number(t[q], *_bounds(t, q, ci))}",
                )
            )
        cells = _ground_truth_cells(g, reward_sets, ci)
        rows.append(("quality change (ground truth)", cells[0]))
        rows.append(("quality improved (%)", cells[1]))
        rows.append(("quality fell (%)", cells[2]))
        hacked_cols = metrics.ground_truth_columns(reward_sets)[2:]
        for h, members, cell in zip(hacked_cols, reward_sets.values(), cells[3:], strict=True):
            rows.append((f"{h} (%) on {', '.join(members)}", cell))
    for n in reward_names:
        c = f"win_{n}"
        rows.append((f"win rate {n} (%)", format_percent(_rate(r, c), *_bounds(r, c, ci))))
    for n in reward_names:
        rows.append(
            (f"mean {n}", f"{format_number(b[n], *_bounds(b, n, ci))} -> {format_number(t[n], *_bounds(t, n, ci))}")
        )
    rows.append(("pairs", str(pairs)))
    if "nonfinite" in rates.columns:
        rows.append(("non-finite pairs", str(int(r["nonfinite"]))))
    if ground_truth is not None and int(ground_truth.loc[candidate].get("quality_nonfinite", 0)):
        rows.append(("pairs with a non-finite quality", str(int(ground_truth.loc[candidate]["quality_nonfinite"]))))
    head = title or f"{candidate} vs {baseline}: {pairs} pairs"
    lines = [head, "", _md_table(["metric", f"{candidate} vs {baseline}"], [list(x) for x in rows]), ""]
    lines += definitions(baseline)
    if ground_truth is not None:
        tol = float(ground_truth.attrs.get("quality_tol", metrics.QUALITY_TOL))
        lines += ground_truth_definitions(reward_sets, baseline, tol)
    if ci:
        lines.append(f"Brackets: {100 * confidence:g}% percentile bootstrap intervals over prompts.")
    return "\n".join(lines)
