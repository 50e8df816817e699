"""pgot.prompts: every file format, stable ids, limits, deterministic splits, and the user errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pgot.config import PromptsConfig
from pgot.prompts import PromptSet, expand, load_prompts, prompt_hash, read_table, split

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
    (tmp_path / "bin.txt").write_bytes(b"a cat\nbad \xc3\x28 byte\n")
    err(r"could not be read as UTF-8 text: byte 0xc3 on line 2 is invalid", path=str(tmp_path / "bin.txt"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    err("could not be read as .parquet", path=str(tmp_path / "bad.parquet"))


# --------------------------------------------------------------------------------------------
# Reading rules: BOMs, line ends, empty cells, every unusable row reported (issue 10)
# --------------------------------------------------------------------------------------------

BOM = "\ufeff"


def _load(path, **kw):
    return load_prompts(PromptsConfig(path=str(path), **kw)).prompts


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("bom", [True, False])
def test_bom_and_line_ends_in_every_format(tmp_path, bom, newline):
    """A UTF-8 BOM never reaches the first prompt or column name; \\n, \\r\\n and \\r all end lines."""
    texts = ["a cat on a sofa", "a dog, running", 'a "quoted" fox']
    lead = BOM if bom else ""
    files = {
        "txt": lead + newline.join(texts) + newline,
        "csv": lead + newline.join(["prompt", *(f'"{t.replace(chr(34), 2 * chr(34))}"' for t in texts)]) + newline,
        "jsonl": lead + newline.join(json.dumps({"prompt": t}) for t in texts) + newline,
    }
    for fmt, content in files.items():
        path = tmp_path / f"p.{fmt}"
        path.write_bytes(content.encode("utf-8"))
        ps = load_prompts(PromptsConfig(path=str(path)))
        assert ps.prompts == texts, fmt
        assert ps.hashes[0] == prompt_hash("a cat on a sofa"), fmt  # the id hash of the text, not of BOM + text
    pq = tmp_path / "p.parquet"
    pd.DataFrame({BOM + "prompt ": texts}).to_parquet(pq)  # a BOM carried into a column name
    assert _load(pq) == texts


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_files_with_a_unicode_bom_are_decoded(tmp_path, encoding):
    (tmp_path / "p.txt").write_text("a cat on a sofa\r\nein Hund, überall\r\n", encoding=encoding)
    (tmp_path / "p.csv").write_text("id,prompt\r\n1,a cat on a sofa\r\n", encoding=encoding)
    assert _load(tmp_path / "p.txt") == ["a cat on a sofa", "ein Hund, überall"]
    assert _load(tmp_path / "p.csv") == ["a cat on a sofa"]


def test_only_real_line_ends_split_prompts(tmp_path):
    """U+2028, U+0085, form feed and vertical tab are characters of a prompt, not line ends."""
    texts = ["a\u2028b", "c\x85d", "e\x0cf", "g\x0bh", "i\u2029j"]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": t}, ensure_ascii=False) for t in texts))
    assert _load(tmp_path / "p.txt") == texts
    assert _load(tmp_path / "p.jsonl") == texts


def test_txt_header_line_is_reported_not_trained_on(tmp_path):
    (tmp_path / "p.txt").write_text(BOM + "Prompt\na cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1 looks like a header \('Prompt'\), not a prompt"):
        _load(tmp_path / "p.txt")
    (tmp_path / "c.txt").write_text("\n  caption \na cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2 looks like a header"):
        _load(tmp_path / "c.txt")
    (tmp_path / "q.txt").write_text("a cat\nprompt\n", encoding="utf-8")
    assert _load(tmp_path / "q.txt") == ["a cat", "prompt"]  # only a first line is a header


def test_jsonl_bad_rows_are_all_listed_in_one_error(tmp_path):
    lines = [
        '{"prompt": "a cat"}',  # 1 ok
        '{"prompt": "a dog"',  # 2 malformed
        "",  # 3 blank: skipped
        '{"caption": "a fox"}',  # 4 no field
        '{"prompt": null}',  # 5 no value
        '["a list"]',  # 6 not an object
        '{"prompt": 7}',  # 7 not text
        '{"prompt": "a bird"}',  # 8 ok
    ]
    (tmp_path / "p.jsonl").write_text(BOM + "\r\n".join(lines) + "\r\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        _load(tmp_path / "p.jsonl")
    msg = str(info.value)
    assert "has 5 rows that cannot be used" in msg
    assert "line 2 is not valid JSON" in msg
    assert "line 4 has no field 'prompt' (fields: caption)" in msg
    assert "line 5, field 'prompt': no value" in msg
    assert "line 6 is not a JSON object (got list)" in msg
    assert "line 7, field 'prompt': 7 is a int, not text" in msg
    assert "line 1" not in msg and "line 8" not in msg and "line 3" not in msg
    assert msg.index("line 2") < msg.index("line 4") < msg.index("line 7")  # in file order


def test_csv_cells_are_text_as_written(tmp_path):
    """An empty CSV prompt cell is "" (a blank row, dropped with its id), never NaN; NA/null/nan/007 stay text."""
    (tmp_path / "p.csv").write_text('id,prompt\n0,NA\n1,\n2,null\n3,nan\n4,007\n5,1e3\n6,"two\nlines"\n7,  \n', "utf-8")
    assert _load(tmp_path / "p.csv") == ["NA", "null", "nan", "007", "1e3", "two\nlines"]
    t = read_table(tmp_path / "p.csv", text_columns=["prompt"], integer_columns=["id"], key="eval.manifest")
    assert t["prompt"].tolist() == ["NA", "", "null", "nan", "007", "1e3", "two\nlines", "  "]
    assert t["id"].tolist() == list(range(8)) and t["id"].dtype == "int64"
    other = read_table(tmp_path / "p.csv", text_columns=[], key="k")["prompt"]  # not free text: empty is no value
    assert other.isna().tolist() == [False, True, False, False, False, False, False, True] and other[2] == "NA"
    assert t.index.tolist() == [2, 3, 4, 5, 6, 7, 8, 10] and t.index.name == "line"  # the quoted cell spans 8-9


def test_csv_bad_rows_are_listed_with_their_lines(tmp_path):
    (tmp_path / "p.csv").write_text('id,prompt\n0,a cat\n1,"a ""dog""\nat home"\n2\n3,a fox,extra\n4,ok\n', "utf-8")
    with pytest.raises(ValueError) as info:
        _load(tmp_path / "p.csv")
    msg = str(info.value)
    assert "has 2 rows that cannot be used" in msg
    assert "line 5, column 'prompt': no value" in msg  # the record after a two-line quoted cell starts on line 5
    assert "line 6 has 3 fields, the header has 2" in msg


def test_parquet_nulls_and_non_text(tmp_path):
    pq = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["a cat", None, "", "a dog"]}).to_parquet(pq)
    with pytest.raises(ValueError, match=r"has 1 row that cannot be used:\n  row 2, column 'prompt': no value"):
        _load(pq)
    pd.DataFrame({"prompt": [1, 2]}).to_parquet(pq)
    with pytest.raises(ValueError, match=r"row 1, column 'prompt': 1 is a int, not text"):
        _load(pq)


def test_empty_and_headerless_files(tmp_path):
    (tmp_path / "e.csv").write_text("\n\n")
    with pytest.raises(ValueError, match=r"prompts.path='.*e.csv' is empty: a .csv file needs a header line"):
        _load(tmp_path / "e.csv")
    (tmp_path / "h.csv").write_text(BOM + "prompt\r\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        _load(tmp_path / "h.csv")
    (tmp_path / "n.csv").write_text("caption\na cat\n")
    with pytest.raises(ValueError, match=r"has no column 'prompt' \(columns: caption\)\. Set prompts.column"):
        _load(tmp_path / "n.csv")


def test_read_table_manifest_rules(tmp_path):
    """The shared reader for manifests and preference data: alternatives, integers, rows and columns named."""
    m = tmp_path / "manifest.csv"
    m.write_text(
        BOM + "model,prompt,prompt_id,seed,path\r\n"
        "base,,0,1,a.png\r\n"  # 2: an empty prompt is the prompt ""
        "base,a cat,,2,b.png\r\n"  # 3: prompt given, prompt_id not: fine (either one)
        "tuned,,,3,c.png\r\n"  # 4: neither
        "tuned,a dog,1,x,d.png\r\n"  # 5: seed not an integer
        "tuned,a dog,1,,\r\n",  # 6: seed and path empty
        encoding="utf-8",
    )
    kw = dict(
        required=["model", ("prompt", "prompt_id"), "path"],
        text_columns=[],
        integer_columns=["prompt_id", "seed"],
        key="eval.manifest",
    )
    with pytest.raises(ValueError) as info:
        read_table(m, **kw)
    msg = str(info.value)
    assert msg.startswith(f"eval.manifest={str(m)!r} has 3 rows that cannot be used")
    assert "line 4, column 'prompt' or 'prompt_id': no value" in msg
    assert "line 5, column 'seed': 'x' is not an integer" in msg
    assert "line 6, column 'seed': no value" in msg and "line 6, column 'path': no value" in msg
    assert "line 2" not in msg and "line 3" not in msg
    m.write_text("model,prompt,prompt_id,seed,path\nbase,,0,1,a.png\nbase,a cat,1,2.0,b.png\n", encoding="utf-8")
    t = read_table(m, **{**kw, "text_columns": ["prompt"]})
    assert t["prompt"].tolist() == ["", "a cat"] and t["seed"].tolist() == [1, 2] and t["seed"].dtype == "int64"
    assert t["model"].tolist() == ["base", "base"] and t.index.tolist() == [2, 3]
    with pytest.raises(ValueError, match=r"has no column 'prompt' \(or 'prompt_id'\) \(columns: model, path\)"):
        (tmp_path / "x.csv").write_text("model,path\nbase,a.png\n")
        read_table(tmp_path / "x.csv", **kw)
    j = tmp_path / "prefs.json"
    j.write_text(json.dumps([{"prompt": "a", "label": 1}, {"prompt": "b", "label": "half"}, {"prompt": "c"}]))
    with pytest.raises(ValueError) as info:
        read_table(j, required=["prompt", "label"], float_columns=["label"], key="eval.preference_data")
    assert "record 2, field 'label': 'half' is not a number" in str(info.value)
    assert "record 3 has no field 'label' (fields: prompt)" in str(info.value)
    with pytest.raises(ValueError, match=r"unknown format '.tsv'"):
        read_table(tmp_path / "m.tsv", key="eval.manifest")
    with pytest.raises(ValueError, match=r"eval.manifest='.*nope.csv' does not exist"):
        read_table(tmp_path / "nope.csv", key="eval.manifest")


def test_many_bad_rows_are_counted_beyond_the_listing(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n".join("{bad" for _ in range(80)) + "\n")
    with pytest.raises(ValueError) as info:
        _load(tmp_path / "p.jsonl")
    assert "has 80 rows that cannot be used" in str(info.value) and "... and 30 more" in str(info.value)
    assert "line 50 is not valid JSON" in str(info.value) and "line 51 " not in str(info.value)
