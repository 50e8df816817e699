"""Command-line entry points: ``pgot-precompute``, ``pgot-train`` and ``pgot-eval``.

Each takes ``--config PATH`` and any number of dotted ``key=value`` overrides::

    pgot-train --config configs/debug.yaml train.max_steps=20 ot.epsilon=0.1

A user error (missing file, bad YAML, unknown key, wrong type, out-of-range value, a store that does
not match the config, a folder another pgot process holds, ...) prints one line per problem on stderr and
exits with code 2, never a traceback. SIGINT (Ctrl-C) and SIGTERM (what schedulers send on preemption) stop
a command cleanly with a line saying what a rerun does, and exit code 128 + the signal number: 130 and 143.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from pgot.config import Config, ConfigError, load_config

log = logging.getLogger("pgot")

_EXAMPLES = {
    "pgot-precompute": "pgot-precompute --config configs/precompute_debug.yaml precompute.samples_per_prompt=8",
    "pgot-train": "pgot-train --config configs/debug.yaml train.max_steps=20",
    "pgot-eval": "pgot-eval --config configs/eval_debug.yaml eval.bootstrap=200",
}


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"example: {_EXAMPLES[prog]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", required=True, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _fail(problems: Sequence[str]) -> int:
    for line in problems:
        for part in str(line).splitlines() or [""]:
            print(f"error: {part}", file=sys.stderr)
    return 2


def _main(prog: str, description: str, stage: Callable[[Config], object], argv: Sequence[str] | None, name: str) -> int:
    args = _parser(prog, description).parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        cfg = load_config(args.config, args.overrides, stage=name)
    except ConfigError as exc:
        return _fail(exc.problems)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None  # SIGTERM: like Ctrl-C
    try:
        stage(cfg)
    except ConfigError as exc:
        return _fail(exc.problems)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        # user errors raised by the stages: one clear line, no traceback
        return _fail([str(exc)])
    except KeyboardInterrupt as exc:  # pgot.checkpoints.Interrupted says what a rerun does
        signum = int(getattr(exc, "signum", signal.SIGINT))
        print(str(exc) or f"interrupted by {signal.Signals(signum).name}; finished work is kept and a rerun continues it",
              file=sys.stderr)  # fmt: skip
        return 128 + signum
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate(signum: int, frame: object) -> None:
    stop = KeyboardInterrupt()
    stop.signum = signum
    raise stop


def precompute_main(argv: Sequence[str] | None = None) -> int:
    """``pgot-precompute``: per-prompt Pareto frontiers of the base model's samples."""

    def stage(cfg: Config) -> object:
        from pgot import precompute

        return precompute.run(cfg)

    return _main("pgot-precompute", precompute_main.__doc__ or "", stage, argv, "precompute")


def train_main(argv: Sequence[str] | None = None) -> int:
    """``pgot-train``: DRaFT-K LoRA training with the PG-OT loss or a baseline."""

    def stage(cfg: Config) -> object:
        from pgot import train

        return train.run(cfg)

    return _main("pgot-train", train_main.__doc__ or "", stage, argv, "train")


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``pgot-eval``: win rates, JDR, JCR and mean scores of several models on the same prompts and seeds."""

    def stage(cfg: Config) -> object:
        from pgot import evaluate

        return evaluate.run(cfg)

    return _main("pgot-eval", eval_main.__doc__ or "", stage, argv, "eval")


_STAGES = {"precompute": precompute_main, "train": train_main, "eval": eval_main}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pgot STAGE ...``: dispatch to one of the three commands (used by ``accelerate launch -m pgot``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _STAGES:
        print(f"usage: python -m pgot {{{','.join(_STAGES)}}} --config FILE [key=value ...]", file=sys.stderr)
        return 2
    return _STAGES[argv[0]](argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
