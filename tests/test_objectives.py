"""pgot.objectives on small examples worked out by hand (in each docstring), and against POT."""

from __future__ import annotations

import pytest
import torch

ot = pytest.importorskip("ot")  # before pgot: pgot.ot_loss needs POT

from pgot.objectives import (  # noqa: E402
    OBJECTIVES,
    compute,
    hetero_weighted_sum,
    needs_pool,
    needs_store,
    normalize,
    pgot_offline,
    pgot_online,
    separate_constraints,
    single_reward,
    target_loss,
    weighted_sum,
)

OT = {"epsilon": 0.5, "max_iter": 3000, "tol": 1e-12}


def _d(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_offline_single_front_point_is_mean_squared_distance():
    """Prompt 0: front {(1, 1)}; samples (0,0), (1,0), (2,0), (0.5,1).

    (1,1) dominates (0,0), (1,0) and (0.5,1) but not (2,0). With one target point the plan sends
    each source point (mass 1/3) to it, so the cost is the mean squared distance
    (2 + 1 + 0.25) / 3 = 13/12, and dL/dr_i = (2/3)(r_i - (1,1)): (-2/3,-2/3), (0,-2/3), 0, (-1/3,0).
    Prompt 1: front {(1,1), (0,2)}, samples (2,2), (1,1), (0,3), (5,0): nothing is dominated -> 0.
    Prompt 2: empty front (padding only) -> 0. Mean over prompts with a dominated sample: 13/12.
    """
    scores = _d(
        [[[0, 0], [1, 0], [2, 0], [0.5, 1]], [[2, 2], [1, 1], [0, 3], [5, 0]], [[0, 0], [0, 0], [0, 0], [0, 0]]]
    ).requires_grad_(True)
    front = _d([[[1, 1], [9, 9]], [[1, 1], [0, 2]], [[9, 9], [9, 9]]])
    mask = torch.tensor([[True, False], [True, True], [False, False]])
    loss = pgot_offline(scores, front, mask, **OT)
    loss.backward()
    torch.testing.assert_close(loss, _d(13 / 12))
    expect = torch.zeros(3, 4, 2, dtype=torch.float64)
    expect[0] = _d([[-2 / 3, -2 / 3], [0, -2 / 3], [0, 0], [-1 / 3, 0]])
    torch.testing.assert_close(scores.grad, expect)
    torch.testing.assert_close(pgot_offline(scores, front, mask, **OT, reduction="sum"), _d(13 / 12))
    loss2, diag = compute("pgot", scores, front=front, front_mask=mask, **OT)  # the dispatch training runs
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(diag["n_dominated"], torch.tensor(3.0))  # 3 of the 12 samples are OT sources
    torch.testing.assert_close(diag["front_size"], torch.tensor(1.0))  # (1 + 2 + 0) / 3 front points per prompt


def test_offline_matches_pot_per_prompt():
    """Oracle: per prompt, brute-force the dominated samples, then POT's sinkhorn_log plan on them."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 8, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    front = torch.randn(3, 4, 3, generator=gen, dtype=torch.float64) + 1.0
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [True, True, True, True]])
    loss = pgot_offline(scores, front, mask, **OT, reduction="sum")
    loss.backward()
    total, grad = torch.zeros((), dtype=torch.float64), torch.zeros_like(scores)
    for p in range(3):
        f = front[p, mask[p]]
        src = [
            i for i in range(8) if any((fj >= scores[p, i]).all() and (fj > scores[p, i]).any() for fj in f.detach())
        ]
        x = scores[p, src].detach()
        diff = x[:, None] - f[None]
        cost = diff.square().sum(-1)
        a = torch.full((len(src),), 1 / len(src), dtype=torch.float64)
        b = torch.full((len(f),), 1 / len(f), dtype=torch.float64)
        plan = ot.sinkhorn(a, b, cost, OT["epsilon"], method="sinkhorn_log", numItermax=100_000, stopThr=1e-15)
        total += (plan * cost).sum()
        grad[p, src] = 2 * (plan[..., None] * diff).sum(1)
    torch.testing.assert_close(loss, total, atol=1e-8, rtol=0)
    torch.testing.assert_close(scores.grad, grad, atol=1e-8, rtol=0)


def test_offline_without_dominated_samples_is_zero_and_backward_works():
    scores = _d([[[2, 2], [3, 0]]]).requires_grad_(True)
    loss = pgot_offline(scores, _d([[[1, 1]]]), torch.tensor([[True]]), **OT)
    loss.backward()
    assert loss == 0 and (scores.grad == 0).all()


def test_online_known_dominating_sets():
    """One prompt, samples s0=(0,0), s1=(1,1); pool (0,0), (1,1), (2,0), (0,3) (it holds both samples).

    s0 is dominated by (1,1), (2,0), (0,3) (not by its own copy): cost (2 + 4 + 9) / 3 = 5 and
    dL/ds0 = (2/3) sum_g (s0 - g) = (2/3)(-3, -4). Nothing dominates s1 ((2,0) and (0,3) are worse on one
    reward, (1,1) is a duplicate): cost 0. Sum 5; mean over samples with a dominating set 5.
    Without (0,3) in the pool: s0's cost is (2 + 4) / 2 = 3.
    """
    scores = _d([[[0, 0], [1, 1]]]).requires_grad_(True)
    pool = _d([[[0, 0], [1, 1], [2, 0], [0, 3]]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss = pgot_online(scores, pool, mask, **OT, reduction="sum")
    loss.backward()
    torch.testing.assert_close(loss, _d(5.0))
    torch.testing.assert_close(scores.grad, _d([[[-2.0, -8 / 3], [0, 0]]]))
    torch.testing.assert_close(pgot_online(scores, pool, mask, **OT), _d(5.0))
    mask[0, 3] = False
    torch.testing.assert_close(pgot_online(scores, pool, mask, **OT), _d(3.0))
    loss, diag = compute("pgot", scores, strategy="online", pool=pool, pool_mask=mask, **OT)
    torch.testing.assert_close(loss, _d(3.0))
    torch.testing.assert_close(diag["n_dominated"], torch.tensor(1.0))  # s0 only
    torch.testing.assert_close(diag["front_size"], torch.tensor(3.0))  # valid pool vectors per prompt


def test_online_mean_averages_over_dominated_samples():
    """Two prompts. Prompt 0 as above without (0,3): costs 3 and 0. Prompt 1: sample (0,0), pool {(1,0)}:
    cost 1; sample (5,5): nothing dominates it. Sum 4; mean over the 2 dominated samples 2."""
    scores = _d([[[0, 0], [1, 1]], [[0, 0], [5, 5]]]).requires_grad_(True)
    pool = _d([[[0, 0], [1, 1], [2, 0]], [[1, 0], [7, 7], [7, 7]]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    torch.testing.assert_close(pgot_online(scores, pool, mask, **OT, reduction="sum"), _d(4.0))
    torch.testing.assert_close(pgot_online(scores, pool, mask, **OT, reduction="mean"), _d(2.0))


def test_baselines_by_hand():
    """Prompt 0: samples r=(1,2), (3,4); front (4,1), (2,3) -> per-reward bound (4,3). Prompt 1 has an
    empty front and is left out of the heterogeneous losses.

    - single_reward(index=1): -(2 + 4) / 2 = -3 over prompt 0; with prompt 1's (0,0),(0,0): -6/4.
    - weighted_sum(w=(1,2), C=(5,5)), linear: 1*4 + 2*3 = 10 and 2 + 2 = 4; prompt 1: 5 + 10 = 15 twice -> 44/4.
    - hetero_weighted_sum(w=(1,2)), linear: (4-1) + 2(3-2) = 5 and (4-3) + 2(3-4) = -1 -> mean 2 over prompt 0.
    - separate_constraints: (1-4)^2 + (2-3)^2 = 10 and 1 + 1 = 2 -> 6; with w=(1,2): 11 and 3 -> 7.
    """
    scores = _d([[[1, 2], [3, 4]], [[0, 0], [0, 0]]]).requires_grad_(True)
    front = _d([[[4, 1], [2, 3], [100, 100]], [[100, 100], [100, 100], [100, 100]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(single_reward(scores, 1), _d(-6 / 4))
    torch.testing.assert_close(single_reward(scores, 1, reduction="sum"), _d(-6.0))
    lin = {"target_form": "linear"}
    torch.testing.assert_close(weighted_sum(scores, [1.0, 2.0], [5.0, 5.0], **lin), _d(44 / 4))
    torch.testing.assert_close(weighted_sum(scores, [1.0, 2.0], [5.0, 5.0], **lin, reduction="sum"), _d(44.0))
    torch.testing.assert_close(hetero_weighted_sum(scores, front, mask, [1.0, 2.0], **lin), _d(2.0))
    torch.testing.assert_close(hetero_weighted_sum(scores, front, mask, [1.0, 2.0], **lin, reduction="sum"), _d(4.0))
    # squared (the default): the same gaps squared: (100 + 16 + 225 + 225) / 4 and (25 + 1) / 2
    torch.testing.assert_close(weighted_sum(scores, [1.0, 2.0], [5.0, 5.0]), _d(566 / 4))
    torch.testing.assert_close(hetero_weighted_sum(scores, front, mask, [1.0, 2.0]), _d(13.0))
    torch.testing.assert_close(separate_constraints(scores, front, mask), _d(6.0))
    torch.testing.assert_close(separate_constraints(scores, front, mask, [1.0, 2.0]), _d(7.0))
    separate_constraints(scores, front, mask).backward()  # d/dr 2 (r - b) / 2 samples: (-3,-1), (-1,1)
    torch.testing.assert_close(scores.grad, _d([[[-3, -1], [-1, 1]], [[0, 0], [0, 0]]]))


def test_normalize_and_registry():
    scores = _d([[[1, 20]]])
    torch.testing.assert_close(normalize(scores, torch.tensor([0.5, 10.0])), _d([[[2, 2]]]))
    assert normalize(scores, None) is scores
    assert set(OBJECTIVES) == {"pgot", "single_reward", "weighted_sum", "hetero_weighted_sum", "separate_constraints"}
    assert [o for o in OBJECTIVES if needs_store(o, "offline")] == [
        "pgot",
        "hetero_weighted_sum",
        "separate_constraints",
    ]
    assert needs_store("pgot", "auto") and not needs_store("pgot", "online") and needs_pool("pgot", "online")
    assert not any(needs_pool(o, "online") for o in OBJECTIVES if o != "pgot")


def test_dispatch_equals_each_loss():
    """compute() is the one map from a configured objective to its loss: the same value as each function."""
    scores = _d([[[1, 2], [3, 4]], [[0, 0], [0, 0]]])
    front = _d([[[4, 1], [2, 3], [100, 100]], [[100, 100], [100, 100], [100, 100]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    w, c = _d([1.0, 2.0]), _d([5.0, 5.0])
    kw = {"front": front, "front_mask": mask, "weights": w, "targets": c, **OT}
    torch.testing.assert_close(compute("single_reward", scores, **kw)[0], single_reward(scores, 0))
    torch.testing.assert_close(compute("weighted_sum", scores, **kw)[0], weighted_sum(scores, w, c))
    torch.testing.assert_close(
        compute("hetero_weighted_sum", scores, **kw)[0], hetero_weighted_sum(scores, front, mask, w)
    )
    for form in ("linear", "hinge"):
        torch.testing.assert_close(
            compute("weighted_sum", scores, **kw, target_form=form)[0], weighted_sum(scores, w, c, target_form=form)
        )
        torch.testing.assert_close(
            compute("hetero_weighted_sum", scores, **kw, target_form=form)[0],
            hetero_weighted_sum(scores, front, mask, w, target_form=form),
        )
    torch.testing.assert_close(
        compute("separate_constraints", scores, **kw)[0], separate_constraints(scores, front, mask, w)
    )
    torch.testing.assert_close(compute("pgot", scores, **kw)[0], pgot_offline(scores, front, mask, **OT))
    with pytest.raises(ValueError, match="train.objective must be one of"):
        compute("pgot_offline", scores, **kw)
    with pytest.raises(ValueError, match="fronts of a frontier store"):
        compute("separate_constraints", scores)
    with pytest.raises(ValueError, match="gathered pool"):
        compute("pgot", scores, strategy="online")


def test_user_errors():
    scores = torch.zeros(2, 3, 2)
    with pytest.raises(ValueError, match="reduction"):
        single_reward(scores, 0, reduction="max")
    with pytest.raises(ValueError, match="front must have shape"):
        pgot_offline(scores, torch.zeros(2, 4, 3), torch.ones(2, 4, dtype=torch.bool), **OT)
    with pytest.raises(ValueError, match="weights"):
        weighted_sum(scores, [1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="scale"):
        normalize(scores, torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        normalize(scores, torch.tensor([1.0, 0.0]))


# --------------------------------------------------------------------------------------------
# Targets: linear, hinge, squared (issue 11)
# --------------------------------------------------------------------------------------------


def _grad(loss_fn, r: list[float]) -> torch.Tensor:
    x = _d([[r]]).requires_grad_(True)  # (P=1, N=1, M=2)
    loss_fn(x).backward()
    return x.grad.reshape(-1)


def test_target_changes_the_gradient_under_hinge_and_squared_not_linear():
    """One sample r = (1, 2), weights w = (1, 2), so dL/dr = f'(g) * (-w) with g = sum_k w_k (C_k - r_k):

    ===============  =============================  ==========  ===========  =================
    target C         g                              linear      hinge        squared (-2 g w)
    ===============  =============================  ==========  ===========  =================
    (5, 5)           1*4 + 2*3 = 10                 (-1, -2)    (-1, -2)     (-20, -40)
    (2, 3)           1*1 + 2*1 = 3                  (-1, -2)    (-1, -2)     (-6, -12)
    (1, 1)           1*0 + 2*(-1) = -2 (above it)   (-1, -2)    (0, 0)       (4, 8)
    ===============  =============================  ==========  ===========  =================
    """
    w, r = [1.0, 2.0], [1.0, 2.0]
    expected = {
        "linear": {(5, 5): [-1, -2], (2, 3): [-1, -2], (1, 1): [-1, -2]},
        "hinge": {(5, 5): [-1, -2], (2, 3): [-1, -2], (1, 1): [0, 0]},
        "squared": {(5, 5): [-20, -40], (2, 3): [-6, -12], (1, 1): [4, 8]},
    }
    values = {"linear": [10, 3, -2], "hinge": [10, 3, 0], "squared": [100, 9, 4]}
    for form, by_target in expected.items():
        for (c, grad), value in zip(by_target.items(), values[form], strict=True):
            got = _grad(lambda x, c=c, form=form: weighted_sum(x, w, list(map(float, c)), target_form=form), r)
            torch.testing.assert_close(got, _d(grad), msg=f"{form}, C={c}")
            torch.testing.assert_close(weighted_sum(_d([[r]]), w, list(map(float, c)), target_form=form), _d(value))
        grads = [
            _grad(lambda x, c=c, form=form: weighted_sum(x, w, list(map(float, c)), target_form=form), r)
            for c in by_target
        ]
        differs = any(not torch.equal(grads[0], g) for g in grads[1:])
        assert differs == (form != "linear"), form


def test_global_target_and_per_prompt_bound_differ_unless_linear():
    """Paper section 2.1: one prompt whose front (4, 1), (2, 3) bounds it at b = (4, 3), and a global target
    C = (5, 5) above that bound. Sample r = (4, 3.5) is already past its prompt's weighted bound (w = (1, 2)):

    - hetero_weighted_sum: g = 0 + 2 * (3 - 3.5) = -1; weighted_sum: g = 1 + 2 * 1.5 = 4;
    - linear: both gradients -w = (-1, -2): the target never matters, the two baselines are one method;
    - hinge: hetero stops pushing (0, 0), the global target keeps pushing (-1, -2) past the bound;
    - squared: hetero pulls back -2 * (-1) * w = (2, 4), the global one pushes on -2 * 4 * w = (-8, -16).
    """
    front = _d([[[4, 1], [2, 3]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    w, r = [1.0, 2.0], [4.0, 3.5]
    expected = {
        "linear": ([-1, -2], [-1, -2]),
        "hinge": ([0, 0], [-1, -2]),
        "squared": ([2, 4], [-8, -16]),
    }
    for form, (hetero, glob) in expected.items():
        got_h = _grad(lambda x, form=form: hetero_weighted_sum(x, front, mask, w, target_form=form), r)
        got_g = _grad(lambda x, form=form: weighted_sum(x, w, [5.0, 5.0], target_form=form), r)
        torch.testing.assert_close(got_h, _d(hetero), msg=form)
        torch.testing.assert_close(got_g, _d(glob), msg=form)
        assert torch.equal(got_h, got_g) == (form == "linear"), form


def test_target_loss_and_its_errors():
    gap = _d([-2.0, 0.0, 3.0])
    torch.testing.assert_close(target_loss(gap, "linear"), gap)
    torch.testing.assert_close(target_loss(gap, "hinge"), _d([0.0, 0.0, 3.0]))
    torch.testing.assert_close(target_loss(gap, "squared"), _d([4.0, 0.0, 9.0]))
    scores = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match=r"target_form must be one of linear, hinge, squared.*train.target_form"):
        weighted_sum(scores, [1.0, 1.0], [1.0, 1.0], target_form="cubic")
    with pytest.raises(ValueError, match="train.target_form"):
        compute("hetero_weighted_sum", scores, target_form="relu")
    with pytest.raises(ValueError, match=r"weighted_sum with train.target_form=squared needs a global target"):
        compute("weighted_sum", scores)  # no targets: only linear may default them
    assert compute("weighted_sum", scores, target_form="linear")[0].item() == 2.0  # C = 1: sum_k (1 - 0)
