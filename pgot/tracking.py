"""What a training run reports: ``metrics.jsonl``, the accelerate trackers (TensorBoard, W&B) and the progress bar.

One :class:`RunLog` per run, used on the main process only. ``metrics.jsonl`` holds one JSON object per line:

- a **metrics line** per logged step, with ``step`` (the optimizer step of the model the line describes; it goes
  back after an agent revert), ``log_index`` (the line's position in the file, 0, 1, 2, ...: it never repeats)
  and ``steps_run`` (optimizer steps executed so far, those of abandoned branches included: it never goes back);
- an **event line** (``{"event": "revert", ...}``) where something happened between steps; readers of metrics
  skip lines that have ``event`` (:func:`metric_lines`).

The trackers receive the numeric entries of each metrics line with ``steps_run`` as their x axis, so a value in
TensorBoard or W&B equals the one in ``metrics.jsonl`` and no tracker ever sees a step go back. A resumed run
truncates ``metrics.jsonl`` to the lines of its checkpoint (``TrainerState.metrics_lines``) and continues the
counters from there; TensorBoard is told to drop the points the interrupted attempt logged after the checkpoint
(``purge_step``). Log records of the ``pgot`` loggers are written through the bar (``tqdm.write``) while it is
open, so they do not break it.

Besides the numbers, the trackers get what a run saves as files, as diffusers' training examples log their
validation images, at the same x (``steps_run``): images (:meth:`RunLog.log_images`: the probe grids
``probes/grid``, the agent's diagnostic grids ``agent/grid-NN``) through TensorBoard's ``SummaryWriter.add_image``
and W&B's ``wandb.Image``; text (:meth:`RunLog.log_text`: the agent's decisions ``agent/decision``, the
end-of-training table ``final/table``) through ``add_text`` and ``wandb.Html``; and
the resolved config (its flat keys as TensorBoard hyperparameters and the W&B run config, through
``accelerator.init_trackers``; :meth:`RunLog.log_config` adds the YAML as TensorBoard text ``config``).
"""

from __future__ import annotations

import html
import json
import logging
import math
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pgot.files import atomic_write_text

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["RunLog", "finite_or_none", "flatten", "metric_lines", "truncate_lines"]


def finite_or_none(x: float) -> float | None:
    """``x`` as a float, or None when it is NaN or infinite (JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"train.learning_rate": 1e-4, ...}`` with scalars only (what trackers accept)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def truncate_lines(path: str | Path, lines: int) -> None:
    """Keep the first ``lines`` lines of ``path`` (a resumed run drops what was logged after its checkpoint).

    The file is replaced atomically, and only when it has more lines (a file that already matches is not touched).
    """
    path = Path(path)
    if not path.exists():
        return
    text = path.read_text()
    kept = text.splitlines(keepends=True)[:lines]
    if kept and not kept[-1].endswith("\n"):  # a line cut by a kill mid-write is not a line
        kept = kept[:-1]
    if "".join(kept) != text:
        atomic_write_text(path, "".join(kept))


def metric_lines(path: str | Path) -> list[dict[str, Any]]:
    """The metrics lines of a ``metrics.jsonl``, in file order: event lines and lines that are not JSON objects
    (a line cut by a kill) are skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "event" not in rec:
            out.append(rec)
    return out


class _BarHandler(logging.Handler):
    """Writes log records with ``tqdm.write`` so they appear above the progress bar instead of breaking it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


@contextmanager
def _route_logging_through_bar() -> Iterator[None]:
    root = logging.getLogger()
    swapped = []
    for h in root.handlers:
        # console handlers only (a handler writing to a file or a buffer, e.g. pytest's caplog, stays as it is)
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.stdout):
            bar = _BarHandler(h.level)
            bar.setFormatter(h.formatter)
            swapped.append((h, bar))
    for old, new in swapped:
        root.removeHandler(old)
        root.addHandler(new)
    try:
        yield
    finally:
        for old, new in swapped:
            root.removeHandler(new)
            root.addHandler(old)


class RunLog:
    """``metrics.jsonl``, trackers and the bar of one run (main process).

    Args:
        accelerator: the run's accelerator (its trackers, when ``train.log_with`` names any).
        run_dir: the run folder.
        total: ``train.max_steps`` (the bar's length).
        initial: the step the run starts from.
        lines: lines of ``metrics.jsonl`` that belong to the resumed state (later ones are dropped).
    """

    def __init__(self, accelerator: Accelerator, run_dir: Path, total: int, initial: int, lines: int):
        self.accelerator = accelerator
        self.path = Path(run_dir) / "metrics.jsonl"
        truncate_lines(self.path, lines)
        self._routing = _route_logging_through_bar()
        self._routing.__enter__()
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def write(self, line: dict[str, Any], step: int) -> None:
        """Append the metrics line ``line`` to metrics.jsonl, send its numbers to the trackers at x = ``step``
        (``steps_run``: never goes back), move the bar to the line's optimizer ``step``."""
        self._append(line)
        numbers = {k: v for k, v in line.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.accelerator.log(numbers, step=step)
        postfix = {"loss": f"{line['loss']:.4g}" if line.get("loss") is not None else "nan"}
        postfix |= {
            k.removeprefix("reward/"): f"{v:.3g}" for k, v in line.items() if k.startswith("reward/") and v is not None
        }
        self.bar.set_postfix(postfix)
        self.bar.update(int(line.get("step", step)) - self.bar.n)

    def event(self, line: dict[str, Any]) -> None:
        """Append the event line ``line`` (it has an ``event`` key) to metrics.jsonl; trackers get nothing."""
        assert "event" in line, f"an event line needs an 'event' key: {line}"
        self._append(line)

    def _append(self, line: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def log_images(self, images: Mapping[str, Image.Image], step: int) -> None:
        """Send images to the trackers: TensorBoard ``add_image`` (HWC uint8), W&B ``wandb.Image``.

        Args:
            images: tag (e.g. ``probes/grid``) -> RGB PIL image (e.g. :func:`pgot.images.labelled_grid`).
            step: the trackers' x value (pgot-train passes ``steps_run``, the x axis of :meth:`write`).
        """
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                for tag, image in images.items():
                    tracker.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
                tracker.writer.flush()
            elif tracker.name == "wandb":
                import wandb  # optional dependency, present when the wandb tracker runs

                tracker.run.log(
                    {tag: wandb.Image(image, caption=f"step {step}") for tag, image in images.items()}, step=step
                )

    def log_text(self, texts: Mapping[str, str], step: int) -> None:
        """Send text to the trackers: TensorBoard ``add_text`` (as a code block), W&B ``wandb.Html`` (``<pre>``).

        Args:
            texts: tag (e.g. ``agent/decision``) -> text.
            step: the trackers' x value (pgot-train passes ``steps_run``, the x axis of :meth:`write`).
        """
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                for tag, text in texts.items():
                    tracker.writer.add_text(tag, _markdown_code(text), step)
                tracker.writer.flush()
            elif tracker.name == "wandb":
                import wandb

                tracker.run.log(
                    {tag: wandb.Html(f"<pre>{html.escape(t)}</pre>") for tag, t in texts.items()}, step=step
                )

    def log_config(self, text: str) -> None:
        """Send the resolved config as YAML ``text`` to TensorBoard (text tag ``config``, step 0).

        W&B already has it: ``accelerator.init_trackers(config=...)`` writes every key into the run config
        (``wandb.config``, flat keys such as ``train.learning_rate``), as TensorBoard's hyperparameters.
        """
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_text("config", _markdown_code(text), 0)
                tracker.writer.flush()

    def rewind(self, step: int) -> None:
        """Move the bar back to ``step`` (after a revert)."""
        self.bar.n = step
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        self._routing.__exit__(None, None, None)


def _markdown_code(text: str) -> str:
    """``text`` as a markdown code block (TensorBoard renders its text as markdown)."""
    return "\n".join("    " + line for line in text.splitlines())
