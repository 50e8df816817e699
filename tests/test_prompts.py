"""pgot.prompts: every file format, stable ids, limits, deterministic splits, and the user errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pgot.config import PromptsConfig
from pgot.prompts import PromptSet, expand, load_prompts, prompt_hash, split

TEXTS = ["a red fox", "  a bowl of ramen  ", "", "a lighthouse, at dusk", "   ", 'a "quoted" cat']
EXPECTED = ["a red fox", "a bowl of ramen", "a lighthouse, at dusk", 'a "quoted" cat']


def _write(tmp_path, fmt: str, column: str = "prompt"):
    path = tmp_path / f"prompts.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    elif fmt == "csv":
        pd.DataFrame({"id": range(len(TEXTS)), column: TEXTS}).to_csv(path, index=False)
    elif fmt == "parquet":
        pd.DataFrame({"id": range(len(TEXTS)), column: TEXTS}).to_parquet(path)
    elif fmt == "jsonl":
        path.write_text(
            "\n".join(json.dumps({"id": i, column: t}) for i, t in enumerate(TEXTS)) + "\n\n", encoding="utf-8"
        )
    return path


@pytest.mark.parametrize("fmt", ["txt", "csv", "parquet", "jsonl"])
def test_each_format_gives_the_same_set(tmp_path, fmt):
    ps = load_prompts(PromptsConfig(path=str(_write(tmp_path, fmt))))
    assert ps.prompts == EXPECTED
    assert ps.ids == [0, 1, 2, 3]  # row index after blank rows are dropped
    assert ps.hashes == [prompt_hash(p) for p in EXPECTED] and len(ps.hashes[0]) == 12
    assert ps.by_id()[2] == "a lighthouse, at dusk"


def test_named_column_and_limit(tmp_path):
    path = _write(tmp_path, "csv", column="caption")
    ps = load_prompts(PromptsConfig(path=str(path), column="caption", limit=2))
    assert ps.prompts == EXPECTED[:2] and ps.ids == [0, 1]
    full = load_prompts(PromptsConfig(path=str(path), column="caption"))
    assert full.ids[:2] == ps.ids, "ids do not depend on the limit"


def test_builtin_demo():
    ps = load_prompts(PromptsConfig(path="builtin:demo"))
    assert len(ps) >= 30 and len(set(ps.prompts)) == len(ps)
    assert ps.ids == list(range(len(ps))) and ps.source == "builtin:demo"
    assert all(p == p.strip() and p for p in ps.prompts)


def test_split_is_deterministic_disjoint_and_complete():
    ps = PromptSet([f"prompt {i}" for i in range(50)], list(range(50)))
    tr, ev = split(ps, 0.2, seed=3)
    assert len(ev) == 10 and len(tr) == 40
    assert set(tr.ids) | set(ev.ids) == set(range(50)) and not set(tr.ids) & set(ev.ids)
    assert tr.ids == sorted(tr.ids) and ev.ids == sorted(ev.ids), "file order kept"
    tr2, ev2 = split(ps, 0.2, seed=3)
    assert ev2.ids == ev.ids and tr2.prompts == tr.prompts
    assert split(ps, 0.2, seed=4)[1].ids != ev.ids
    assert all(ev.by_id()[i] == f"prompt {i}" for i in ev.ids)
    tr0, ev0 = split(ps, 0.0)
    assert len(ev0) == 0 and tr0.ids == ps.ids
    assert len(split(PromptSet(["a", "b", "c"], [0, 1, 2]), 0.01)[1]) == 1, "at least one eval prompt"
    with pytest.raises(ValueError, match="leaves no training prompts"):
        split(PromptSet(["a"], [0]), 0.5)
    with pytest.raises(ValueError, match=r"prompts.eval_fraction must be in \[0, 1\)"):
        split(ps, 1.0)


def test_expand_layout():
    ps = PromptSet(["a", "b"], [4, 7])
    prompts, ids, idx = expand(ps, 3, start=10)
    assert prompts == ["a"] * 3 + ["b"] * 3 and ids == [4, 4, 4, 7, 7, 7] and idx == [10, 11, 12] * 2


def test_errors(tmp_path):
    def err(match, **kw):
        with pytest.raises(ValueError, match=match):
            load_prompts(PromptsConfig(**kw))

    err("does not exist", path=str(tmp_path / "missing.txt"))
    err("prompts.path is empty", path="")
    err("not a builtin", path="builtin:nope")
    (tmp_path / "p.yaml").write_text("a")
    err("unknown format '.yaml'", path=str(tmp_path / "p.yaml"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    err("holds no prompts", path=str(tmp_path / "empty.txt"))
    csv = _write(tmp_path, "csv")
    err(r"has no column 'text' \(columns: id, prompt\)", path=str(csv), column="text")
    pq = _write(tmp_path, "parquet")
    err(r"has no column 'text' \(columns: id, prompt\)", path=str(pq), column="text")
    jl = _write(tmp_path, "jsonl")
    err(r"has no field 'text' \(fields: id, prompt\)", path=str(jl), column="text")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{not json\n')
    err("line 2 is not valid JSON", path=str(tmp_path / "bad.jsonl"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    err("could not be read", path=str(tmp_path / "bin.txt"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    err("could not be read as .parquet", path=str(tmp_path / "bad.parquet"))
