"""Tests of pgot/plots.py: the 2-D front against brute force, figures render to non-empty PNGs."""

from __future__ import annotations

import itertools
import json

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch.testing import assert_close

from pgot import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _brute_front(points: torch.Tensor) -> set[tuple[float, float]]:
    out = set()
    for i in range(len(points)):
        p = points[i]
        dominated = any(bool((points[j] >= p).all() and (points[j] > p).any()) for j in range(len(points)) if j != i)
        if not dominated:
            out.add(tuple(p.tolist()))
    return out


def test_front_2d_matches_brute_force_and_is_a_staircase():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        pts = torch.randint(0, 6, (25, 2), generator=g).double()  # ties and duplicates
        front = plots.pareto_front_2d(pts)
        assert set(map(tuple, front.tolist())) == _brute_front(pts)
        assert (front[1:, 0] >= front[:-1, 0]).all() and (front[1:, 1] <= front[:-1, 1]).all()
    assert plots.pareto_front_2d(torch.zeros(0, 2)).shape == (0, 2)
    assert_close(plots.pareto_front_2d(torch.tensor([[1.0, 2.0]])), torch.tensor([[1.0, 2.0]]))


def _scores() -> pd.DataFrame:
    g = torch.Generator().manual_seed(1)
    rows = []
    for model, p, s in itertools.product(["base", "tuned"], range(3), range(6)):
        x, y = torch.rand(2, generator=g).tolist()
        rows.append(
            {
                "model": model,
                "prompt_id": p,
                "prompt": f"prompt number {p} " * 5,
                "sample_index": s,
                "r1": x + p,
                "r2": y,
                "r3": x * y,
            }
        )
    return pd.DataFrame(rows)


def _saved(fig: Figure, path) -> bytes:
    assert isinstance(fig, Figure)
    fig.savefig(path, dpi=60)
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 2000
    return data


def test_pareto_scatter_and_boxplots_render(tmp_path):
    df = _scores()
    fig = plots.pareto_scatter(df, "r1", "r2", [0, 1, 2], ["base", "tuned"])
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3
    # each panel: 2 models x (samples + front markers) scatters and one staircase line per model
    ax0 = fig.axes[0]
    assert len(ax0.lines) == 2 and len(ax0.collections) == 4
    _saved(fig, tmp_path / "scatter.png")
    fig = plots.prompt_boxplots(df, ["r1", "r2", "r3"], [0, 1, 2], "base")
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3
    _saved(fig, tmp_path / "box.png")


def test_training_curves_from_probe_keys(tmp_path):
    lines = [
        {"step": 0, "loss": 1.0},
        {"step": 10, "loss": 0.9, "probe/jdr_all": 0.1, "probe/jcr_all": 0.05, "probe/win_r1": 0.5},
        {"step": 20, "loss": 0.8, "probe/jdr_all": 0.2, "probe/jcr_all": None, "probe/win_r1": 0.6},
    ]
    run = tmp_path / "run_a"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{truncated")
    from pgot.evaluate import read_training_curves

    curves = read_training_curves([str(run)])
    assert list(curves) == ["run_a"] and curves["run_a"]["step"].tolist() == [10, 20]
    fig = plots.training_curves(curves)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["probe/jdr_all", "probe/jcr_all"]
    ys = fig.axes[0].lines[0].get_ydata()
    assert list(ys) == [10.0, 20.0]  # percent
    _saved(fig, tmp_path / "curves.png")
    empty = plots.training_curves({"x": pd.DataFrame({"step": [1]})})
    _saved(empty, tmp_path / "empty.png")
