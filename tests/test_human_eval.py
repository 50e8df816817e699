"""Tests of pgot/human_eval.py: reward preference accuracy by hand, and the user-study kit
(pgot/data/study.html, write_study / tally_votes).

The study page is driven in headless Chromium (Debian's ``chromium`` package) through its ``#autotest=`` hook,
which replays real DOM click and keydown events and writes the votes JSON, read back from the download
Blob, into the DOM; ``--dump-dom`` prints it. The test skips when no Chromium is installed.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pgot import human_eval
from pgot.config import load_config
from pgot.human_eval import tally_votes, write_study

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "tests" / "configs" / "tiny_eval.yaml"  # tiny SD3, analytic rewards
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", (16, 16), color)
    im.putpixel((0, 0), (255 - color[0], 255 - color[1], 255 - color[2]))
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_preference_accuracy_by_hand(tmp_path):
    from pgot.rewards import build

    vivid, gray = _png((230, 20, 40)), _png((120, 120, 120))
    # the human preferred the vivid image in pairs 0-3 and the gray one in pair 4; pair 5 is a tie (dropped)
    pairs = [
        ("a", vivid, gray, 0),
        ("b", gray, vivid, 1),
        ("c", vivid, gray, 0),
        ("d", gray, vivid, 1),
        ("e", vivid, gray, 1),
        ("f", vivid, gray, 0.5),
    ]
    pd.DataFrame([{"prompt": p, "image_0": a, "image_1": b, "label": lab} for p, a, b, lab in pairs]).to_parquet(
        tmp_path / "prefs.parquet"
    )
    data = human_eval.read_preference_data(tmp_path / "prefs.parquet")
    assert len(data) == 5
    rewards = build(load_config(DEBUG).rewards)
    acc = human_eval.preference_accuracy(rewards, data, num_resamples=100)
    # colorfulness always prefers the vivid image: right on 4 of 5 pairs
    assert acc.loc["colorfulness", "accuracy"] == pytest.approx(0.8)
    assert acc.loc["colorfulness", "low"] <= 0.8 <= acc.loc["colorfulness", "high"]
    assert (acc["pairs"] == 5).all()
    # Pick-a-Pic's label_0 column (1: image 0 won) works as well
    pd.DataFrame([{"prompt": p, "jpg_0": a, "jpg_1": b, "label_0": 1 - lab} for p, a, b, lab in pairs]).to_parquet(
        tmp_path / "pap.parquet"
    )
    acc2 = human_eval.preference_accuracy(
        rewards, human_eval.read_preference_data(tmp_path / "pap.parquet"), num_resamples=0
    )
    assert acc2.loc["colorfulness", "accuracy"] == pytest.approx(0.8)
    pd.DataFrame([{"prompt": "x", "image_0": "nope.png", "image_1": "nope2.png", "label": 0}]).to_csv(
        tmp_path / "bad.csv", index=False
    )
    with pytest.raises(ValueError, match="2 images do not exist"):
        human_eval.read_preference_data(tmp_path / "bad.csv")


def _scores(tmp_path: Path, models=("base", "cand"), prompts=3, samples=2) -> pd.DataFrame:
    rows = []
    for mi, model in enumerate(models):
        for p in range(prompts):
            for s in range(samples):
                rel = Path("images") / model / f"{p}-{s}.png"
                (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 24), (40 * mi, 60 * p, 100 * s)).save(tmp_path / rel)
                rows.append(
                    {
                        "model": model,
                        "prompt_id": p,
                        "prompt": f"prompt </script> {p}",
                        "seed": 0,
                        "sample_index": s,
                        "path": rel.as_posix(),
                    }
                )
    return pd.DataFrame(rows)


def test_page_is_self_contained_and_keyed(tmp_path):
    scores = _scores(tmp_path, models=("base", "a", "b"))
    page = write_study(scores, tmp_path, tmp_path / "study", "base", ["a", "b"], 4, seed=3, image_size=16)
    html = page.read_text()
    key = json.loads((tmp_path / "study" / "key.json").read_text())
    assert len(key["pairs"]) == 8 and {v["candidate"] for v in key["pairs"].values()} == {"a", "b"}
    # blind: model names never appear in the page; images are inline; no external resource
    data = json.loads(re.search(r'<script id="study-data" type="application/json">(.*?)</script>', html, re.S).group(1))
    assert [p["id"] for p in data["pairs"]] != sorted(key["pairs"]) or len(key["pairs"]) < 3  # shuffled
    assert all(p["left"].startswith("data:image/jpeg;base64,") for p in data["pairs"])
    assert not re.search(r'(src|href)="https?:', html)
    assert '"candidate"' not in html
    # both sides occur for the candidate (random left/right order)
    assert {v["left"] == v["candidate"] for v in key["pairs"].values()} == {True, False}
    # the same seed gives the same study
    write_study(scores, tmp_path, tmp_path / "study2", "base", ["a", "b"], 4, seed=3, image_size=16)
    assert json.loads((tmp_path / "study2" / "key.json").read_text()) == key


def _votes_file(tmp_path: Path, study_id: str, votes: dict[str, str], annotator="ann") -> Path:
    f = tmp_path / f"votes-{annotator}.json"
    f.write_text(
        json.dumps(
            {
                "format": "pgot-study-votes",
                "study_id": study_id,
                "annotator": annotator,
                "votes": [{"pair": p, "choice": c} for p, c in votes.items()],
            }
        )
    )
    return f


def test_tally_by_hand(tmp_path):
    scores = _scores(tmp_path)
    write_study(scores, tmp_path, tmp_path / "study", "base", ["cand"], 5, seed=0, image_size=0)
    key = json.loads((tmp_path / "study" / "key.json").read_text())
    ids = sorted(key["pairs"])
    cand_side = {p: ("left" if key["pairs"][p]["left"] == "cand" else "right") for p in ids}
    other = {"left": "right", "right": "left"}
    # annotator 1: cand wins 3, tie 1, loses 1; annotator 2: cand wins 1 (and changes its mind once)
    v1 = {
        ids[0]: cand_side[ids[0]],
        ids[1]: cand_side[ids[1]],
        ids[2]: cand_side[ids[2]],
        ids[3]: "tie",
        ids[4]: other[cand_side[ids[4]]],
    }
    f1 = _votes_file(tmp_path, key["study_id"], v1, "one")
    f2 = _votes_file(tmp_path, key["study_id"], {ids[0]: cand_side[ids[0]]}, "two")
    t = tally_votes([f1, f2], tmp_path / "study" / "key.json")
    r = t.loc["cand"]
    assert (r.votes, r.wins, r.ties, r.losses, r.annotators) == (6, 4, 1, 1, 2)
    assert r.win_rate == pytest.approx(4.5 / 6)
    assert r.low < 4.5 / 6 < r.high
    other_study = _votes_file(tmp_path, "zzz", v1, "three")
    with pytest.raises(ValueError, match="belongs to study 'zzz'"):
        tally_votes([other_study], tmp_path / "study" / "key.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a pgot study vote file"):
        tally_votes([bad], tmp_path / "study" / "key.json")


def _run_page(page: Path, steps: list[str], tmp_path: Path) -> tuple[dict, dict]:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=5000", "--dump-dom", f"{page.as_uri()}#autotest={','.join(steps)}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    dom = proc.stdout
    m = re.search(r'<pre id="autotest-result"([^>]*)>(.*?)</pre>', dom, re.S)
    assert m, f"no autotest result in the dumped DOM (rc={proc.returncode}); stderr:\n{proc.stderr[-2000:]}"
    attrs = dict(re.findall(r'data-([a-z]+)="([^"]*)"', m.group(1)))
    blob = re.search(r'<pre id="autotest-blob"[^>]*>(.*?)</pre>', dom, re.S)
    assert blob and blob.group(1).strip(), "the download Blob was not read back"
    from_blob = json.loads(unescape(blob.group(1)))
    assert from_blob == json.loads(unescape(m.group(2)))
    return from_blob, attrs


@pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium); .ci/run installs it"
)
def test_votes_in_headless_chromium_tally_to_expected_rates(tmp_path):
    scores = _scores(tmp_path, prompts=3, samples=2)
    page = write_study(scores, tmp_path, tmp_path / "study", "base", ["cand"], 5, seed=1, image_size=16)
    key = json.loads((tmp_path / "study" / "key.json").read_text())
    data = json.loads(re.search(r'type="application/json">(.*?)</script>', page.read_text(), re.S).group(1))
    order = [p["id"] for p in data["pairs"]]  # the order the page shows
    assert len(order) == 5
    # click left button, ArrowRight, '=' tie, click right image, '1'; Backspace back to the last pair, '2' revotes
    steps = ["a:Ann Lee", "cL", "kR", "k=", "iR", "k1", "kB", "k2"]
    got, attrs = _run_page(page, steps, tmp_path)
    expected_choice = dict(zip(order, ["left", "right", "tie", "right", "right"], strict=True))
    assert {v["pair"]: v["choice"] for v in got["votes"]} == expected_choice
    assert got["study_id"] == key["study_id"] and got["annotator"] == "Ann Lee" and got["pairs_total"] == 5
    assert attrs["progress"] == "5 / 5 rated"
    assert attrs["download"] == f"votes-{key['study_id']}-Ann_Lee.json"
    assert attrs["href"].startswith("blob:")

    votes = tmp_path / attrs["download"]
    votes.write_text(json.dumps(got))
    t = tally_votes([votes], tmp_path / "study" / "key.json")
    wins = sum(key["pairs"][p][c] == "cand" for p, c in expected_choice.items() if c != "tie")
    ties = sum(c == "tie" for c in expected_choice.values())
    r = t.loc["cand"]
    assert (r.votes, r.wins, r.ties, r.losses) == (5, wins, ties, 5 - wins - ties)
    assert r.win_rate == pytest.approx((wins + ties / 2) / 5)
