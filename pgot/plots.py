"""Figures of an evaluation: per-prompt Pareto scatter, per-prompt reward box plots, JDR/JCR curves.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (so no GUI backend
and no global state); the runner saves it with ``fig.savefig(path)``, which renders with Agg.

* :func:`pareto_scatter`: the paper's Figure 3. For each prompt, every model's samples in the plane
  of two rewards and each model's Pareto front (non-dominated samples, maximisation) as a staircase.
* :func:`prompt_boxplots`: the paper's Figure 8. Distribution of each reward over the samples of
  each prompt: prompts reach different reward bounds (heterogeneous bounds).
* :func:`training_curves`: the paper's Figure 4. Probe JDR / JCR logged by ``pgot-train`` against the
  training step, one line per run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from matplotlib.figure import Figure

__all__ = ["pareto_front_2d", "pareto_scatter", "prompt_boxplots", "training_curves"]

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


def pareto_scatter(
    scores: pd.DataFrame,
    x: str,
    y: str,
    prompt_ids: Sequence[int],
    models: Sequence[str] | None = None,
) -> Figure:
    """Per-prompt scatter of two rewards with each model's Pareto front (paper Figure 3).

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
    colors = [f"C{i % 10}" for i in range(len(models))]
    for ax, pid in zip(axes, prompt_ids, strict=True):
        sub = scores[scores["prompt_id"] == pid]
        for model, color in zip(models, colors, strict=True):
            pts = torch.tensor(sub.loc[sub["model"] == model, [x, y]].to_numpy(dtype="float64"))
            if pts.shape[0] == 0:
                continue
            ax.scatter(pts[:, 0], pts[:, 1], s=14, alpha=0.45, color=color, label=model)
            front = pareto_front_2d(pts)
            if front.shape[0]:
                ax.step(front[:, 0], front[:, 1], where="post", color=color, linewidth=1.6)
                ax.scatter(front[:, 0], front[:, 1], s=30, color=color, edgecolors="black", linewidths=0.6)
        prompt = str(sub["prompt"].iloc[0]) if len(sub) and "prompt" in sub else str(pid)
        ax.set_title(_short(prompt), fontsize=8)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    if axes:
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=8)
    fig.suptitle(f"Per-prompt samples and Pareto fronts ({x} vs {y})", fontsize=10)
    return fig


def prompt_boxplots(scores: pd.DataFrame, rewards: Sequence[str], prompt_ids: Sequence[int], model: str) -> Figure:
    """Box plot of each reward over the samples of each prompt (paper Figure 8: heterogeneous bounds).

    Args:
        scores: one row per sample with columns ``model``, ``prompt_id`` and the reward columns.
        rewards: reward columns, one panel each.
        prompt_ids: prompts, one box each.
        model: whose samples (usually the baseline).

    Returns:
        The figure.
    """
    sub = scores[(scores["model"] == model) & scores["prompt_id"].isin(list(prompt_ids))]
    fig, axes = _grid(len(rewards), max_cols=2, size=3.6)
    for ax, reward in zip(axes, rewards, strict=True):
        data = []
        for pid in prompt_ids:
            v = sub.loc[sub["prompt_id"] == pid, reward].to_numpy(dtype="float64")
            data.append(v[~pd.isna(v)])
        ax.boxplot(data, tick_labels=[str(p) for p in prompt_ids], showmeans=True)
        ax.set_title(reward, fontsize=9)
        ax.set_xlabel("prompt id")
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Per-prompt reward distributions of {model}", fontsize=10)
    return fig


def training_curves(curves: Mapping[str, pd.DataFrame], keys: Sequence[str] | None = None) -> Figure:
    """Probe JDR / JCR against the training step, one panel per key, one line per run (paper Figure 4).

    Args:
        curves: run label -> frame with a ``step`` column and metric columns such as
            ``probe/jdr_<set>`` (as logged in a run's ``metrics.jsonl``).
        keys: metric columns to draw (default: every ``probe/jdr*`` then every ``probe/jcr*`` column found;
            ``pgot-train`` logs ``probe/jdr_<set>`` and ``probe/jcr_<set>``).

    Returns:
        The figure.
    """
    if keys is None:
        found = sorted({c for df in curves.values() for c in df.columns if c.startswith("probe/")})
        jdr = [k for k in found if k.startswith("probe/jdr")]
        jcr = [k for k in found if k.startswith("probe/jcr")]
        keys = jdr + jcr
    fig, axes = _grid(len(keys) or 1, max_cols=3, size=3.4)
    if not keys:
        axes[0].text(
            0.5, 0.5, "no probe/jdr* or probe/jcr* metrics in the runs' metrics.jsonl", ha="center", va="center"
        )
        axes[0].set_axis_off()
        return fig
    for ax, key in zip(axes, keys, strict=True):
        for i, (label, df) in enumerate(curves.items()):
            if key not in df:
                continue
            d = df[["step", key]].dropna()
            ax.plot(d["step"], d[key] * 100.0, marker="o", markersize=3, color=f"C{i % 10}", label=label)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=8)
    fig.suptitle("Probe JDR / JCR during training", fontsize=10)
    return fig
