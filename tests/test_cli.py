"""Tests of pgot/cli.py: user errors give one line per problem on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pgot.cli import eval_main, precompute_main, train_main

MAINS = [precompute_main, train_main, eval_main]


@pytest.mark.parametrize("main", MAINS, ids=lambda f: f.__name__)
def test_missing_config_file(main, tmp_path, capsys):
    code = main(["--config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"error: config file {str(tmp_path / 'nope.yaml')!r} does not exist."
    # a relative name that is neither a file nor a shipped config: a "did you mean" among the shipped ones
    assert main(["--config", "debgu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'debgu' does not exist" in err[0] and "Did you mean 'debug'?" in err[0]


@pytest.mark.parametrize(
    "text, override, expected",
    [
        ("model: [unclosed\n", None, "is not valid YAML"),
        (
            "model: {tiny: true}\nrewards: [{name: contrast}]\ntrain: {max_stepz: 3}\n",
            None,
            "unknown key 'train.max_stepz'. Did you mean 'train.max_steps'?",
        ),
        (
            "model: {tiny: true}\nrewards: [{name: contrast}]\n",
            "train.max_steps=many",
            "train.max_steps must be an integer, got 'many'.",
        ),
        (
            "model: {tiny: true}\nrewards: [{name: contrast}]\n",
            "draft.k=9",
            "draft.k must be in [0, draft.num_steps=4], got 9.",
        ),
    ],
    ids=["bad-yaml", "unknown-key", "wrong-type", "out-of-range"],
)
def test_config_problems_are_one_line_each(tmp_path, capsys, text, override, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    ready = ["train.strategy=online", f"train.output_dir={tmp_path / 'run'}"]  # every other input is in place
    code = train_main(["--config", str(cfg), *ready, *([override] if override else [])])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]


def test_console_script_prints_no_traceback(tmp_path):
    """The installed entry point, as a user runs it: exit code 2 and no Python traceback."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {tiny: true}\not: {epsilon: 0}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pgot.cli import train_main; sys.exit(train_main())",
            "--config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error: ot.epsilon must be > 0, got 0.0." in proc.stderr


def test_import_pgot_is_light():
    """`import pgot` must not import torch model libraries (diffusers, transformers, open_clip)."""
    code = "import sys, pgot; heavy = [m for m in ('diffusers', 'transformers', 'open_clip', 'torch') if m in sys.modules]; print(','.join(heavy))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()
    assert out == ""


def test_python_m_pgot_dispatches(tmp_path):
    """`python -m pgot STAGE` is the form `accelerate launch -m pgot train ...` uses."""
    bad = subprocess.run([sys.executable, "-m", "pgot", "nonsense"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "usage: python -m pgot {precompute,train,eval,fetch,config}" in bad.stderr
    assert "error: unknown command 'nonsense'" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "pgot", "eval", "--config", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# --------------------------------------------------------------------------------------------
# A CLI that explains itself
# --------------------------------------------------------------------------------------------


def _run(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("main", MAINS, ids=lambda f: f.__name__)
def test_help_lists_every_option_without_markup(main, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--check", "--print-config", "--list-keys", "--version", "--log-level", "key=value"):
        assert option in out, option
    assert "(default: INFO)" in out
    assert "``" not in out and ":func:" not in out and ":mod:" not in out  # plain text, not reStructuredText
    stage = main.__name__.removesuffix("_main")
    assert f"pgot-{stage} --config" in out  # examples of this command
    assert "debug" in out and "pgot config copy" in out  # the shipped configs, by name


def test_version(capsys):
    import pgot

    with pytest.raises(SystemExit) as exit_:
        train_main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"pgot {pgot.__version__}"


def test_list_keys_documents_every_key_with_its_default(capsys):
    assert train_main(["--list-keys", "train"]) == 0
    out = capsys.readouterr().out
    assert "train.max_steps = 1000    [int]\n    Optimizer steps." in out
    assert "train.resume = ''    [str]" in out and "model." not in out
    assert "``" not in out  # docstrings without markup
    assert train_main(["--list-keys"]) == 0
    everything = capsys.readouterr().out
    assert (
        "rewards.<i>.path" in everything and "eval.models.<i>.lora" in everything and "agent.api_key_env" in everything
    )
    assert train_main(["--list-keys", "trian"]) == 2
    assert "error: no config key under 'trian'" in capsys.readouterr().err


def test_print_config_resolves_a_shipped_config_by_name(tmp_path, capsys, monkeypatch):
    """`--config debug` works from any folder (here an empty one): shipped configs are found by name."""
    monkeypatch.chdir(tmp_path)
    assert train_main(["--config", "debug", "--print-config", "train.max_steps=7"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(printed)
    from pgot.config import load_config

    cfg = load_config(tmp_path / "resolved.yaml")
    assert cfg.train.max_steps == 7 and cfg.model.path == "builtin:testbed"
    assert cfg == load_config("configs/debug.yaml", ["train.max_steps=7"])


def test_config_command_lists_shows_and_copies(tmp_path, capsys):
    from pgot.cli import config_main

    assert config_main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "debug " in listed and "baselines/weighted_1111" in listed and "accelerate/" not in listed
    assert config_main(["copy", "baselines/weighted_1111", str(tmp_path / "mine.yaml")]) == 0
    capsys.readouterr()
    from pgot.config import find_config

    assert (tmp_path / "mine.yaml").read_text() == find_config("baselines/weighted_1111").read_text()
    assert config_main(["copy", "debug", str(tmp_path / "mine.yaml")]) == 2  # never overwrites silently
    assert "exists already" in capsys.readouterr().err
    assert config_main(["show", "nope"]) == 2
    assert "'nope' is not a shipped config" in capsys.readouterr().err


def test_python_m_pgot_help_and_subcommands(tmp_path):
    top = _run("-m", "pgot", "--help")
    assert top.returncode == 0 and "precompute" in top.stdout and "fetch" in top.stdout and "config" in top.stdout
    fetch = _run("-m", "pgot", "fetch", "--help")
    assert fetch.returncode == 0 and "--dry-run" in fetch.stdout and "``" not in fetch.stdout
    shown = _run("-m", "pgot", "config", "show", "debug", cwd=str(tmp_path))
    assert shown.returncode == 0 and "path: builtin:testbed" in shown.stdout
    none = _run("-m", "pgot")
    assert none.returncode == 2 and "usage: python -m pgot" in none.stderr


def test_missing_config_option_is_one_line(capsys):
    assert train_main([]) == 2
    err = capsys.readouterr().err
    assert "usage: pgot-train" in err and "error: pgot-train needs --config FILE" in err


# --------------------------------------------------------------------------------------------
# Errors: one line each, every problem at once
# --------------------------------------------------------------------------------------------


def test_yaml_syntax_error_gives_file_line_and_column(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  tiny: true\ntrain:\n  max_steps: 3\n   seed: 1\n")
    assert train_main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {cfg}:5:") and "is not valid YAML" in err[0]


def test_type_and_range_errors_in_one_command(tmp_path, capsys):
    """A type error does not hide a range error (nor the other way round), and the key's meaning is given."""
    code = train_main(
        ["--config", "debug", "train.max_steps=many", "ot.epsilon=0", "train.resume=true", "rewards.2.name=sharpnes"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "error: train.max_steps must be an integer, got 'many'. train.max_steps: Optimizer steps." in err
    assert "error: ot.epsilon must be > 0, got 0.0." in err
    resume = next(line for line in err.splitlines() if line.startswith("error: train.resume"))
    assert "latest" in resume and "checkpoint folder" in resume and "empty" in resume
    assert "rewards.2.name='sharpnes' is not a known reward" in err and "Did you mean 'sharpness'?" in err
    assert "store" not in err  # a reward-name typo is a "did you mean", not a store mismatch


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("a bad value"),
        FileNotFoundError(2, "No such file or directory", "/x/y"),
        FileExistsError(17, "File exists", "/x/y"),
        PermissionError(13, "Permission denied", "/x/y"),
        NotADirectoryError(20, "Not a directory", "/x/y"),
        IsADirectoryError(21, "Is a directory", "/x/y"),
        OSError(30, "Read-only file system", "/x/y"),
    ],
    ids=lambda e: type(e).__name__ + str(getattr(e, "errno", "")),
)
def test_every_user_error_type_is_one_line(exc, capsys, monkeypatch):
    """Whatever raises it, a user's mistake (or the machine's: a read-only disk) is one line and exit code 2."""
    import pgot.train

    def fail(cfg):
        raise exc

    monkeypatch.setattr(pgot.train, "run", fail)
    monkeypatch.setattr("pgot.preflight.check_inputs", lambda *a, **k: [])
    assert train_main(["--config", "debug"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    if isinstance(exc, OSError):
        assert "'/x/y'" in err[0] and exc.strerror in err[0]


def test_a_bug_keeps_its_traceback(monkeypatch):
    import pgot.train

    def bug(cfg):
        raise KeyError("a bug in pgot")

    monkeypatch.setattr(pgot.train, "run", bug)
    monkeypatch.setattr("pgot.preflight.check_inputs", lambda *a, **k: [])
    with pytest.raises(KeyError, match="a bug in pgot"):
        train_main(["--config", "debug"])


def test_cli_and_config_are_light():
    """--help, --version, --list-keys and config errors answer without importing torch or the model libraries."""
    code = "import sys, pgot.cli, pgot.config; print(','.join(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_commands_make_openmp_threads_wait_passively_unless_told(given, expected):
    """pgot's commands set OMP_WAIT_POLICY=PASSIVE before torch loads (spin-waiting threads make CPU runs on shared
    cores 10 to 20 times slower); a user's own value is kept."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, sys, pgot.cli; assert 'torch' not in sys.modules; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, env=env)
    assert out.stdout.strip() == expected


def test_eval_under_a_launch_says_its_refusal_once_per_machine(tmp_path):
    """brk-launch defect: pgot-eval under accelerate launch is refused by every process, and every process prints
    the refusal (README: errors under a launch are shown once per machine; pgot/cli.py:_load passes no processes
    to the preflight for eval, so no copy is quiet)."""
    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "pgot", "eval", "--config", str(root / "tests" / "configs" / "tiny_eval.yaml"),
           f"eval.output_dir={tmp_path / 'eval'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    refusals = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(refusals) == 1, done.stderr[-3000:]
    assert "one process" in refusals[0]
    assert not (tmp_path / "eval").exists()


# --------------------------------------------------------------------------------------------
# Errors every process of a launch raises alike: printed once per machine
# --------------------------------------------------------------------------------------------

_RAISE = """
import os, sys
from pgot import cli
from pgot.devices import every_process
cli.QUIET_WAIT_S = float(sys.argv[1])

def work():
    print("ready", file=sys.stderr, flush=True)
    raise every_process(ValueError("the same problem on every process"))

sys.exit(cli._guard(work))
"""


def _raising_process(local_rank: str, wait_s: float) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "WORLD_SIZE": "2", "LOCAL_RANK": local_rank, "RANK": local_rank}
    proc = subprocess.Popen([sys.executable, "-c", _RAISE, str(wait_s)], env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().strip() == "ready"
    return proc


def test_an_error_of_every_process_is_printed_by_the_first_process_of_the_machine():
    """Rule: the machine's first process (LOCAL_RANK 0) prints it and exits 2; another one prints nothing and waits
    to be ended by the launcher (SIGTERM ends it silently): leaving first, it would make the launcher end the
    printing one before it printed."""
    first = _raising_process("0", 60)
    assert first.wait(timeout=60) == 2
    assert first.stderr.read() == "error: the same problem on every process\n"
    other = _raising_process("1", 60)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            other.wait(timeout=1.0)  # still waiting for the launcher
    finally:
        other.terminate()  # what the launcher sends once the first process exited
    assert other.wait(timeout=60) == -15 and other.stderr.read() == ""


def test_an_error_of_every_process_is_printed_anyway_when_nobody_ends_the_process():
    """Past QUIET_WAIT_S (the first process is stuck or gone), the waiting process prints the error itself."""
    other = _raising_process("1", 0.2)
    assert other.wait(timeout=60) == 2
    assert other.stderr.read() == "error: the same problem on every process\n"


def test_an_error_of_one_process_is_printed_by_it(monkeypatch, capsys):
    """An error not marked as every process's is printed where it happens, whatever the rank."""
    from pgot import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")

    def work():
        raise ValueError("only here")

    assert cli._guard(work) == 2
    assert capsys.readouterr().err == "error: only here\n"
