"""Tests of pgot/plots.py: the 2-D front against brute force, figures render to non-empty PNGs."""

from __future__ import annotations

import io
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
    assert titles == ["Joint domination rate, all rewards (JDR)", "Joint collapse rate, all rewards (JCR)"]
    ys = fig.axes[0].lines[0].get_ydata()
    assert list(ys) == [10.0, 20.0]  # percent
    _saved(fig, tmp_path / "curves.png")
    empty = plots.training_curves({"x": pd.DataFrame({"step": [1]})})
    _saved(empty, tmp_path / "empty.png")


def _legend_texts(fig: Figure) -> list[str]:
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def _four_models() -> pd.DataFrame:
    df = _scores()
    base = df[df["model"] == "base"]
    more = [base.assign(model=m, r1=base["r1"] + k) for k, m in enumerate(["soup", "again"], start=1)]
    return pd.concat([df, *more], ignore_index=True)


def test_boxplots_show_every_model_side_by_side_with_a_legend():
    df = _four_models()
    models = ["base", "tuned", "soup", "again"]
    fig = plots.prompt_boxplots(df, ["r1", "r2"], [0, 1, 2], models)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2
    for ax, reward in zip(axes, ["r1", "r2"], strict=True):
        # one box (one artist group) per model and prompt, grouped by prompt, models in legend order
        gids = [p.get_gid() for p in ax.patches]
        assert sorted(gids) == sorted(f"{m}|{p}" for m in models for p in range(3))
        boxes = {p.get_gid(): p for p in ax.patches}
        for p in range(3):
            centres = [boxes[f"{m}|{p}"].get_path().vertices[:, 0].mean() for m in models]
            assert centres == sorted(centres) and p - 0.5 < centres[0] and centres[-1] < p + 0.5
        # one colour per model, the same for every prompt
        colors = {m: {tuple(boxes[f"{m}|{p}"].get_facecolor()) for p in range(3)} for m in models}
        assert all(len(c) == 1 for c in colors.values()) and len({next(iter(c)) for c in colors.values()}) == 4
        # the box of a model and prompt holds that model's samples: its median line is their median
        sub = df[(df["model"] == "soup") & (df["prompt_id"] == 1)][reward]
        medians = [line for line in ax.lines if line.get_color() == "black" and len(line.get_xdata()) == 2]
        assert any(abs(line.get_ydata()[0] - sub.median()) < 1e-12 for line in medians)
        assert ax.get_title() == f"{reward} per prompt"
        assert ax.get_xlabel() == "prompt (id: text)" and "reward score" in ax.get_ylabel()
        assert [t.get_text() for t in ax.get_xticklabels()][0].startswith("0: prompt number 0")
    texts = _legend_texts(fig)
    assert texts[:4] == models
    assert "median" in texts and "mean" in texts and any(t.startswith("box: 25th-75th percentile") for t in texts)
    assert "per model" in fig.get_suptitle()


def test_pareto_scatter_legend_explains_models_and_front_markers():
    df = _four_models()
    fig = plots.pareto_scatter(df, "r1", "r2", [0, 1], ["base", "tuned", "soup", "again"])
    texts = _legend_texts(fig)
    assert texts[:4] == ["base", "tuned", "soup", "again"]
    assert any(t.startswith("Pareto front") for t in texts) and any(t.startswith("sample") for t in texts)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("r1 (reward score") and ax.get_ylabel().startswith("r2 (reward score")
    assert ax.get_title().startswith("prompt 0: prompt number 0")
    assert len(ax.lines) == 4  # one front per model
    assert "Pareto front" in fig.get_suptitle()


def test_training_curves_titles_legend_and_axes_in_words():
    curves = {
        "PG-OT": pd.DataFrame({"step": [10, 20], "probe/jdr_JDR2": [0.1, 0.2], "probe/jcr_JDR2": [0.0, 0.05]}),
        "weighted sum": pd.DataFrame({"step": [10, 20], "probe/jdr_JDR2": [0.1, 0.0], "probe/jcr_JDR2": [0.1, 0.3]}),
    }
    curves["PG-OT"].attrs["reward_sets"] = {"JDR2": ["ict", "hp"]}
    fig = plots.training_curves(curves)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [
        "Joint domination rate on ict, hp (JDR2)",
        "Joint collapse rate on ict, hp (JCR2)",
    ]
    assert all(ax.get_xlabel() == "optimizer step" and "%" in ax.get_ylabel() for ax in axes)
    assert _legend_texts(fig) == ["PG-OT", "weighted sum"]
    assert [line.get_label() for line in axes[0].lines] == ["PG-OT", "weighted sum"]
    assert list(axes[1].lines[1].get_ydata()) == [10.0, 30.0]
    assert plots.curve_title("probe/jdr_all") == "Joint domination rate, all rewards (JDR)"
    assert plots.curve_title("probe/jcr_x") == "Joint collapse rate, reward set x (JCR_x)"
    assert plots.curve_title("probe/win_hps") == "Win rate of hps against the step-0 model"
    assert plots.curve_title("loss") == "loss"


def _gt_curves() -> pd.DataFrame:
    """Two methods x (two seeds, one seed) x steps 0, 10, 20 of probe quality and JDR."""
    rows = [
        ("PG-OT", 0, 0, 0.05, 0.0), ("PG-OT", 0, 10, 0.07, 0.25), ("PG-OT", 0, 20, 0.09, 0.5),
        ("PG-OT", 1, 0, 0.05, 0.0), ("PG-OT", 1, 10, 0.03, 0.125), ("PG-OT", 1, 20, 0.05, 0.25),
        ("single saturation", 0, 0, 0.05, 0.0), ("single saturation", 0, 10, 0.01, 0.5),
        ("single saturation", 0, 20, float("nan"), 0.75),
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["method", "seed", "step", "quality", "probe/jdr_JDR2"])


def test_ground_truth_curves_draw_the_seed_mean_and_min_max_band():
    fig = plots.ground_truth_curves(_gt_curves(), "probe/jdr_JDR2", jdr_label="JDR on tb_align, tb_pref")
    ax_q, ax_j = fig.axes
    pg, single = ax_q.lines
    assert (pg.get_label(), single.get_label()) == ("PG-OT", "single saturation")
    assert list(pg.get_xdata()) == [0.0, 10.0, 20.0]
    assert_close(torch.tensor(pg.get_ydata()), torch.tensor([0.05, 0.05, 0.07], dtype=torch.float64))  # seed means
    assert list(single.get_xdata()) == [0.0, 10.0] and list(single.get_ydata()) == [0.05, 0.01]  # NaN skipped
    assert_close(
        torch.tensor(ax_j.lines[0].get_ydata()), torch.tensor([0.0, 18.75, 37.5], dtype=torch.float64)
    )  # percent
    assert list(ax_j.lines[1].get_ydata()) == [0.0, 50.0, 75.0]
    (band,) = ax_q.collections  # only PG-OT has two seeds: one min-max band
    ys = sorted({round(float(y), 6) for y in band.get_paths()[0].vertices[:, 1]})
    assert ys == [0.03, 0.05, 0.07, 0.09]  # min and max over the seeds at each step
    assert ax_q.get_xlabel() == ax_j.get_xlabel() == "optimizer step"
    assert "judge" in ax_q.get_title() and "quality" in ax_q.get_ylabel()
    assert ax_j.get_title().startswith("JDR on tb_align, tb_pref") and "%" in ax_j.get_ylabel()
    assert _legend_texts(fig) == [
        "PG-OT (2 seeds)",
        "single saturation (1 seeds)",
        "band: min to max over training seeds",
    ]
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue().startswith(PNG)


def test_ground_truth_curves_of_the_change_against_step_0():
    curves = _gt_curves().assign(change=lambda d: d["quality"] - 0.05)
    fig = plots.ground_truth_curves(curves, "probe/jdr_JDR2", "change", change=True)
    ax_q = fig.axes[0]
    pg, _, zero = ax_q.lines  # one line per method, then the dashed line at 0
    assert list(zero.get_ydata()) == [0.0, 0.0] and zero.get_linestyle() == "--"
    assert_close(torch.tensor(pg.get_ydata()), torch.tensor([0.0, 0.0, 0.02], dtype=torch.float64))
    assert ax_q.get_title().startswith("Change in true quality") and "change" in ax_q.get_ylabel()


def test_quality_vs_jdr_one_dot_per_seed_and_the_mean_per_method():
    points = pd.DataFrame(
        {
            "method": ["PG-OT", "PG-OT", "PG-OT", "weighted 1:1:1:1", "weighted 1:1:1:1"],
            "seed": [0, 1, 2, 0, 1],
            "jdr": [0.1, 0.2, 0.3, 0.5, 0.7],
            "quality_change": [0.01, 0.02, 0.06, -0.04, -0.02],
        }
    )
    fig = plots.quality_vs_jdr(points, methods=["weighted 1:1:1:1", "PG-OT"], jdr_label="JDR2")
    (ax,) = fig.axes
    by_label = {c.get_label(): c.get_offsets() for c in ax.collections}
    assert_close(
        torch.tensor(by_label["PG-OT seeds"]),
        torch.tensor([[10.0, 0.01], [20.0, 0.02], [30.0, 0.06]], dtype=torch.float64),
    )
    assert_close(torch.tensor(by_label["PG-OT"]), torch.tensor([[20.0, 0.03]], dtype=torch.float64))  # mean over seeds
    assert_close(torch.tensor(by_label["weighted 1:1:1:1"]), torch.tensor([[60.0, -0.03]], dtype=torch.float64))
    assert [c.get_label() for c in ax.collections] == [
        "weighted 1:1:1:1 seeds", "weighted 1:1:1:1", "PG-OT seeds", "PG-OT",
    ]  # fmt: skip
    (zero,) = ax.lines
    assert list(zero.get_ydata()) == [0.0, 0.0] and zero.get_linestyle() == "--"
    assert ax.get_xlabel().startswith("JDR2 against the base model (%")
    assert "true quality" in ax.get_ylabel()
    texts = _legend_texts(fig)
    assert texts[:2] == ["weighted 1:1:1:1", "PG-OT"] and "no change in true quality" in texts
    assert "mean over training seeds" in texts and "one training seed" in texts


def test_many_methods_get_distinct_colours():
    points = pd.DataFrame({"method": [f"m{i}" for i in range(13)], "seed": 0, "jdr": 0.1, "quality_change": 0.0})
    fig = plots.quality_vs_jdr(points)
    colours = {tuple(c.get_facecolor()[0][:3]) for c in fig.axes[0].collections if not c.get_label().endswith("seeds")}
    assert len(colours) == 13


def _negative_stride_scores() -> pd.DataFrame:
    """Scores whose ``to_numpy()`` is a view with negative strides (a frame built on a reversed array)."""
    import numpy as np

    values = np.arange(24, dtype="float64").reshape(3, 8)[::-1].T  # columns r1, r2, prompt_id: strides (8, -64)
    df = pd.DataFrame(values, columns=["r1", "r2", "prompt_id"], copy=False)
    assert df[["r1", "r2"]].to_numpy().strides[1] < 0  # the layout this test is about
    df["prompt_id"] = 0
    df["model"] = "base"
    df["prompt"] = "a prompt"
    return df


def test_pareto_scatter_of_one_model_whatever_the_frame_layout(tmp_path):
    """A one-model eval (the base model alone) whose score frame is a negative-stride view draws its front."""
    df = _negative_stride_scores()
    fig = plots.pareto_scatter(df, "r1", "r2", [0], ["base"])
    ax = fig.axes[0]
    assert len(ax.lines) == 1  # the staircase of the one model
    points = ax.collections[0].get_offsets()
    assert sorted(map(tuple, points.tolist())) == sorted(zip(df["r1"], df["r2"], strict=True))
    _saved(fig, tmp_path / "one.png")


def test_table_tensor_copies_any_layout():
    import numpy as np

    from pgot.arrays import table_tensor

    df = _negative_stride_scores()
    t = table_tensor(df[["r1", "r2"]].to_numpy(), "float64")
    assert t.dtype == torch.float64 and t.is_contiguous()
    assert t.tolist() == df[["r1", "r2"]].to_numpy().tolist()
    ids = table_tensor(np.arange(5)[::-1], "int64")
    assert ids.tolist() == [4, 3, 2, 1, 0]
    # a copy: changing the frame afterwards does not change the tensor
    before = t.clone()
    df.loc[0, "r1"] = -1.0
    assert torch.equal(t, before)


def test_maths_functions_take_numpy_of_any_layout():
    """The NumPy inputs of the maths functions (pgot.arrays) go through the same copy: a reversed view works."""
    import numpy as np

    from pgot.pareto import pareto_mask

    points = np.array([[1.0, 2.0], [2.0, 1.0], [0.0, 0.0]])[::-1, ::-1]  # negative strides on both axes
    assert pareto_mask(points).tolist() == [False, True, True]
    assert plots.pareto_front_2d(torch.tensor([[1.0, 2.0], [2.0, 1.0]])).tolist() == [[1.0, 2.0], [2.0, 1.0]]
