"""Figures of an evaluation: per-prompt Pareto scatter, per-prompt reward box plots, JDR/JCR curves.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (so no GUI backend
and no global state); the runner saves it with ``fig.savefig(path)``, which renders with Agg.

Every figure is meant to be read by someone who did not make it: every model (or run) is drawn, one
colour each, named in a legend; every mark (box, median, mean, Pareto front) is explained in a legend;
axes are labelled with their units; titles are words, not metric keys.

* :func:`pareto_scatter`: the paper's Figure 3. For each prompt, every model's samples in the plane
  of two rewards and each model's Pareto front (non-dominated samples, maximisation) as a staircase.
* :func:`prompt_boxplots`: the paper's Figure 8. Distribution of each reward over the samples of
  each prompt, every model side by side: prompts reach different reward bounds (heterogeneous bounds).
* :func:`training_curves`: the paper's Figure 4. Probe JDR / JCR logged by ``pgot-train`` against the
  optimizer step, one line per run.
* :func:`ground_truth_curves`: Figure 4 with ground truth (the reward-hacking testbed): the true quality of the probe
  images and their JDR against the optimizer step, one line per method (mean over training seeds, min-max band).
* :func:`quality_vs_jdr`: the testbed's verdict on JDR: change in true quality against JDR, one point per method and
  training seed and one per method at the mean.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from pgot import metrics
from pgot.arrays import table_tensor

__all__ = [
    "curve_title",
    "ground_truth_curves",
    "pareto_front_2d",
    "pareto_scatter",
    "prompt_boxplots",
    "quality_vs_jdr",
    "training_curves",
]

log = logging.getLogger(__name__)


def _grid(n: int, max_cols: int = 4, size: float = 3.2) -> tuple[Figure, list]:
    cols = max(1, min(max_cols, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(size * cols + 0.6, size * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def pareto_front_2d(points: torch.Tensor) -> torch.Tensor:
    """Non-dominated rows of ``points`` (maximisation), sorted by the first coordinate.

    Uses :func:`pgot.pareto.pareto_mask` (rows with a NaN are never on the front).

    Args:
        points: ``(N, 2)``.

    Returns:
        ``(F, 2)`` front points, ascending in column 0 (so descending in column 1): a staircase.
    """
    from pgot.pareto import pareto_mask

    if points.shape[0] == 0:
        return points
    front = points[pareto_mask(points)]
    return front[torch.argsort(front[:, 0])]


def _colors(n: int) -> list:
    """``n`` distinct colours: matplotlib's default cycle up to 10, tab20 beyond (distinct up to 20)."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def _score_label(reward: str) -> str:
    return f"{reward} (reward score, higher is better)"


def pareto_scatter(
    scores: pd.DataFrame,
    x: str,
    y: str,
    prompt_ids: Sequence[int],
    models: Sequence[str] | None = None,
) -> Figure:
    """Per-prompt scatter of two rewards with each model's Pareto front (paper Figure 3).

    One panel per prompt (titled with the prompt); in it, one colour per model: every sample as a small
    translucent dot, the model's Pareto front (its non-dominated samples) as a staircase through black-edged
    dots. The legend names the models and explains the marks.

    Args:
        scores: one row per sample with columns ``model``, ``prompt_id``, ``prompt``, ``x``, ``y``.
        x, y: the two reward columns.
        prompt_ids: prompts to show, one panel each.
        models: models to draw, in legend order (default: order of appearance).

    Returns:
        The figure.
    """
    models = list(models) if models is not None else list(dict.fromkeys(scores["model"]))
    fig, axes = _grid(len(prompt_ids))
    colors = _colors(len(models))
    for ax, pid in zip(axes, prompt_ids, strict=True):
        sub = scores[scores["prompt_id"] == pid]
        for model, color in zip(models, colors, strict=True):
            pts = table_tensor(sub.loc[sub["model"] == model, [x, y]].to_numpy(), "float64")
            if pts.shape[0] == 0:
                continue
            ax.scatter(pts[:, 0], pts[:, 1], s=14, alpha=0.45, color=color, label=model)
            front = pareto_front_2d(pts)
            if front.shape[0]:
                ax.step(front[:, 0], front[:, 1], where="post", color=color, linewidth=1.6)
                ax.scatter(front[:, 0], front[:, 1], s=30, color=color, edgecolors="black", linewidths=0.6)
        prompt = str(sub["prompt"].iloc[0]) if len(sub) and "prompt" in sub else str(pid)
        ax.set_title(f"prompt {pid}: {_short(prompt)}", fontsize=8)
        ax.set_xlabel(_score_label(x), fontsize=8)
        ax.set_ylabel(_score_label(y), fontsize=8)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=m) for m, c in zip(models, colors, strict=True)]
    handles += [
        Line2D([], [], marker="o", linestyle="", markersize=4, color="grey", alpha=0.45, label="sample (one image)"),
        Line2D(
            [], [], marker="o", color="grey", markeredgecolor="black", linewidth=1.6,
            label="Pareto front: samples no other sample of the model beats on both rewards",
        ),
    ]  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)
    fig.suptitle(
        f"Samples of each prompt and each model's Pareto front: {x} against {y} (higher is better on both)",
        fontsize=10,
    )
    return fig


def prompt_boxplots(
    scores: pd.DataFrame,
    rewards: Sequence[str],
    prompt_ids: Sequence[int],
    models: str | Sequence[str] | None = None,
) -> Figure:
    """Box plots of each reward over the samples of each prompt, every model side by side (paper Figure 8).

    One panel per reward; along the x axis one group per prompt, in it one box per model (one colour per model).
    Each box spans the 25th to 75th percentile of the model's samples of that prompt, whiskers reach the furthest
    sample within 1.5 interquartile ranges, dots beyond are outliers; a black line marks the median and a white
    diamond the mean. Prompts reaching different bounds is the heterogeneity PG-OT's per-prompt frontiers address.
    Each box patch has gid ``"<model>|<prompt_id>"``.

    Args:
        scores: one row per sample with columns ``model``, ``prompt_id`` (``prompt``, optional, labels the
            prompts) and the reward columns.
        rewards: reward columns, one panel each.
        prompt_ids: prompts, one group of boxes each.
        models: models to draw, in legend order (a single name draws that model; default: order of appearance).

    Returns:
        The figure.
    """
    if isinstance(models, str):
        models = [models]
    models = list(models) if models is not None else list(dict.fromkeys(scores["model"]))
    prompt_ids = list(prompt_ids)
    sub = scores[scores["model"].isin(models) & scores["prompt_id"].isin(prompt_ids)]
    colors = _colors(len(models))
    width = 0.8 / max(len(models), 1)
    size = max(3.6, min(12.0, 0.3 * len(prompt_ids) * len(models) + 2.0))
    fig, axes = _grid(len(rewards), max_cols=2, size=size)
    texts = sub.drop_duplicates("prompt_id").set_index("prompt_id")["prompt"] if "prompt" in sub else {}
    tick_labels = [f"{pid}: {_short(str(texts[pid]), 24)}" if pid in texts else str(pid) for pid in prompt_ids]
    for ax, reward in zip(axes, rewards, strict=True):
        for i, (model, color) in enumerate(zip(models, colors, strict=True)):
            rows = sub[sub["model"] == model]
            data, positions, pids = [], [], []
            for j, pid in enumerate(prompt_ids):
                v = rows.loc[rows["prompt_id"] == pid, reward].to_numpy(dtype="float64")
                v = v[~pd.isna(v)]
                if len(v):
                    data.append(v)
                    positions.append(j + (i - (len(models) - 1) / 2) * width)
                    pids.append(pid)
            if not data:
                continue
            parts = ax.boxplot(
                data,
                positions=positions,
                widths=width * 0.85,
                patch_artist=True,
                showmeans=True,
                manage_ticks=False,
                boxprops={"facecolor": color, "alpha": 0.6, "edgecolor": color},
                medianprops={"color": "black", "linewidth": 1.3},
                meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 4},
                whiskerprops={"color": color},
                capprops={"color": color},
                flierprops={"marker": ".", "markersize": 4, "markeredgecolor": color},
            )
            for box, pid in zip(parts["boxes"], pids, strict=True):
                box.set_gid(f"{model}|{pid}")
        ax.set_xticks(range(len(prompt_ids)), tick_labels)
        ax.set_xlim(-0.6, len(prompt_ids) - 0.4)
        ax.set_title(f"{reward} per prompt", fontsize=9)
        ax.set_xlabel("prompt (id: text)", fontsize=8)
        ax.set_ylabel(_score_label(reward), fontsize=8)
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    handles: list = [Patch(facecolor=c, alpha=0.6, edgecolor=c, label=m) for m, c in zip(models, colors, strict=True)]
    handles += [
        Patch(
            facecolor="white", edgecolor="black", label="box: 25th-75th percentile, whiskers: 1.5 IQR, dots: outliers"
        ),
        Line2D([], [], color="black", linewidth=1.3, label="median"),
        Line2D([], [], marker="D", linestyle="", markerfacecolor="white", markeredgecolor="black", label="mean"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)
    fig.suptitle(
        "Reward distribution over the samples of each prompt, per model (prompts reach different reward bounds)",
        fontsize=10,
    )
    return fig


_RATE_NAMES = {"jdr": "Joint domination rate", "jcr": "Joint collapse rate"}
_REWARD_METRICS = {
    "win": "Win rate of {} against the step-0 model",
    "mean": "Mean {} score",
    "std": "Standard deviation of the {} score",
    "kl": "Gaussian KL divergence of the {} score from step 0",
}


def curve_title(key: str, reward_sets: Mapping[str, Sequence[str]] | None = None) -> str:
    """A metric key of ``metrics.jsonl`` in words.

    ``probe/jdr_all`` -> ``"Joint domination rate, all rewards (JDR)"``; ``probe/jcr_JDR4`` -> ``"Joint collapse
    rate, reward set JDR4 (JCR4)"``, or ``"Joint collapse rate on ict, hp, clip, hps (JCR4)"`` when ``reward_sets``
    gives the set's members; ``probe/win_hps`` -> ``"Win rate of hps against the step-0 model"``. An unknown key is
    returned as is.
    """
    name = key.removeprefix("probe/")
    kind, _, rest = name.partition("_")
    if kind in _RATE_NAMES and rest:
        if rest == "all":
            return f"{_RATE_NAMES[kind]}, all rewards ({kind.upper()})"
        jdr_col, jcr_col = metrics.rate_columns([], {rest: []})
        abbr = jdr_col if kind == "jdr" else jcr_col
        members = (reward_sets or {}).get(rest)
        if members:
            return f"{_RATE_NAMES[kind]} on {', '.join(members)} ({abbr})"
        return f"{_RATE_NAMES[kind]}, reward set {rest} ({abbr})"
    if kind in _REWARD_METRICS and rest:
        return _REWARD_METRICS[kind].format(rest)
    return key


def _is_rate(key: str) -> bool:
    return key.removeprefix("probe/").split("_", 1)[0] in ("jdr", "jcr", "win")


def training_curves(
    curves: Mapping[str, pd.DataFrame],
    keys: Sequence[str] | None = None,
    reward_sets: Mapping[str, Sequence[str]] | None = None,
) -> Figure:
    """Probe JDR / JCR against the optimizer step, one panel per key, one line per run (paper Figure 4).

    ``pgot-train`` probes every ``train.probe_every`` steps: the current model and its step-0 model generate the
    same probe prompts with the same seeds, and the rates count the pairs. Rates are drawn in percent. Panels are
    titled in words (:func:`curve_title`); the legend names the runs. With as many JDR as JCR keys (at most 4),
    JDR panels fill the first row and the JCR of the same set sits under each.

    Args:
        curves: run label -> frame with a ``step`` column and metric columns such as
            ``probe/jdr_<set>`` (as logged in a run's ``metrics.jsonl``); the labels appear in the legend.
            A frame's ``attrs["reward_sets"]`` (set name -> members, as :func:`pgot.evaluate.read_training_curves`
            reads it from the run's config) names the rewards of each set in the titles.
        keys: metric columns to draw (default: every ``probe/jdr*`` then every ``probe/jcr*`` column found;
            ``pgot-train`` logs ``probe/jdr_<set>`` and ``probe/jcr_<set>``).
        reward_sets: set name -> members for the titles (default: from the frames' attrs, first run first).

    Returns:
        The figure.
    """
    cols = 3
    if keys is None:
        found = sorted({c for df in curves.values() for c in df.columns if c.startswith("probe/")})
        jdr = [k for k in found if k.startswith("probe/jdr")]
        jcr = [k for k in found if k.startswith("probe/jcr")]
        keys = jdr + jcr
        if jdr and [k.removeprefix("probe/jdr") for k in jdr] == [k.removeprefix("probe/jcr") for k in jcr]:
            cols = len(jdr) if len(jdr) <= 4 else 3
    if reward_sets is None:
        reward_sets = {}
        for df in reversed(list(curves.values())):
            reward_sets.update(df.attrs.get("reward_sets") or {})
    fig, axes = _grid(len(keys) or 1, max_cols=cols, size=3.4)
    if not keys:
        axes[0].text(
            0.5,
            0.5,
            "no probe/jdr* or probe/jcr* metrics in the runs' metrics.jsonl\n(pgot-train logs them every "
            "train.probe_every steps)",
            ha="center",
            va="center",
            fontsize=8,
        )
        axes[0].set_axis_off()
        fig.suptitle("Probe JDR / JCR during training", fontsize=10)
        return fig
    colors = dict(zip(curves, _colors(len(curves)), strict=True))
    for ax, key in zip(axes, keys, strict=True):
        rate = _is_rate(key)
        for label, df in curves.items():
            if key not in df:
                continue
            d = df[["step", key]].dropna()
            ys = d[key] * 100.0 if rate else d[key]
            ax.plot(d["step"], ys, marker="o", markersize=3, color=colors[label], label=label)
        ax.set_title(curve_title(key, reward_sets), fontsize=9, wrap=True)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("% of probe pairs (vs. step-0 model)" if rate else "reward score")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker="o", markersize=3, color=c, label=label) for label, c in colors.items()]
    if handles:
        fig.legend(handles=handles, title="run", loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)
    fig.suptitle(
        "Probe JDR / JCR during training: each run's model against its step-0 model, same probe prompts and seeds",
        fontsize=10,
    )
    return fig


def _methods(frame: pd.DataFrame, methods: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(frame["method"])) if len(frame) else []
    return [m for m in methods if m in present] if methods is not None else present


def _seed_count(frame: pd.DataFrame, method: str) -> int:
    return int(frame.loc[frame["method"] == method, "seed"].nunique())


def ground_truth_curves(
    curves: pd.DataFrame,
    jdr: str = "jdr",
    quality: str = "quality",
    *,
    change: bool = False,
    methods: Sequence[str] | None = None,
    jdr_label: str = "JDR",
) -> Figure:
    """Figure 4 with ground truth: true quality and JDR of the probe images against the optimizer step.

    Two panels share the x axis (optimizer step). Left: the ground-truth quality (the testbed judge,
    :func:`pgot.testbed.judge.quality`, in [0, 1]) of each run's probe images, as their mean or (``change``) as the
    mean change against the step-0 model's images of the same prompts and seeds, which removes the differences
    between the probe sets of different seeds; right: their JDR against the step-0 model, in percent. One colour per
    method: the line is the mean over the method's training seeds at each step, the shaded band spans their minimum to
    maximum (absent with one seed). Reward hacking shows as JDR rising while the true quality falls.

    Args:
        curves: one row per (method, training seed, step) with columns ``method``, ``seed``, ``step``, the column
            ``quality`` and the column ``jdr`` (fraction of probe pairs in [0, 1]). NaN values are skipped.
        jdr: the JDR column of ``curves``.
        quality: the quality column: mean judge quality of the probe images, or its change against step 0.
        change: ``quality`` is a change against the step-0 model (titles, axis, a dashed line at 0).
        methods: methods to draw, in legend order (default: order of appearance).
        jdr_label: what the JDR counts, for the right panel's title and axis (e.g. ``"JDR on tb_align, tb_pref"``).

    Returns:
        The figure; each method's mean line has the method as its label on both axes.
    """
    methods = _methods(curves, methods)
    fig = Figure(figsize=(12.0, 5.6 + 0.2 * math.ceil((len(methods) + 1) / 4)), layout="constrained")
    ax_q, ax_j = fig.subplots(1, 2)
    colors = dict(zip(methods, _colors(len(methods)), strict=True))
    panels = ((ax_q, quality, 1.0), (ax_j, jdr, 100.0))
    for method in methods:
        rows = curves[curves["method"] == method]
        for ax, column, unit in panels:
            d = rows[["step", column]].dropna()
            if d.empty:
                continue
            by_step = d.groupby("step")[column]
            steps = by_step.mean().index.to_numpy(dtype="float64")
            mean = by_step.mean().to_numpy(dtype="float64") * unit
            low = by_step.min().to_numpy(dtype="float64") * unit
            high = by_step.max().to_numpy(dtype="float64") * unit
            ax.plot(steps, mean, marker="o", markersize=3, color=colors[method], label=method)
            if d.groupby("step").size().max() > 1:
                ax.fill_between(steps, low, high, color=colors[method], alpha=0.1, linewidth=0)
    if change:
        ax_q.axhline(0.0, color="black", linestyle="--", linewidth=1.0)
        ax_q.set_title("Change in true quality of the probe images against the step-0 model (judge)", fontsize=9)
        ax_q.set_ylabel("mean change in judge quality (quality units; 0 = as the base model)", fontsize=8)
    else:
        ax_q.set_title("True quality of the probe images (ground-truth judge)", fontsize=9)
        ax_q.set_ylabel("mean judge quality (0 = wrong or broken, 1 = exact rendering)", fontsize=8)
    ax_j.set_title(textwrap.fill(f"{jdr_label} of the probe images against the step-0 model", 60), fontsize=9)
    ax_j.set_ylabel("% of probe pairs better on every reward of the set", fontsize=8)
    for ax in (ax_q, ax_j):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], marker="o", markersize=3, color=colors[m], label=f"{m} ({_seed_count(curves, m)} seeds)")
        for m in methods
    ]
    handles.append(Patch(facecolor="grey", alpha=0.15, label="band: min to max over training seeds"))
    fig.legend(handles=handles, title="method", loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)
    fig.suptitle(
        "Figure 4 with ground truth: true quality and JDR during training (line: mean over training seeds)",
        fontsize=10,
    )
    return fig


def quality_vs_jdr(
    points: pd.DataFrame,
    jdr: str = "jdr",
    *,
    methods: Sequence[str] | None = None,
    jdr_label: str = "JDR",
) -> Figure:
    """Change in true quality against JDR on held-out prompts: is a high JDR real improvement or reward hacking?

    One colour per method: a small translucent dot per training seed and a large black-edged marker at the mean over
    the method's seeds. A dashed line marks no change in true quality: methods above it made the images truly
    better, methods below it hacked the rewards however high their JDR.

    Args:
        points: one row per (method, training seed) with columns ``method``, ``seed``, ``quality_change`` (mean
            judge quality of the method's images minus the baseline's on the same prompts and seeds, in quality
            units: a difference of two numbers in [0, 1]) and the column ``jdr`` (fraction of pairs in [0, 1]).
        jdr: the JDR column of ``points``.
        methods: methods to draw, in legend order (default: order of appearance).
        jdr_label: what the JDR counts, for the x axis (e.g. ``"JDR on tb_align, tb_pref"``).

    Returns:
        The figure; the per-seed dots of a method are one collection labelled ``"<method> seeds"``, its mean marker
        one labelled ``<method>``.
    """
    methods = _methods(points, methods)
    fig = Figure(figsize=(10.0, 6.4 + 0.2 * math.ceil((len(methods) + 3) / 4)), layout="constrained")
    ax = fig.subplots()
    colors = dict(zip(methods, _colors(len(methods)), strict=True))
    ax.axhline(0.0, color="black", linestyle="--", linewidth=1.0)
    for method in methods:
        d = points.loc[points["method"] == method, [jdr, "quality_change"]].dropna()
        if d.empty:
            continue
        x, y = d[jdr].to_numpy(dtype="float64") * 100.0, d["quality_change"].to_numpy(dtype="float64")
        ax.scatter(x, y, s=22, alpha=0.45, color=colors[method], label=f"{method} seeds")
        ax.scatter([x.mean()], [y.mean()], s=90, color=colors[method], edgecolors="black", linewidths=0.8, label=method)
    ax.set_xlabel(
        textwrap.fill(
            f"{jdr_label} against the base model (% of held-out pairs better on every reward of the set)", 100
        )
    )
    ax.set_ylabel("change in mean true quality vs the base model (judge quality units)")
    ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], marker="o", linestyle="", markersize=8, color=colors[m], markeredgecolor="black", label=m)
        for m in methods
    ]
    handles += [
        Line2D([], [], marker="o", linestyle="", markersize=5, color="grey", alpha=0.45, label="one training seed"),
        Line2D(
            [], [], marker="o", linestyle="", markersize=8, color="grey", markeredgecolor="black",
            label="mean over training seeds",
        ),
        Line2D([], [], color="black", linestyle="--", label="no change in true quality"),
    ]  # fmt: skip
    fig.legend(handles=handles, title="method", loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)
    fig.suptitle(
        textwrap.fill(
            f"True quality change against {jdr_label} on held-out prompts: above the dashed line the images really "
            "improved",
            110,
        ),
        fontsize=10,
    )
    return fig
