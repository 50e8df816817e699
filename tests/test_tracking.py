"""pgot/tracking.py: metrics lines and event lines in metrics.jsonl, the trackers' monotonic x axis, truncation on
resume, and the readers that skip event lines (pgot.tracking.metric_lines, pgot.evaluate.read_training_curves)."""

from __future__ import annotations

import json

from pgot.evaluate import read_training_curves
from pgot.tracking import RunLog, metric_lines, truncate_lines


class _Trackers:
    """What RunLog needs of an accelerator: ``log(values, step=...)``, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict]] = []

    def log(self, values: dict, step: int) -> None:
        self.calls.append((step, dict(values)))


def _line(step: int, index: int, run: int, **extra: object) -> dict:
    return {"step": step, "log_index": index, "steps_run": run, "loss": 0.5 + step, **extra}


def test_metrics_and_event_lines_and_the_trackers_x_axis(tmp_path):
    trackers = _Trackers()
    log = RunLog(trackers, tmp_path, total=4, initial=0, lines=0)
    log.write(_line(1, 0, 1), 1)
    log.write(_line(2, 1, 2), 2)
    log.event({"event": "revert", "log_index": 2, "steps_run": 2, "step": 2, "to_step": 0})
    log.rewind(0)
    assert log.bar.n == 0
    log.write(_line(1, 3, 3, strategy="offline"), 3)
    assert log.bar.n == 1  # the bar follows the optimizer step
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["log_index"] for x in lines] == [0, 1, 2, 3]
    assert lines[2]["event"] == "revert"
    # trackers: metrics lines only, numbers only, at x = steps_run (never goes back), with the optimizer step as a value
    assert [s for s, _ in trackers.calls] == [1, 2, 3]
    assert trackers.calls[2][1] == {"step": 1, "log_index": 3, "steps_run": 3, "loss": 1.5}
    assert [x["step"] for x in metric_lines(tmp_path / "metrics.jsonl")] == [1, 2, 1]


def test_truncate_keeps_whole_lines_and_leaves_a_matching_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')  # a line cut by a kill
    truncate_lines(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    before = path.stat().st_mtime_ns, path.stat().st_ino
    truncate_lines(path, 5)  # fewer lines than asked: nothing to do, the file is not rewritten
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
    path.write_text('{"step": 1}\n{"ste')
    truncate_lines(path, 2)
    assert path.read_text() == '{"step": 1}\n'
    truncate_lines(tmp_path / "missing.jsonl", 3)  # no file: nothing


def test_readers_skip_event_lines_and_curves_keep_the_final_branch(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        _line(1, 0, 1, **{"probe/jdr_all": 0.1}),
        _line(2, 1, 2, **{"probe/jdr_all": 0.2}),
        {"event": "revert", "log_index": 2, "steps_run": 2, "step": 2, "to_step": 0, "checkpoint": "step-000000"},
        _line(1, 3, 3, **{"probe/jdr_all": 0.3}),
        _line(2, 4, 4, **{"probe/jdr_all": 0.4}),
        _line(3, 5, 5, **{"probe/jdr_all": 0.5}),
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    assert [m["log_index"] for m in metric_lines(run / "metrics.jsonl")] == [0, 1, 3, 4, 5]
    (curve,) = read_training_curves([f"R={run}"]).values()
    assert curve["step"].tolist() == [1, 2, 3] and curve["probe/jdr_all"].tolist() == [0.3, 0.4, 0.5]
