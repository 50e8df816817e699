"""pgot/files.py: atomic writes leave the old file or the new one, never a partial one."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pgot.files import (
    atomic_write,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
    remove_temporaries,
    temporary_name,
)


def test_writes_and_replaces(tmp_path):
    p = atomic_write_text(tmp_path / "sub" / "a.txt", "one")
    assert p.read_text() == "one"
    atomic_write_json(p, {"x": [1, 2]})
    assert json.loads(p.read_text()) == {"x": [1, 2]}
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    atomic_write_parquet(df, tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), df)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["sub", "t.parquet"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    p = atomic_write_text(tmp_path / "a.txt", "old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, fail)
    assert p.read_text() == "old" and not temporary_name(p).exists()


def test_remove_temporaries(tmp_path):
    (tmp_path / ".x.parquet.123.tmp").write_text("partial")
    (tmp_path / "keep.parquet").write_text("whole")
    assert remove_temporaries(tmp_path, tmp_path / "missing") == 1
    assert [x.name for x in tmp_path.iterdir()] == ["keep.parquet"]
