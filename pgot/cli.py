"""Command-line entry points: pgot-precompute, pgot-train, pgot-eval, pgot-fetch, and pgot (all of them).

Each stage command takes ``--config FILE`` (or the name of a shipped config, e.g. ``--config debug``) and any
number of dotted ``key=value`` overrides::

    pgot-train --config configs/debug.yaml train.max_steps=20 ot.epsilon=0.1

Then: parse; load the config (types and ranges, every problem at once); preflight (:mod:`pgot.preflight`: every
input checked before any weight loads); run. ``--check`` stops after the preflight, ``--print-config`` prints
the resolved config, ``--list-keys [SECTION]`` documents every key with its default, ``--version`` prints the
version. ``pgot config {list,show,copy}`` lists, prints and copies out the shipped configs, and
``python -m pgot {precompute,train,eval,fetch,config}`` is the same as the commands (the form multi-process
launchers use).

A user error (missing file, bad YAML, unknown key, wrong type, out-of-range value, a store that does not match
the config, a folder that cannot be written or that another pgot process holds, ...) prints one ``error:`` line
per problem on stderr and exits with code 2, never a traceback (``--log-level DEBUG`` shows it). A bug in pgot
still shows its traceback. SIGINT and SIGTERM exit with 128 + the signal number (130, 143) after a line saying
what a rerun does.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

import pgot
from pgot.config import (
    Config,
    ConfigError,
    config_names,
    config_to_dict,
    configs_dir,
    describe_keys,
    find_config,
    load_config,
)

log = logging.getLogger("pgot")

# torch's OpenMP threads spin-wait for work by default. On CPU cores shared with other jobs that makes small CPU runs
# 10 to 20 times slower (the README's debug run: 33 s with PASSIVE, over 10 minutes without, next to two busy
# processes on 2 cores), and costs nothing measurable on GPU runs. The commands set it before torch is first imported
# (nothing above imports torch; tests/test_cli.py checks it); a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["eval_main", "fetch_main", "main", "precompute_main", "train_main"]

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # pgot's user errors: ConfigError, StoreNotFoundError, FetchError, TooManyBadSteps, ...
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
)
"""Exceptions a user fixes (a config, a path, a permission): one line, exit code 2, no traceback."""

_ENVIRONMENT_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP, errno.EMFILE}
"""Other OSErrors that are the machine's, not pgot's (read-only or full disk, path too long): one line, exit 2."""


# --------------------------------------------------------------------------------------------
# What each command says about itself
# --------------------------------------------------------------------------------------------

_COMMANDS = {
    "precompute": (
        "pgot-precompute",
        "Per-prompt Pareto frontiers of the base model: N samples per prompt, their reward vectors and each "
        "prompt's non-dominated set, written to a frontier store (precompute.store) that pgot-train reads. "
        "Resumable: a rerun skips the prompts already done.",
        [
            "pgot-precompute --config debug",
            "pgot-precompute --config configs/precompute_sd35_turbo.yaml precompute.samples_per_prompt=50",
            "accelerate launch --multi_gpu --num_processes 2 -m pgot precompute --config precompute_debug",
            "pgot-precompute --config my.yaml --check",
        ],
    ),
    "train": (
        "pgot-train",
        "DRaFT-K LoRA training with the PG-OT loss (offline, online or auto with the agent) or one of the paper's "
        "baselines; probes, checkpoints, exact resume, a final JDR / JCR table against the base model.",
        [
            "pgot-train --config debug",
            "pgot-train --config debug train.max_steps=60 train.output_dir=runs/debug_longer",
            "accelerate launch --config_file configs/accelerate/8gpu.yaml -m pgot train --config sd35_turbo_pgot",
            "pgot-train --config baselines/weighted_1111 --check",
            "pgot-train --list-keys train",
        ],
    ),
    "eval": (
        "pgot-eval",
        "Win rates, JDR, JCR and mean scores of several models (base, LoRAs, reward soups) on the same prompts and "
        "seeds, or of images on disk (eval.manifest); tables, figures, reward preference accuracy, a user study.",
        [
            "pgot-eval --config eval_debug",
            "pgot-eval --config eval_parti eval.bootstrap=200",
            "pgot-eval --config eval_debug eval.manifest=images/manifest.csv",
            "pgot-eval --config my_eval.yaml --check",
        ],
    ),
}


def _epilog(examples: Sequence[str], configs: bool = True) -> str:
    lines = ["examples:", *(f"  {e}" for e in examples)]
    if configs:
        names = config_names()
        lines += [
            "",
            "shipped configs (give the name to --config, from any folder):",
            *(f"  {n}" for n in names),
            "copy one to edit it: pgot config copy debug my.yaml",
        ]
    lines += ["", "A problem prints one 'error:' line per problem and exits with code 2."]
    return "\n".join(lines)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; adds '(default: ...)' to options that have one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _parser(command: str) -> argparse.ArgumentParser:
    prog, description, examples = _COMMANDS[command]
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=_epilog(examples), formatter_class=_Formatter
    )
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="YAML config file, or the name of a shipped config (debug, baselines/weighted_1111; see below)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10 rewards.0.weight=2"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the config and every input it names (files, folders, store, environment), load no weights, "
        "run nothing; exit 0 when all is in place",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (file + overrides) as YAML and exit"
    )
    parser.add_argument(
        "--list-keys",
        nargs="?",
        const="",
        metavar="SECTION",
        help="list every config key (or those of SECTION: model, draft, rewards, ot, prompts, precompute, train, "
        "agent, eval) with its type, default and meaning, and exit",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log; DEBUG also shows the traceback behind an error line",
    )
    parser.add_argument("--version", action="version", version=f"pgot {pgot.__version__}")
    return parser


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _fail(problems: Sequence[str], code: int = 2, prefix: str = "error: ") -> int:
    for line in problems:
        for part in str(line).splitlines() or [""]:
            print(f"{prefix}{part}", file=sys.stderr)
    return code


def _os_error(exc: OSError) -> str:
    """One line for an OSError: what happened to which path."""
    if exc.filename is None:
        return str(exc)
    what = exc.strerror or type(exc).__name__
    path = repr(str(exc.filename)) + (f" -> {str(exc.filename2)!r}" if exc.filename2 is not None else "")
    return f"{path}: {what} ({type(exc).__name__}). Check the path and its permissions."


def _guard(work: Callable[[], int | None]) -> int:
    """Run ``work``; a user error becomes one ``error:`` line per problem and exit code 2 (1 for trouble the user
    cannot fix, such as a network failure of pgot-fetch); anything else keeps its traceback.

    SIGINT (Ctrl-C) and SIGTERM (what schedulers send on preemption) stop a command cleanly with a line saying
    what a rerun does, and exit code 128 + the signal number: 130 and 143 (training finishes the step in flight
    and checkpoints it first, :mod:`pgot.train`; precompute finishes the batch in flight, :mod:`pgot.precompute`).

    Under ``accelerate launch``, an error every process raises alike (:func:`pgot.devices.every_process`) is printed
    once per machine, by its first process (``LOCAL_RANK`` 0); the others wait to be ended by the launcher, which
    ends every process as soon as one exits (:func:`_leave_after_the_first`). A process that prints its report
    ignores SIGINT and SIGTERM meanwhile, so the launcher cannot cut it short."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate)} if main_thread else {}  # like Ctrl-C
    if main_thread:
        previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
    try:
        return work() or 0
    except KeyboardInterrupt as exc:  # pgot.checkpoints.Interrupted says what a rerun does
        signum = int(getattr(exc, "signum", signal.SIGINT))
        name = signal.Signals(signum).name
        text = str(exc) or f"interrupted by {name}; finished work is kept and a rerun continues it"
        return _report(exc, [text], 128 + signum, prefix="", main_thread=main_thread)
    except BrokenPipeError:  # the reader of stdout went away (`pgot config list | head`): nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except Exception as exc:
        problems = getattr(exc, "problems", None)
        user = isinstance(exc, USER_ERRORS) or (
            isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS and exc.filename is not None
        )
        if not user:
            raise
        log.debug("the error below, with its traceback", exc_info=True)
        code = 2 if getattr(exc, "user_error", True) else 1
        lines = problems or [_os_error(exc) if isinstance(exc, OSError) else str(exc) or type(exc).__name__]
        return _report(exc, lines, code, prefix="error: ", main_thread=main_thread)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


QUIET_WAIT_S = 30.0
"""How long a process of a launch that leaves an error to its machine's first process waits to be ended by the
launcher before it prints the error itself and exits (:func:`_leave_after_the_first`)."""


def _report(exc: BaseException, lines: Sequence[str], code: int, *, prefix: str, main_thread: bool) -> int:
    """Print ``lines`` (each line of each, after ``prefix``) to stderr and return ``code``; see :func:`_guard`."""
    if main_thread:  # the report is not cut short: the launcher ends every process as soon as one exits
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    if getattr(exc, "every_process", False) and os.environ.get("LOCAL_RANK", "0") != "0":
        from pgot.devices import launch_size  # only for errors of a launch: the module that raised imported it

        if launch_size() > 1:
            _leave_after_the_first(main_thread)
    return _fail(lines, code, prefix)


def _leave_after_the_first(main_thread: bool) -> None:
    """A process whose error its machine's first process prints as well: wait to be ended by the launcher (SIGINT
    and SIGTERM end it at once, silently). ``accelerate launch`` ends every process as soon as one exits, so a
    process leaving first could end the printing one before it printed. After :data:`QUIET_WAIT_S` (the first
    process is stuck or gone) it goes on and prints the error too."""
    if main_thread:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
    time.sleep(QUIET_WAIT_S)
    if main_thread:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


def _terminate(signum: int, frame: object) -> None:
    stop = KeyboardInterrupt()
    stop.signum = signum
    raise stop


# --------------------------------------------------------------------------------------------
# The stage commands
# --------------------------------------------------------------------------------------------


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _print_keys(section: str) -> int:
    for k in describe_keys(section or None):
        default = k.default if k.default != "" else "''" if k.type == "str" else ""
        print(f"{k.key}{f' = {default}' if default else ''}    [{k.type}]")
        if k.doc:
            print(f"    {k.doc}")
    return 0


def _load(args: argparse.Namespace, stage: str | None) -> Config:
    """The config, or a ConfigError with the config problems and, when a config could be built, the problems of
    its inputs too (every problem of one command at once)."""
    try:
        return load_config(args.config, args.overrides, stage=stage)
    except ConfigError as exc:
        if stage is None or exc.config is None:
            raise
        cfg, known = exc.config, exc.problems
    # imports the model libraries: only when there is a config
    from pgot.devices import processes
    from pgot.preflight import preflight

    # the run's preflight with these problems: under accelerate launch a collective, so only the main process tries
    # the output folder (several processes trying one folder at once see each other) and the error is said once per
    # machine (pgot-eval refuses a launch before any check)
    preflight(cfg, stage, None if stage == "eval" else processes(cfg.model.device), known)
    raise AssertionError("the preflight raises with known problems")  # pgot's invariant: not reached


def _stage_main(command: str, run: Callable[[Config], object], argv: Sequence[str] | None) -> int:
    parser = _parser(command)
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the options
    _setup_logging(args.log_level)
    if args.list_keys is not None:
        return _guard(lambda: _print_keys(args.list_keys))
    if not args.config:
        parser.print_usage(sys.stderr)
        return _fail([f"{parser.prog} needs --config FILE (or the name of a shipped config, e.g. --config debug)."])

    def work() -> int:
        if args.print_config:
            cfg = load_config(args.config, args.overrides)
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            return 0
        cfg = _load(args, command)
        if args.check:
            from pgot.devices import processes
            from pgot.preflight import preflight

            # under accelerate launch, the run's collective check (pgot-eval refuses a launch before any check)
            state = None if command == "eval" else processes(cfg.model.device)
            preflight(cfg, command, state)
            if state is None or state.is_local_main_process:
                print(f"{parser.prog}: the config and every input it names are in place (nothing was run).")
            if state is not None:
                state.destroy_process_group()
            return 0
        run(cfg)
        return 0

    return _guard(work)


def precompute_main(argv: Sequence[str] | None = None) -> int:
    """pgot-precompute: per-prompt Pareto frontiers of the base model's samples."""

    def run(cfg: Config) -> object:
        from pgot import precompute

        return precompute.run(cfg)

    return _stage_main("precompute", run, argv)


def train_main(argv: Sequence[str] | None = None) -> int:
    """pgot-train: DRaFT-K LoRA training with the PG-OT loss or a baseline."""

    def run(cfg: Config) -> object:
        from pgot import train

        return train.run(cfg)

    return _stage_main("train", run, argv)


def eval_main(argv: Sequence[str] | None = None) -> int:
    """pgot-eval: win rates, JDR, JCR and mean scores of several models on the same prompts and seeds."""

    def run(cfg: Config) -> object:
        from pgot import evaluate

        return evaluate.run(cfg)

    return _stage_main("eval", run, argv)


# --------------------------------------------------------------------------------------------
# pgot-fetch
# --------------------------------------------------------------------------------------------


def fetch_main(argv: Sequence[str] | None = None) -> int:
    """pgot-fetch: download the checkpoints a config names into pgot's layout and write a config with local paths."""
    from pgot import hub

    parser = argparse.ArgumentParser(
        prog="pgot-fetch",
        description="Download every checkpoint a config names (the base model and each learned reward) from the "
        "Hugging Face hub into one folder in pgot's layout, through the hub cache (downloads resume), with the "
        "licences listed first; then write the same config with the local paths filled in.",
        epilog=_epilog(
            [
                "pgot-fetch --config sd35_turbo_pgot --dest weights --dry-run",
                "pgot-fetch --config sd35_turbo_pgot --dest weights model.use_t5=false",
                "pgot-train --config weights/sd35_turbo_pgot.yaml   # the written config",
            ]
        ),
        formatter_class=_Formatter,
    )
    parser.add_argument("--config", "-c", metavar="FILE", required=True, help="YAML config file or shipped name")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.use_t5=false")
    parser.add_argument("--dest", default="weights", help="folder for the checkpoints, in pgot's layout")
    parser.add_argument("--out-config", help="config to write with local paths (default: <dest>/<config name>.yaml)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan (sources, files, sizes, licences); download nothing"
    )
    parser.add_argument("--only", choices=["model", "rewards"], help="fetch only the model or only the rewards")
    parser.add_argument("--cache-dir", help="hub cache folder (default: HF_HUB_CACHE or ~/.cache/huggingface/hub)")
    parser.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="how much to log"
    )
    parser.add_argument("--version", action="version", version=f"pgot {pgot.__version__}")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")

    def work() -> int:
        cfg = load_config(args.config, args.overrides)
        return hub.fetch_command(
            cfg,
            config=args.config,
            overrides=args.overrides,
            dest=args.dest,
            out_config=args.out_config,
            dry_run=args.dry_run,
            only=args.only,
            cache_dir=args.cache_dir,
        )

    return _guard(work)


# --------------------------------------------------------------------------------------------
# pgot config
# --------------------------------------------------------------------------------------------


def _summary(path: Path) -> str:
    """The first comment line of a shipped config (what it is for)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def config_main(argv: Sequence[str] | None = None, prog: str = "pgot config") -> int:
    """pgot config: list, print or copy out the configs shipped with pgot."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="The configs shipped with pgot, by name: list them, print one, or copy one out to edit it. "
        "Every command's --config also takes these names.",
        epilog=_epilog(
            [f"{prog} list", f"{prog} show debug", f"{prog} copy debug my.yaml", "pgot-train --config my.yaml"],
            configs=False,
        ),
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="action", metavar="{list,show,copy}")
    sub.add_parser("list", help="the names of the shipped configs, with what each is for")
    show = sub.add_parser("show", help="print a shipped config")
    show.add_argument("name", help="e.g. debug or baselines/weighted_1111")
    copy = sub.add_parser("copy", help="copy a shipped config to a file to edit")
    copy.add_argument("name", help="e.g. debug or baselines/weighted_1111")
    copy.add_argument("dest", nargs="?", help="file or folder to write (default: <name>.yaml here)")
    copy.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)
    if args.action is None:
        parser.print_usage(sys.stderr)
        return _fail([f"{prog} needs an action: list, show or copy."])

    def found(name: str) -> Path:
        path = find_config(name)
        if path is None:
            names = config_names()
            raise ValueError(f"{name!r} is not a shipped config. Shipped configs: {', '.join(names) or 'none'}.")
        return path

    def work() -> int:
        if args.action == "list":
            folder = configs_dir()
            names = config_names()
            if folder is None or not names:
                raise ValueError("this install of pgot has no shipped configs (pgot.configs is missing).")
            width = max(len(n) for n in names)
            for n in names:
                print(f"{n.ljust(width)}  {_summary(folder / f'{n}.yaml')}")
            return 0
        path = found(args.name)
        if args.action == "show":
            print(path.read_text(encoding="utf-8"), end="")
            return 0
        dest = Path(args.dest or path.name)
        if dest.is_dir():
            dest = dest / path.name
        if dest.exists() and not args.force:
            raise ValueError(f"{dest} exists already; choose another file, or add --force to overwrite it.")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        print(f"wrote {dest}: edit it, then run e.g. pgot-train --config {dest}")
        return 0

    return _guard(work)


# --------------------------------------------------------------------------------------------
# pgot / python -m pgot
# --------------------------------------------------------------------------------------------

_SUBCOMMANDS: dict[str, tuple[Callable[[Sequence[str] | None], int], str]] = {
    "precompute": (precompute_main, "per-prompt Pareto frontiers of the base model (pgot-precompute)"),
    "train": (train_main, "LoRA training with PG-OT or a baseline (pgot-train)"),
    "eval": (eval_main, "compare models: win rate, JDR, JCR, tables and figures (pgot-eval)"),
    "fetch": (fetch_main, "download the checkpoints a config names (pgot-fetch)"),
    "config": (config_main, "list, print or copy out the shipped configs"),
}


def _usage(prog: str) -> str:
    return f"usage: {prog} {{{','.join(_SUBCOMMANDS)}}} [--help] ..."


def main(argv: Sequence[str] | None = None) -> int:
    """pgot / python -m pgot: one entry point for every command (what accelerate launch -m pgot train starts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "pgot" if Path(sys.argv[0]).name == "pgot" else "python -m pgot"
    if argv and argv[0] in _SUBCOMMANDS:
        command, rest = argv[0], argv[1:]
        if command == "config":
            return config_main(rest, prog=f"{prog} config")
        return _SUBCOMMANDS[command][0](rest)
    if argv and argv[0] in ("-h", "--help"):
        width = max(len(c) for c in _SUBCOMMANDS)
        print(_usage(prog))
        print("\npgot: Pareto-Guided Optimal Transport (PG-OT) for multi-reward alignment of text-to-image models.\n")
        print("commands:")
        for name, (_, what) in _SUBCOMMANDS.items():
            print(f"  {name.ljust(width)}  {what}")
        print(f"\n'{prog} COMMAND --help' documents a command; '{prog} train --list-keys' documents every config key.")
        print(f"example: {prog} train --config debug train.max_steps=20")
        return 0
    if argv and argv[0] == "--version":
        print(f"pgot {pgot.__version__}")
        return 0
    print(_usage(prog), file=sys.stderr)
    what = f"unknown command {argv[0]!r}" if argv else "a command is needed"
    return _fail([f"{what}; choose one of {', '.join(_SUBCOMMANDS)} ('{prog} --help' says what each does)."])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
