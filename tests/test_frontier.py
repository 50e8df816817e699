"""The frontier store: shards, merge, round trip, padded lookup, stats, compatibility refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pgot import frontier as fr
from pgot.config import load_config

NAMES = ["clip", "hp"]
N = 5


def brute_force_front(scores: torch.Tensor) -> torch.Tensor:
    """(N, M) -> (N,) bool: i is on the front iff it has no NaN and no NaN-free j dominates it (maximisation)."""
    n = scores.shape[0]
    ok = ~scores.isnan().any(dim=1)
    out = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        if not ok[i]:
            continue
        out[i] = not any(
            bool(ok[j] and (scores[j] >= scores[i]).all() and (scores[j] > scores[i]).any()) for j in range(n) if j != i
        )
    return out


def prompt_rows(pid: int, scores: torch.Tensor, seed: int = 0) -> pd.DataFrame:
    return fr.build_rows(
        pid, f"prompt {pid}", seed, list(range(scores.shape[0])), scores, brute_force_front(scores), NAMES
    )


def make_scores(pid: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(pid)
    return torch.rand(N, len(NAMES), generator=g)


def write_store(tmp_path, pids=(3, 7, 11), fingerprint="fp-a") -> tuple:
    """A store written the way precompute writes it: shards of two ranks, then the merge and meta."""
    store = tmp_path / "store"
    scores = {pid: make_scores(pid) for pid in pids}
    scores[7][2] = float("nan")  # a NaN row: kept, never on the front
    fr.write_shard(store, pd.concat([prompt_rows(pids[0], scores[pids[0]])]), rank=0)
    fr.write_shard(store, pd.concat([prompt_rows(p, scores[p]) for p in pids[1:]]), rank=1)
    meta = {
        "schema_version": fr.SCHEMA_VERSION,
        "reward_names": NAMES,
        "model": {"path": "tiny", "fingerprint": fingerprint},
        "precompute": {"samples_per_prompt": N, "seed": 0},
    }
    df = fr.merge_shards(store, NAMES, N)
    meta["stats"] = fr.reward_stats(df, NAMES)
    fr.write_meta(store, meta)
    return store, scores


def test_store_round_trip(tmp_path):
    store, scores = write_store(tmp_path)
    assert not (store / fr.SHARDS_DIR).exists(), "merge removes the shards"
    assert not list(store.rglob("*.tmp"))
    df = pd.read_parquet(store / fr.SAMPLES_FILE)
    assert list(df.columns) == ["prompt_id", "prompt", "seed", "sample_index", *NAMES, "on_frontier"]
    assert df["prompt_id"].tolist() == [p for p in (3, 7, 11) for _ in range(N)]
    assert df["sample_index"].tolist() == list(range(N)) * 3
    for pid, s in scores.items():
        rows = df[df["prompt_id"] == pid]
        torch.testing.assert_close(torch.tensor(rows[NAMES].to_numpy()), s, equal_nan=True)
        assert rows["on_frontier"].tolist() == brute_force_front(s).tolist()
        assert (rows["prompt"] == f"prompt {pid}").all()

    f = fr.load_store(store)
    assert f.reward_names == NAMES and f.prompt_ids == [3, 7, 11] and f.fingerprint == "fp-a"
    pd.testing.assert_frame_equal(f.samples, df)
    for pid, s in scores.items():
        torch.testing.assert_close(f.fronts[pid], s[brute_force_front(s)])


def test_lookup_pads_to_largest_front(tmp_path):
    store, scores = write_store(tmp_path)
    f = fr.load_store(store)
    ids = [11, 3, 7]
    fronts = [scores[p][brute_force_front(scores[p])] for p in ids]
    front, mask = f.lookup(torch.tensor(ids), device="cpu")
    fmax = max(x.shape[0] for x in fronts)
    assert front.shape == (3, fmax, 2) and mask.shape == (3, fmax)
    assert front.dtype == torch.float32 and mask.dtype == torch.bool
    for j, x in enumerate(fronts):
        assert mask[j].tolist() == [True] * x.shape[0] + [False] * (fmax - x.shape[0])
        torch.testing.assert_close(front[j, : x.shape[0]], x)
        assert (front[j, x.shape[0] :] == 0).all()
    # one prompt alone: F is its own front size
    front1, mask1 = f.lookup([3])
    assert front1.shape == (1, fronts[1].shape[0], 2) and mask1.all()


def test_lookup_missing_prompt_and_changed_text(tmp_path):
    store, _ = write_store(tmp_path)
    f = fr.load_store(store)
    with pytest.raises(ValueError) as e:
        f.lookup([3, 99])
    msg = str(e.value)
    assert "prompt id 99" in msg and str(store) in msg and "pgot-precompute" in msg and "prompts" in msg
    with pytest.raises(ValueError, match="prompt id 3 is 'other' in the prompt set"):
        f.lookup([3], prompts=["other"])
    f.lookup([3], prompts=["prompt 3"])


def test_stats_match_numpy(tmp_path):
    store, scores = write_store(tmp_path)
    f = fr.load_store(store)
    allv = torch.cat([scores[p] for p in (3, 7, 11)]).double().numpy()  # (P*N, M) with one NaN row
    meta = json.loads((store / fr.META_FILE).read_text())
    for k, name in enumerate(NAMES):
        col = allv[:, k][~np.isnan(allv[:, k])]
        st = meta["stats"][name]
        assert st["count"] == len(col) == 3 * N - 1 and st["nan_count"] == 1
        np.testing.assert_allclose(
            [st["mean"], st["std"], st["min"], st["max"]], [col.mean(), col.std(), col.min(), col.max()]
        )
    torch.testing.assert_close(
        f.stats.mean, torch.tensor([meta["stats"][n]["mean"] for n in NAMES], dtype=torch.float32)
    )
    torch.testing.assert_close(f.stats.std, torch.tensor([meta["stats"][n]["std"] for n in NAMES], dtype=torch.float32))


def test_zero_std_is_safe_to_divide_by():
    df = pd.DataFrame({"a": [1.0, 1.0, 1.0], "b": [0.0, 1.0, 2.0]})
    stats = fr.reward_stats(df, ["a", "b"])
    assert stats["a"]["std"] == 0.0
    s = fr._stats_from_meta({"stats": stats}, ["a", "b"])
    torch.testing.assert_close(s.std, torch.tensor([1.0, float(np.std([0.0, 1.0, 2.0]))]))


def test_shards_resume_bookkeeping(tmp_path):
    store = tmp_path / "s"
    a = fr.write_shard(store, prompt_rows(1, make_scores(1)), rank=0)
    b = fr.write_shard(store, prompt_rows(2, make_scores(2)), rank=0)
    c = fr.write_shard(store, prompt_rows(5, make_scores(5))[:3], rank=1)  # a partial prompt (3 of 5 rows)
    assert [a.name, b.name, c.name] == [
        "shard-00000-000000.parquet",
        "shard-00000-000001.parquet",
        "shard-00001-000000.parquet",
    ]
    assert fr.completed_prompts(store, N) == {1: "prompt 1", 2: "prompt 2"}
    # merged file plus a leftover shard (a merge killed before removing shards): no duplicates
    (store / fr.SHARDS_DIR / c.name).unlink()
    fr.merge_shards(store, NAMES, N)
    fr.write_shard(store, prompt_rows(2, make_scores(2)), rank=0)
    rows = fr.read_rows(store)
    assert len(rows) == 2 * N and rows["prompt_id"].tolist() == [1] * N + [2] * N
    # a rerun's new shard never overwrites an old one
    (store / fr.SHARDS_DIR / ".shard-00000-000009.parquet.123.tmp").write_bytes(b"junk")
    assert fr.remove_stale_temporaries(store) == 1
    d = fr.write_shard(store, prompt_rows(3, make_scores(3)), rank=0)
    assert d.name == "shard-00000-000001.parquet"
    assert fr.completed_prompts(store, N) == {1: "prompt 1", 2: "prompt 2", 3: "prompt 3"}


def test_load_store_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(fr.StoreNotFoundError, match="does not exist.*pgot-precompute") as e:
        fr.load_store(missing)
    assert isinstance(e.value, ValueError) and isinstance(e.value, FileNotFoundError)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no meta.json"):
        fr.load_store(empty)
    store, _ = write_store(tmp_path)
    meta = json.loads((store / fr.META_FILE).read_text())
    fr.write_meta(store, {**meta, "schema_version": 99})
    with pytest.raises(ValueError, match="schema version 99.*reads version 1"):
        fr.load_store(store)
    fr.write_meta(store, meta)
    (store / fr.SAMPLES_FILE).unlink()
    fr.write_shard(store, prompt_rows(3, make_scores(3)), rank=0)
    with pytest.raises(ValueError, match="no samples.parquet.*interrupted.*same config"):
        fr.load_store(store)


def test_store_settings_are_compared_by_key(tmp_path):
    """One store-vs-config check (compare_settings): reward order, reward set and base model, named by key."""
    store, _ = write_store(tmp_path)
    meta = fr.load_store(store).meta

    def cfg(*overrides):
        rewards = [f"rewards.{i}.name={n}" for i, n in enumerate(overrides[0])]
        return load_config(None, ["model.tiny=true", *rewards])

    assert fr.compare_settings(meta, cfg(["clip", "hp"]), store=store, fingerprint="fp-a") == []
    (msg,) = fr.compare_settings(meta, cfg(["hp", "clip"]), store=store, fingerprint="fp-a")
    assert "order clip, hp" in msg and "positional" in msg and "pgot-precompute" in msg
    (msg,) = fr.compare_settings(meta, cfg(["clip", "hps"]), store=store, fingerprint="fp-a")
    assert "rewards: clip, hps in the config" in msg and "rewards clip, hp" in msg and "train.store" in msg
    (msg,) = fr.compare_settings(meta, cfg(["clip", "hp"]), store=store, fingerprint="fp-b")
    assert (
        msg.startswith("model.tiny_seed: 0 (model fingerprint fp-b)") and "fp-a" in msg and "another base model" in msg
    )


def test_select_reorders_and_recomputes_subset_fronts(tmp_path):
    pytest.importorskip("pgot.pareto")
    store, scores = write_store(tmp_path)
    f = fr.load_store(store)
    g = f.select(["hp", "clip"])
    assert g.reward_names == ["hp", "clip"]
    torch.testing.assert_close(g.stats.mean, f.stats.mean.flip(0))
    for pid in f.prompt_ids:
        torch.testing.assert_close(g.fronts[pid], f.fronts[pid].flip(1))
    h = f.select(["hp"])
    for pid, s in scores.items():
        torch.testing.assert_close(h.fronts[pid], s[:, 1:][brute_force_front(s[:, 1:])])
    with pytest.raises(ValueError, match="cannot select rewards"):
        f.select(["hpsv2"])


def test_batch_shards_straddle_prompts_and_the_merge_marks_the_fronts(tmp_path):
    """Precompute writes the samples of one batch per shard (prompts split across shards and ranks, on_frontier
    unknown); the merge marks each prompt's front among its N samples, as brute force does."""
    store = tmp_path / "s"
    scores = {pid: make_scores(pid) for pid in (1, 2)}
    items = [(pid, i) for pid in (1, 2) for i in range(N)]
    for k, start in enumerate(range(0, len(items), 3)):  # batches of 3 across the (prompt, sample) grid
        batch = items[start : start + 3]
        rows = fr.sample_rows([p for p, _ in batch], [f"prompt {p}" for p, _ in batch], 0, [i for _, i in batch],
                              torch.stack([scores[p][i] for p, i in batch]), NAMES)  # fmt: skip
        assert not rows["on_frontier"].any()
        fr.write_shard(store, rows, rank=k % 2)
    assert fr.has_shards(store) and fr.completed_prompts(store, N) == {1: "prompt 1", 2: "prompt 2"}
    df = fr.merge_shards(store, NAMES, N)
    assert not fr.has_shards(store)
    for pid in (1, 2):
        assert df.loc[df["prompt_id"] == pid, "on_frontier"].tolist() == brute_force_front(scores[pid]).tolist()
    pd.testing.assert_frame_equal(pd.read_parquet(store / fr.SAMPLES_FILE), df)


def test_a_shard_that_appears_under_a_writer_is_a_clear_error(tmp_path):
    store = tmp_path / "s"
    path = fr.write_shard(store, prompt_rows(1, make_scores(1)), rank=0, index=0)
    with pytest.raises(
        ValueError, match=rf"precompute.store={store}: shard {path.name} appeared while .* another process"
    ):
        fr.write_shard(store, prompt_rows(2, make_scores(2)), rank=0, index=0)


def test_reset_clears_a_store_but_its_lock(tmp_path):
    store, _ = write_store(tmp_path)
    (store / fr.IMAGES_DIR / "3").mkdir(parents=True)
    (store / ".pgot.lock").write_text("")
    fr.write_shard(store, prompt_rows(3, make_scores(3)), rank=0)
    fr.reset(store)
    assert sorted(p.name for p in store.iterdir()) == [".pgot.lock"]
    with pytest.raises(fr.StoreNotFoundError, match="has no meta.json"):
        fr.load_store(store)
