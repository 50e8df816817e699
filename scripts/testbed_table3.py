"""The paper's Table 3 and Figure 4 with one command: in the reward-hacking testbed (CPU) or with the paper's configs.

    python scripts/testbed_table3.py --setting testbed                  # the whole testbed table, 2 jobs at a time
    python scripts/testbed_table3.py --setting testbed --dry-run        # every command it would run, nothing run
    python scripts/testbed_table3.py --quick --out /tmp/table3_quick    # smoke run: PG-OT auto, one seed, 2 steps
    python scripts/testbed_table3.py --setting testbed --table-only     # rebuild table and figures from the folders
    python scripts/testbed_table3.py --setting paper --dry-run \\
        --launcher "accelerate launch --config_file configs/accelerate/8gpu.yaml"

**What it runs** (every method under identical settings, ``--seeds`` training seeds each, default 0 1 2):

1. ``pgot precompute``: the base model's Pareto fronts on the training prompts (one store shared by every method).
2. ``pgot train`` for each method and seed, into ``<out>/runs/<method>/seed<s>``: single reward for each of the four
   rewards; weighted sums at several ratios (global targets, paper eq. 1); weighted-sum bounds
   (``hetero_weighted_sum``); separate constraints; PG-OT offline, online, and auto (offline until the agent removes
   a weak reward or switches to online). In the testbed the agent is the real ``openai`` backend talking to
   :mod:`pgot.testbed.agent_server`, which this script starts on a free local port.
3. ``pgot eval`` once per training seed, into ``<out>/eval/seed<s>``: the base model, that seed's trained models and
   the reward soup of its four single-reward LoRAs (weights 1/4 each), all on the same held-out prompts and the same
   sample seeds (``eval.seed``), so every model's images pair with the base model's.
4. The table (``<out>/table3.md`` and the long ``<out>/table3.csv``) and the figures (``<out>/figures/``).

**The table.** One row per method. Every number is the value pooled over the training seeds (all of a method's
pairs with the base model, the three seeds' together: the mean over seeds, which have equal pair counts), a 95%
percentile bootstrap interval over prompts (a prompt drawn keeps its pairs of every seed), and the spread over
seeds (min-max of the per-seed values). Columns: the paper's (win rate of each reward, JDR and JCR per reward set:
JDR2 / JCR2 on the strong rewards, JDR4 / JCR4 on all four, :mod:`pgot.metrics`) and, in the testbed, the ground
truth of :func:`pgot.metrics.ground_truth_table` (``eval.ground_truth=testbed``, the judge
:func:`pgot.testbed.judge.quality`): change in mean true quality against the base model, the share of pairs whose
quality improved, and the hacked rate of each reward set (pairs that dominate the base model on every reward of the
set while their true quality fell: the part of the JDR that the ground truth shows to be fake).

**The figures.** ``fig4_ground_truth.png``: true quality and JDR4 of the probe images against the training step
(:func:`pgot.plots.ground_truth_curves`; JDR from the probe lines of each run's ``metrics.jsonl``, quality from the
probe images each run saves in ``probes/step-XXXXXX.png``, judged by :func:`pgot.probes.ground_truth_line`, and at
step 0 from the base model's probe images). ``quality_vs_jdr4.png`` and ``quality_vs_jdr2.png``: change in true
quality against JDR on the held-out prompts, one point per method and seed (:func:`pgot.plots.quality_vs_jdr`). The
paper setting has no ground truth: ``fig4_jdr.png`` draws the probe JDR / JCR, averaged over seeds per method.

**Settings.** ``--setting testbed``: ``configs/testbed_table3/{precompute,train,eval}.yaml`` plus each method's keys
(:func:`testbed_methods`); the prompts are :func:`pgot.testbed.scenes.split` (80 training, 28 held-out), written to
``<out>/prompts/``. ``--setting paper``: the paper's configs (``configs/precompute_sd35_turbo.yaml``,
``configs/baselines/*.yaml``, ``configs/sd35_turbo_pgot.yaml``, ``configs/eval_parti.yaml``), their store moved
under ``<out>``. Every command is an ordinary ``pgot`` command (``--dry-run`` prints them); ``--launcher`` starts
precompute and training (``python`` by default in the testbed, ``accelerate launch --config_file
configs/accelerate/8gpu.yaml`` in the paper setting); ``pgot eval`` always runs as one process.

**Execution.** ``--jobs`` commands at a time (testbed default 2: two trainings at once, one torch thread each; the
paper default 1: each training takes every GPU). With the ``python`` launcher the commands run in ``--jobs`` worker
processes that call :func:`pgot.cli.main` with the printed arguments (the same as ``python -m pgot ...`` without
an interpreter start-up per command); any other launcher runs each command as a subprocess. Each command's output
goes to ``<out>/logs/<job>.log``, appended after a header line per attempt (a rerun keeps the earlier attempts'
output, e.g. a training's agent decisions); ``<out>/timings.json`` is a list with one record per attempt (every
command's wall and CPU seconds and the load of the machine), the latest last (:func:`read_timings`). A failed command is reported and the commands that need it are skipped; the exit code is then 1.
Run the same command again to continue: trainings resume (``train.resume=latest``), finished ones are skipped,
evaluations only score the models not yet in ``scores.parquet``.

**Budget** (testbed; ``README.md``, "Table 3 in the testbed", has the measured times): 12 methods x 3 seeds = 36
trainings of 40 steps of 2 prompts x 4 samples (8 Euler steps with guidance 3: 16 transformer calls per sample,
DRaFT-1: one of them with gradients), 16 front samples for each of the 80 training prompts, 3 evaluations of 14
models x 28 held-out prompts x 4 samples: under 20 minutes of wall time on 2 idle cores.

Settings fixed before the comparison was run: the world (model, sampler, the four rewards and their strengths,
the prompt split), the budgets above, the learning rate and every method's keys below. See the README for the
pilot runs that chose the learning rate and for every change made after seeing results.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pgot import metrics, plots, tables  # noqa: E402

log = logging.getLogger("testbed_table3")

SEEDS = (0, 1, 2)
"""Training seeds (``train.seed``): LoRA init, prompt order and training noise."""

TESTBED_CONFIGS = ROOT / "configs" / "testbed_table3"
BASELINE = "base"
"""Name of the base model in the testbed evaluations (the baseline of every comparison)."""
PAPER_BASELINE = "SD3.5-Turbo"
"""Name of the base model in the paper setting (``configs/eval_parti.yaml``)."""
REWARD_SETS_NOTE = "JDR2 / JCR2: the strong rewards; JDR4 / JCR4: all four"


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One row of Table 3: a training config and the keys that make it this method.

    Attributes:
        key: folder name (``<out>/runs/<key>/seed<s>``).
        label: the row label in the table, the figures and ``eval.models``.
        config: the ``pgot train`` config file.
        overrides: the method's ``key=value`` overrides on top of ``config``.
        store: needs the frontier store (PG-OT offline and auto, per-prompt bounds, store maxima as targets, the
            store's statistics for the OT cost).
        agent: talks to the agent endpoint (PG-OT auto).
        single: a single-reward run, one of the reward soup's ingredients.
    """

    key: str
    label: str
    config: str
    overrides: tuple[str, ...] = ()
    store: bool = True
    agent: bool = False
    single: bool = False


TESTBED_REWARDS = ("tb_align", "tb_pref", "saturation", "contrast")
"""The reward columns of the testbed configs: strong tb_align and tb_pref, weak saturation and contrast."""
WEIGHT_RATIOS = ((1, 1, 1, 1), (2, 2, 3, 3), (4, 4, 1, 1))
"""Weighted-sum ratios in the order of :data:`TESTBED_REWARDS` (the paper's 1:1:1:1, 2:2:3:3 and 4:4:1:1)."""


def _path(path: Path | str) -> str:
    """``path`` relative to the working directory when it lies under it (shorter commands), else absolute."""
    rel = os.path.relpath(Path(path).resolve())
    return str(Path(path).resolve()) if rel.startswith("..") else rel


def _weights(ratio: Sequence[int]) -> tuple[str, ...]:
    return tuple(f"rewards.{i}.weight={w}" for i, w in enumerate(ratio))


def testbed_methods() -> list[Method]:
    """Every trained method of the testbed table, as keys on ``configs/testbed_table3/train.yaml``."""
    cfg = _path(TESTBED_CONFIGS / "train.yaml")
    single = [
        Method(
            f"single_{r}", f"Single {r}", cfg,
            ("train.objective=single_reward", f"train.active_rewards=[{r}]"), store=False, single=True,
        )
        for r in TESTBED_REWARDS
    ]  # fmt: skip
    weighted = [
        Method(
            "weighted_" + "".join(map(str, ratio)), "Weighted " + ":".join(map(str, ratio)), cfg,
            ("train.objective=weighted_sum", *_weights(ratio)),
        )
        for ratio in WEIGHT_RATIOS
    ]  # fmt: skip
    return [
        *single,
        *weighted,
        Method("hetero_weighted_sum", "Weighted-sum bounds", cfg, ("train.objective=hetero_weighted_sum",)),
        Method("separate_constraints", "Separate constraints", cfg, ("train.objective=separate_constraints",)),
        Method("pgot_offline", "PG-OT offline", cfg, ("train.objective=pgot", "train.strategy=offline")),
        Method("pgot_online", "PG-OT online", cfg, ("train.objective=pgot", "train.strategy=online")),
        Method(
            "pgot_auto", "PG-OT auto (agent)", cfg,
            ("train.objective=pgot", "train.strategy=auto", "agent.backend=openai"), agent=True,
        ),
    ]  # fmt: skip


def paper_methods() -> list[Method]:
    """Every trained method of the paper's Table 3, as the shipped configs (``configs/baselines``, the PG-OT run)."""
    base = ROOT / "configs" / "baselines"
    pgot = _path(ROOT / "configs" / "sd35_turbo_pgot.yaml")
    single = [
        Method(f"single_{r}", f"Single {r.upper()}", _path(base / f"single_{r}.yaml"), store=False, single=True)
        for r in ("ict", "hp", "clip", "hps")
    ]
    weighted = [
        Method(f"weighted_{w}", "Weighted " + ":".join(w), _path(base / f"weighted_{w}.yaml"))
        for w in ("1111", "2233", "2323", "4411")
    ]
    return [
        *single,
        *weighted,
        Method("hetero_weighted_sum", "Weighted-sum bounds", _path(base / "hetero_weighted_sum.yaml")),
        Method("separate_constraints", "Separate constraints", _path(base / "separate_constraints.yaml")),
        Method("pgot_offline", "PG-OT offline", pgot, ("train.strategy=offline", "agent.backend=none")),
        Method("pgot_online", "PG-OT online", pgot, ("train.strategy=online", "agent.backend=none")),
        Method("pgot_auto", "PG-OT auto (agent)", pgot, agent=True),
    ]


AGENT_URL = "{agent_url}"
"""Placeholder of the agent server's address in the commands, filled in once the server runs."""
AGENT_URL_KEY = f"agent.base_url={AGENT_URL}"

SOUP_LABEL = "Reward soup"
"""The row of the reward soup: the seed's single-reward LoRAs merged at inference with equal weights."""


# --------------------------------------------------------------------------------------------
# The plan: every command, in order, with what it waits for
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One ``pgot`` command.

    Attributes:
        name: unique name, also the log file's (``<out>/logs/<name>.log``).
        stage: ``precompute``, ``train`` or ``eval``.
        args: the arguments after ``-m pgot <stage>``.
        launcher: what starts ``-m pgot`` (``["python"]``, ``["accelerate", "launch", ...]``).
        after: names of the jobs that must succeed first.
    """

    name: str
    stage: str
    args: list[str]
    launcher: list[str]
    after: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        """The command line, as a list."""
        return [*self.launcher, "-m", "pgot", self.stage, *self.args]


@dataclass
class Plan:
    """Everything one invocation runs: the jobs in scheduling order and what the table reads."""

    setting: str
    out: Path
    methods: list[Method]
    seeds: list[int]
    jobs: list[Job]
    soup: bool
    baseline: str
    reward_names: list[str]
    reward_sets: dict[str, list[str]]
    ground_truth: bool
    bootstrap: int
    confidence: float


def _yaml_flow(value: object) -> str:
    """A list or mapping typed on the command line (JSON is YAML flow style)."""
    return json.dumps(value)


def _run_dir(out: Path, method: Method, seed: int) -> Path:
    return out / "runs" / method.key / f"seed{seed}"


def _eval_models(out: Path, methods: Sequence[Method], seed: int, soup: bool, baseline: str) -> list[dict]:
    models: list[dict] = [{"name": baseline}]
    models += [{"name": m.label, "lora": _path(_run_dir(out, m, seed))} for m in methods]
    singles = [m for m in methods if m.single]
    if soup and singles:
        weight = round(1.0 / len(singles), 6)
        models.append({"name": SOUP_LABEL, "soup": {_path(_run_dir(out, m, seed)): weight for m in singles}})
    return models


@dataclass(frozen=True)
class Quick:
    """What ``--quick`` shrinks (a smoke run of the pipeline, not a result)."""

    train_prompts: int = 4
    heldout_prompts: int = 4
    precompute: tuple[str, ...] = ("precompute.samples_per_prompt=4", "precompute.batch_size=16")
    train: tuple[str, ...] = (
        "train.max_steps=2",
        "train.probe_every=1",
        "train.probe_prompts=2",
        "train.probe_samples=1",
        "train.checkpoint_every=0",
        "precompute.samples_per_prompt=4",
        "precompute.batch_size=16",
        "agent.every=1",
        "agent.diagnostic_prompts=2",
    )
    eval: tuple[str, ...] = ("eval.samples_per_prompt=1", "eval.bootstrap=50", "eval.batch_size=4")


def build_plan(args: argparse.Namespace) -> Plan:
    """The jobs of ``args`` (setting, methods, seeds, launcher, quick) in scheduling order.

    Order: the precompute, then the single-reward trainings of every seed (they need no store, so they fill the other
    worker while the fronts are computed), then seed by seed the other trainings (the agent's first: the longest) and
    that seed's evaluation, which waits for them.
    """
    out = Path(args.out).resolve()
    paper = args.setting == "paper"
    methods = paper_methods() if paper else testbed_methods()
    if args.quick and not args.methods:  # the method with the most parts: store, OT, agent server, openai backend
        methods = [m for m in methods if m.key == "pgot_auto"]
    for option, values in (("--seeds", args.seeds), ("--methods", args.methods)):
        repeated = sorted({str(v) for v in values or () if list(values).count(v) > 1})
        if repeated:
            raise ValueError(
                f"{option} repeats {', '.join(repeated)}: each would be scheduled twice (the same run folder and "
                f"log). Give each once."
            )
    if args.methods:
        known = {m.key for m in methods}
        unknown = [k for k in args.methods if k not in known]
        if unknown:
            raise ValueError(
                f"--methods names {', '.join(unknown)}, which the {args.setting} setting does not have; "
                f"its methods: {', '.join(sorted(known))}."
            )
        methods = [m for m in methods if m.key in args.methods]
    seeds = [0] if args.quick and args.seeds is None else list(args.seeds if args.seeds is not None else SEEDS)
    launcher = shlex.split(args.launcher) if args.launcher else (
        shlex.split("accelerate launch --config_file configs/accelerate/8gpu.yaml") if paper else ["python"]
    )  # fmt: skip
    store = out / "frontier"
    quick = Quick() if args.quick else None
    jobs: list[Job] = []
    if paper:
        pre_cfg, eval_cfg, baseline = (
            _path(ROOT / "configs" / "precompute_sd35_turbo.yaml"),
            _path(ROOT / "configs" / "eval_parti.yaml"),
            PAPER_BASELINE,
        )
        train_prompts, eval_prompts = [], []
        rewards = ["ict", "hp", "clip", "hps"]
        sets = {"JDR2": ["ict", "hp"], "JDR4": ["ict", "hp", "clip", "hps"]}
    else:
        pre_cfg, eval_cfg, baseline = (
            _path(TESTBED_CONFIGS / "precompute.yaml"),
            _path(TESTBED_CONFIGS / "eval.yaml"),
            BASELINE,
        )
        train_prompts = [f"prompts.path={_path(out / 'prompts' / 'train.txt')}"]
        eval_prompts = [f"prompts.path={_path(out / 'prompts' / 'heldout.txt')}"]
        rewards = list(TESTBED_REWARDS)
        sets = {"JDR2": ["tb_align", "tb_pref"], "JDR4": list(TESTBED_REWARDS)}
    needs_store = any(m.store for m in methods)
    if needs_store:
        jobs.append(
            Job(
                "precompute", "precompute",
                ["--config", pre_cfg, *train_prompts, f"precompute.store={_path(store)}", *(quick.precompute if quick else ())],
                launcher,
            )
        )  # fmt: skip

    def train_job(m: Method, seed: int) -> Job:
        agent = []
        if m.agent and not paper:  # one agent.model per run: the server keeps each run's last images apart
            agent = [AGENT_URL_KEY, f"agent.model=pgot-testbed-agent/{m.key}/seed{seed}"]
        args_ = [
            "--config", m.config, *m.overrides, *train_prompts, f"train.seed={seed}",
            f"train.output_dir={_path(_run_dir(out, m, seed))}", f"precompute.store={_path(store)}",
            f"train.store={_path(store) if m.store else ''}", *agent, *(quick.train if quick else ()),
        ]  # fmt: skip
        return Job(f"train-{m.key}-seed{seed}", "train", args_, launcher, ["precompute"] if m.store else [])

    singles = [m for m in methods if m.single]
    others = sorted((m for m in methods if not m.single), key=lambda m: not m.agent)  # the agent's runs first
    soup = len(singles) >= 2 and not args.quick
    jobs += [train_job(m, s) for s in seeds for m in singles]
    for s in seeds:
        jobs += [train_job(m, s) for m in others]
        models = _eval_models(out, methods, s, soup, baseline)
        runs = [f"{m.label}={_path(_run_dir(out, m, s))}" for m in methods]
        eval_args = [
            "--config", eval_cfg, *eval_prompts, f"eval.output_dir={_path(out / 'eval' / f'seed{s}')}",
            f"eval.models={_yaml_flow(models)}", f"eval.baseline={baseline}", f"eval.runs={_yaml_flow(runs)}",
            *(quick.eval if quick else ()),
        ]  # fmt: skip
        after = [f"train-{m.key}-seed{s}" for m in methods]
        jobs.append(Job(f"eval-seed{s}", "eval", eval_args, ["python"], after))
    return Plan(
        setting=args.setting, out=out, methods=methods, seeds=seeds, jobs=jobs, soup=soup, baseline=baseline,
        reward_names=rewards, reward_sets=sets, ground_truth=not paper, bootstrap=50 if quick else 1000,
        confidence=0.95,
    )  # fmt: skip


def _fill(arg: str, agent_url: str | None) -> str:
    return arg.replace(AGENT_URL, "<agent-url>" if agent_url is None else agent_url)


def format_command(job: Job, agent_url: str | None = None) -> str:
    """The job's command line as a shell would take it (the agent port filled in when known)."""
    return shlex.join([_fill(a, agent_url) for a in job.command()])


# --------------------------------------------------------------------------------------------
# Running the plan
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    """How one job went."""

    name: str
    rc: int | None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    status: str = ""


def log_header(job: Job, command: str) -> str:
    """The line that opens each attempt of ``job`` in its log (logs are appended to, never overwritten)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"===== {job.name}: attempt started {stamp} =====\n$ {command}\n"


def _open_log(log_path: str, header: str, buffering: int = -1):
    """``log_path`` opened for appending, with ``header`` written (after a blank line when the log has text)."""
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a", buffering=buffering)  # noqa: SIM115 - the caller closes it
    fh.write(("\n" if fh.tell() > 0 else "") + header)
    fh.flush()
    return fh


def _in_process(stage: str, args: list[str], log_path: str, header: str = "") -> tuple[int, float, float]:
    """Run ``python -m pgot <stage> <args>`` in this process, output appended to ``log_path`` after ``header``:
    ``(exit code, wall s, CPU s)``."""
    from pgot import cli

    t0, c0 = time.perf_counter(), time.process_time()
    with _open_log(log_path, header, buffering=1) as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        root = logging.getLogger()
        saved = root.handlers[:]
        root.handlers.clear()  # the CLI's logging.basicConfig then writes to this job's log
        try:
            rc = cli.main([stage, *args])
        except SystemExit as exc:  # argparse errors
            rc = exc.code if isinstance(exc.code, int) else 2
        except BaseException as exc:  # a bug in pgot: keep its traceback in the log, fail this job only
            import traceback

            traceback.print_exc()
            rc = 130 if isinstance(exc, KeyboardInterrupt) else 1
        finally:
            for h in root.handlers:
                h.flush()
            root.handlers[:] = saved
    return int(rc), time.perf_counter() - t0, time.process_time() - c0


def _subprocess(command: list[str], log_path: str, env: dict[str, str], header: str = "") -> tuple[int, float, float]:
    """Run ``command`` with output appended to ``log_path`` after ``header``: ``(exit code, wall s, CPU s of the
    process tree it waited for)``."""
    t0 = time.perf_counter()
    with _open_log(log_path, header) as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_utime + usage.ru_stime


def _worker_init(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def run_plan(
    plan: Plan, jobs: int, threads: int | None, agent_url: str | None, on_done: Callable[[Result], None]
) -> dict[str, Result]:
    """Run the jobs, ``jobs`` at a time, each once every job it waits for has succeeded; a job whose prerequisite
    failed is skipped. Returns every job's :class:`Result` (also passed to ``on_done`` as each finishes).

    With the ``python`` launcher, jobs run in a pool of ``jobs`` worker processes (:func:`_in_process`); otherwise
    each is a subprocess. A worker that dies (killed, out of memory) fails its job and the pool is replaced.
    """
    in_process = bool(plan.jobs) and all(j.launcher == ["python"] for j in plan.jobs)
    if threads:  # spawned workers and subprocesses inherit it; torch reads it at import
        os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env = dict(os.environ)
    names = {j.name for j in plan.jobs}
    results: dict[str, Result] = {}
    pending = list(plan.jobs)
    running: dict[cf.Future, Job] = {}

    def new_pool() -> cf.Executor:
        if in_process:
            spawn = multiprocessing.get_context("spawn")
            return cf.ProcessPoolExecutor(jobs, mp_context=spawn, initializer=_worker_init, initargs=(threads,))
        return cf.ThreadPoolExecutor(jobs)

    def submit(job: Job) -> cf.Future:
        log_path = str(plan.out / "logs" / f"{job.name}.log")
        header = log_header(job, format_command(job, agent_url))
        if in_process:
            args = [_fill(a, agent_url) for a in job.args]
            return pool.submit(_in_process, job.stage, args, log_path, header)
        command = [sys.executable if a == "python" else _fill(a, agent_url) for a in job.command()]
        return pool.submit(_subprocess, command, log_path, env, header)

    def finish(job: Job, result: Result) -> None:
        results[job.name] = result
        on_done(result)

    pool = new_pool()
    try:
        while pending or running:
            for job in list(pending):
                failed = [a for a in job.after if a in results and results[a].rc != 0]
                if failed:
                    pending.remove(job)
                    finish(job, Result(job.name, None, status=f"skipped: {', '.join(failed)} did not succeed"))
                elif len(running) < jobs and all(a in results or a not in names for a in job.after):
                    pending.remove(job)
                    log.info("start %s", job.name)
                    running[submit(job)] = job
            if not running:
                assert not pending, f"jobs wait for jobs that never run: {[j.name for j in pending]}"
                break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                try:
                    rc, wall, cpu = fut.result()
                    finish(job, Result(job.name, rc, wall, cpu, "ok" if rc == 0 else f"exit code {rc}"))
                except cf.process.BrokenProcessPool as exc:  # a worker died: its job and the others in flight fail
                    finish(job, Result(job.name, 1, status=f"worker failed: {exc}"))
                    for other in running.values():
                        finish(other, Result(other.name, 1, status=f"worker failed: {exc}"))
                    running.clear()
                    pool.shutdown(cancel_futures=True)
                    pool = new_pool()
                    break
    except KeyboardInterrupt:  # trainings checkpoint on SIGINT (it reaches the workers too): wait for them
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return results


# --------------------------------------------------------------------------------------------
# The agent endpoint (testbed)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def agent_endpoint(needed: bool):
    """The testbed's agent server (:func:`pgot.testbed.agent_server.start_server`, its default thresholds) on a free
    local port while the block runs; yields its ``agent.base_url`` (None when not ``needed``)."""
    if not needed:
        yield None
        return
    from pgot.testbed.agent_server import start_server

    with start_server() as server:
        yield server.base_url


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def _scores(plan: Plan, seed: int) -> pd.DataFrame:
    from pgot.evaluate import read_scores

    path = plan.out / "eval" / f"seed{seed}" / "scores.parquet"
    df = read_scores(path)
    return df if len(df) else pd.DataFrame(columns=["model", "prompt_id", "seed", "sample_index"])


def _aligned(rows: pd.DataFrame, keys: pd.DataFrame, columns: Sequence[str], what: str) -> torch.Tensor:
    """``rows``' values of ``columns`` on each row of ``keys`` (prompt_id, seed, sample_index), in that order.

    Raises:
        ValueError: a key without a row (``what`` says whose), or a key with several.
    """
    merged = keys.merge(rows, on=list(keys.columns), how="left", validate="one_to_one", indicator=True)
    missing = int((merged["_merge"] != "both").sum())
    if missing:
        raise ValueError(f"{what}: {missing} of the {len(keys)} evaluation pairs have no row; rerun its evaluation.")
    return torch.tensor(merged[list(columns)].to_numpy(dtype="float64"))


@dataclass
class Pooled:
    """Everything the table needs for one method: pooled tables, per-seed tables, seeds used."""

    rates: pd.Series
    truth: pd.Series | None
    per_seed: pd.DataFrame  # one row per seed: every column of rates and truth
    seeds: list[int]


def pooled_comparison(
    base: pd.DataFrame,
    runs: dict[int, pd.DataFrame],
    names: Sequence[str],
    sets: dict[str, list[str]],
    *,
    ground_truth: bool,
    bootstrap: int,
    confidence: float,
) -> Pooled:
    """One method against the base model, pooled over training seeds and per seed.

    Args:
        base: the base model's rows (columns prompt_id, seed, sample_index, the rewards, ``quality`` with ground
            truth), one per evaluation pair.
        runs: training seed -> the method's rows of that seed's evaluation, on the same keys as ``base``.
        names: reward columns.
        sets: reward sets for JDR / JCR / hacked rates.
        ground_truth: compute :func:`pgot.metrics.ground_truth_table` too.
        bootstrap, confidence: the bootstrap over prompts.

    Returns:
        :class:`Pooled`: the rows of :func:`pgot.metrics.comparison_table` and :func:`~pgot.metrics.ground_truth_table`
        for the concatenation of every seed's pairs (a prompt's pairs of every seed resampled together), and the
        same numbers per seed (no intervals).
    """
    seeds = sorted(runs)
    key = ["prompt_id", "seed", "sample_index"]
    keys = base[key].sort_values(key).reset_index(drop=True)
    cols = [*names, metrics.QUALITY] if ground_truth else list(names)
    b = _aligned(base, keys, cols, "the base model")
    runs_ = [_aligned(runs[s], keys, cols, f"training seed {s}") for s in seeds]
    m = len(names)
    cands = [r[:, :m] for r in runs_]
    bq, quals = (b[:, m], [r[:, m] for r in runs_]) if ground_truth else (None, [])
    b = b[:, :m]
    groups = torch.tensor(keys["prompt_id"].to_numpy(dtype="int64"))
    k = len(seeds)
    boot = {"num_resamples": bootstrap, "confidence": confidence, "seed": 0}
    scores = {"base": b.repeat(k, 1), "method": torch.cat(cands)}
    rates = metrics.comparison_table(scores, groups.repeat(k), "base", names, sets, **boot).loc["method"]
    truth = None
    if ground_truth:
        quality = {"base": bq.repeat(k), "method": torch.cat(quals)}
        truth = metrics.ground_truth_table(scores, quality, groups.repeat(k), "base", names, sets, **boot).loc["method"]
    per_seed = []
    for i, s in enumerate(seeds):
        one = {"base": b, "method": cands[i]}
        row = metrics.comparison_table(one, groups, "base", names, sets, num_resamples=0).loc["method"].to_dict()
        if ground_truth:
            q = {"base": bq, "method": quals[i]}
            row.update(metrics.ground_truth_table(one, q, groups, "base", names, sets, num_resamples=0).loc["method"])
        per_seed.append({"seed": s, **row})
    return Pooled(rates, truth, pd.DataFrame(per_seed), seeds)


def _rate_header(column: str) -> str:
    return column.removeprefix("win_") + " win" if column.startswith("win_") else column


GT_LABELS = {"quality_change": "Δ quality", "quality_improved": "quality improved"}


def _gt_header(column: str) -> str:
    return GT_LABELS.get(column, column.replace("hacked", "hacked "))


def _cell(value: float, low: float, high: float, seeds: pd.Series, percent: bool) -> str:
    """``value [low, high] (min..max over seeds)``; rates in percent, quality changes in judge units."""
    finite = seeds.dropna()
    if percent:
        main = tables.format_percent(value, low, high) if not math.isnan(low) else tables.format_percent(value)
        spread = f"{100 * finite.min():.1f}..{100 * finite.max():.1f}" if len(finite) > 1 else ""
    else:
        main = f"{value:+.4f} [{low:+.4f}, {high:+.4f}]" if not math.isnan(low) else f"{value:+.4f}"
        spread = f"{finite.min():+.4f}..{finite.max():+.4f}" if len(finite) > 1 else ""
    return f"{main} ({spread})" if spread else main


def write_table(plan: Plan) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read every evaluation, write ``table3.md`` and ``table3.csv``; returns ``(long table, per-seed points)``.

    Raises:
        ValueError: no evaluation to read (the message says which folder).
    """
    names, sets = plan.reward_names, plan.reward_sets
    scores = {s: _scores(plan, s) for s in plan.seeds}
    have = {s: df for s, df in scores.items() if len(df) and (df["model"] == plan.baseline).any()}
    if not have:
        raise ValueError(f"no evaluation with the base model under {plan.out / 'eval'}; run the evaluations first.")
    first = min(have)
    base = have[first][have[first]["model"] == plan.baseline]
    notes = _base_agreement(plan, have, base)
    labels = [m.label for m in plan.methods] + ([SOUP_LABEL] if plan.soup else [])
    rate_cols = metrics.rate_columns(names, sets)
    gt_cols = ["quality_change", *metrics.ground_truth_columns(sets)] if plan.ground_truth else []
    gt_cols = [c for c in gt_cols if c != "quality_fell"]
    long, points, rows_md, gt_md, missing = [], [], [], [], []
    for label in labels:
        runs = {s: df[df["model"] == label] for s, df in have.items() if (df["model"] == label).any()}
        if not runs:
            missing.append(label)
            continue
        pooled = pooled_comparison(
            base, runs, names, sets, ground_truth=plan.ground_truth, bootstrap=plan.bootstrap,
            confidence=plan.confidence,
        )  # fmt: skip
        n_seeds = len(pooled.seeds)
        row = [f"{label}", str(n_seeds)]
        for c in rate_cols:
            r = pooled.rates
            row.append(_cell(r[c], r[f"{c}_low"], r[f"{c}_high"], pooled.per_seed[c], percent=True))
            long.append(_long(label, c, r[c], r[f"{c}_low"], r[f"{c}_high"], pooled, int(r["pairs"])))
        rows_md.append(row)
        if plan.ground_truth:
            t = pooled.truth
            row = [f"{label}", str(n_seeds), f"{_mean_quality(runs):.4f}"]
            for c in gt_cols:
                row.append(
                    _cell(t[c], t[f"{c}_low"], t[f"{c}_high"], pooled.per_seed[c], percent=c != "quality_change")
                )
                long.append(_long(label, c, t[c], t[f"{c}_low"], t[f"{c}_high"], pooled, int(t["pairs"])))
            gt_md.append(row)
        for _, seed_row in pooled.per_seed.iterrows():
            points.append({"method": label, **seed_row.to_dict()})
    table = pd.DataFrame(long)
    per_seed = pd.DataFrame(points)
    from pgot.files import atomic_write

    atomic_write(plan.out / "table3.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(
        plan.out / "table3.md",
        lambda tmp: tmp.write_text(_markdown(plan, rate_cols, gt_cols, rows_md, gt_md, base, have, notes, missing)),
    )
    return table, per_seed


def _long(label: str, metric: str, value: float, low: float, high: float, pooled: Pooled, pairs: int) -> dict:
    seeds = pooled.per_seed[metric]
    return {
        "method": label, "metric": metric, "value": float(value), "low": float(low), "high": float(high),
        "seed_min": float(seeds.min()), "seed_max": float(seeds.max()),
        "seed_std": float(seeds.std(ddof=1)) if len(seeds) > 1 else math.nan,
        "seeds": len(pooled.seeds), "pairs": pairs,
    }  # fmt: skip


def _mean_quality(runs: dict[int, pd.DataFrame]) -> float:
    return float(pd.concat(runs.values())[metrics.QUALITY].mean())


def _base_agreement(plan: Plan, have: dict[int, pd.DataFrame], base: pd.DataFrame) -> list[str]:
    """The base model is generated by every seed's evaluation with the same noise: say how far they agree."""
    key = ["prompt_id", "seed", "sample_index"]
    cols = plan.reward_names + ([metrics.QUALITY] if plan.ground_truth else [])
    worst = 0.0
    for df in have.values():
        other = df[df["model"] == plan.baseline]
        merged = base[key + cols].merge(other[key + cols], on=key, suffixes=("", "_o"))
        if len(merged) != len(base):
            return [f"the base model's evaluations cover different pairs ({len(merged)} of {len(base)} shared)."]
        for c in cols:
            worst = max(worst, float((merged[c] - merged[f"{c}_o"]).abs().max()))
    return [f"The base model, generated again in each of the {len(have)} evaluations, agrees to {worst:.3g} (max abs)."]


def _count(n: int, noun: str) -> str:
    """``"1 sample"``, ``"4 samples"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _markdown(plan, rate_cols, gt_cols, rows_md, gt_md, base, have, notes, missing) -> str:
    n_prompts = base["prompt_id"].nunique()
    per_prompt = len(base) // max(n_prompts, 1)
    seeds = ", ".join(map(str, sorted(have)))
    lines = [
        f"# Table 3 ({plan.setting} setting)",
        "",
        f"Every method against **{plan.baseline}** on {_count(n_prompts, 'held-out prompt')} x "
        f"{_count(per_prompt, 'sample')} (the same prompts and sample seeds for every model), trained with "
        f"{'seed' if len(have) == 1 else 'seeds'} {seeds}. A cell reads: value pooled over the "
        f"training seeds [{100 * plan.confidence:g}% bootstrap interval over prompts, {plan.bootstrap} resamples] "
        "(min..max of the per-seed values). Rates in percent.",
        "",
        "## The paper's columns",
        "",
        tables._md_table(["Method", "seeds", *[_rate_header(c) + " (%)" for c in rate_cols]], rows_md),
        "",
        "Win: strictly higher reward than the base model on the same prompt and noise. JDR: strictly higher on every "
        f"reward of the set; JCR: strictly lower on every reward of the set ({REWARD_SETS_NOTE}: "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in plan.reward_sets.items())
        + ").",
    ]
    if plan.ground_truth:
        lines += [
            "",
            "## Ground truth (the testbed judge)",
            "",
            tables._md_table(
                [
                    "Method",
                    "seeds",
                    "mean quality",
                    *[_gt_header(c) + ("" if c == "quality_change" else " (%)") for c in gt_cols],
                ],
                gt_md,
            ),
            "",
            f"Mean quality: the judge's mean over the method's images (base model: {base[metrics.QUALITY].mean():.4f}). "
            "Δ quality: mean over pairs of the judge's quality of the method's image minus the base model's (judge "
            "units, quality in [0, 1]). Quality improved: share of pairs whose quality rose by more than "
            f"{metrics.QUALITY_TOL:g}. Hacked (set): share of pairs that dominate the base model on every reward of the "
            "set while their quality fell by more than the same tolerance (pgot.metrics, 'Ground truth'): the part of "
            "JDR that the ground truth shows to be fake.",
        ]
    lines += ["", *notes]
    if missing:
        lines.append(f"Not evaluated (no rows in any evaluation): {', '.join(missing)}.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Figure 4 with ground truth: the probes of every run
# --------------------------------------------------------------------------------------------


def read_grid(path: Path) -> torch.Tensor:
    """The tiles of a probe grid PNG (``pgot.images.labelled_grid``, boxes in its ``tiles`` text chunk), in image order:
    (B, 3, h, w) in [0, 1], 8-bit (the PNG's values).

    Raises:
        ValueError: a PNG without the ``tiles`` chunk.
    """
    from PIL import Image

    from pgot.images import load_image

    with Image.open(path) as im:
        boxes = im.info.get("tiles")
    if not boxes:
        raise ValueError(f"{path} has no 'tiles' text chunk: not a probe grid written by pgot-train.")
    grid = load_image(path)
    return torch.stack([grid[:, y : y + h, x : x + w] for x, y, w, h in json.loads(boxes)])


def _probe_inputs(run: Path) -> tuple[object, list[str], list[int], list[int]]:
    """A run's config and its probe set (texts, prompt ids, sample indices), as pgot-train built them."""
    from pgot.config import load_config
    from pgot.probes import probe_set
    from pgot.prompts import load_prompts, split

    cfg = load_config(run / "config.yaml")
    prompt_set = load_prompts(cfg.prompts)
    if cfg.prompts.eval_fraction > 0:
        prompt_set, _ = split(prompt_set, cfg.prompts.eval_fraction, cfg.prompts.split_seed)
    texts, ids, idx = probe_set(
        [int(i) for i in prompt_set.ids], list(prompt_set.prompts), cfg.train.probe_prompts, cfg.train.probe_samples
    )
    return cfg, texts, ids, idx


def _base_probe(cfg, texts, ids, idx, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The step-0 (base) model's probe reward vectors and true quality, from its 8-bit images as the grids hold them;
    cached per (seed, probe set)."""
    from pgot import rewards
    from pgot.images import to_uint8
    from pgot.model import load_model
    from pgot.probes import sample_and_score
    from pgot.testbed import judge

    key = (cfg.train.seed, tuple(texts), tuple(idx))
    if key not in cache:
        if "model" not in cache:
            cache["model"] = load_model(cfg.model, device="cpu")
            cache["rewards"] = rewards.build(cfg.rewards, device="cpu")
        images, _ = sample_and_score(cfg, cache["model"], cache["rewards"], texts, ids, idx, cfg.train.seed)
        images = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float() / 255.0  # as saved in a PNG
        with torch.no_grad():
            scores = rewards.score(cache["rewards"], images, list(texts)).double()
        cache[key] = (scores, judge.quality(images, list(texts)).double())
    return cache[key]


def probe_curves(plan: Plan) -> pd.DataFrame:
    """Per method, seed and probe step: the probe lines' JDR / JCR (``metrics.jsonl``, the abandoned branches of agent
    reverts dropped) and, in the testbed, :func:`pgot.probes.ground_truth_line` of the run's probe images
    (``probes/step-XXXXXX.png``) against the base model's; step 0 is the base model (quality from its probe images,
    rates 0). Returns a long frame: method, seed, step and the ``probe/*`` columns."""
    from pgot import rewards
    from pgot.evaluate import read_training_curves
    from pgot.probes import ground_truth_line
    from pgot.testbed import judge

    rows, cache = [], {}
    for m in plan.methods:
        for s in plan.seeds:
            run = _run_dir(plan.out, m, s)
            if not (run / "metrics.jsonl").is_file():
                continue
            (frame,) = read_training_curves([str(run)]).values()
            if frame.empty:
                continue
            frame = frame.drop_duplicates("step", keep="last")
            if plan.ground_truth:
                cfg, texts, ids, idx = _probe_inputs(run)
                base, base_q = _base_probe(cfg, texts, ids, idx, cache)
                gt = [ground_truth_line(base, base, base_q, base_q, plan.reward_names, plan.reward_sets)]
                gt[0]["step"] = 0
                for step in frame["step"]:
                    grid = run / "probes" / f"step-{int(step):06d}.png"
                    if not grid.is_file():
                        continue
                    images = read_grid(grid)
                    with torch.no_grad():
                        scores = rewards.score(cache["rewards"], images, list(texts)).double()
                    line = ground_truth_line(
                        scores, base, judge.quality(images, list(texts)).double(), base_q, plan.reward_names,
                        plan.reward_sets,
                    )  # fmt: skip
                    gt.append({"step": int(step), **line})
                truth = pd.DataFrame(gt)
                frame = frame.merge(truth, on="step", how="outer")
            zero = {c: 0.0 for c in frame.columns if c.startswith(("probe/jdr", "probe/jcr"))}
            frame = frame.set_index("step")
            for c, v in zero.items():
                if 0 not in frame.index or pd.isna(frame.loc[0, c]):
                    frame.loc[0, c] = v
            frame = frame.sort_index().reset_index()
            frame.insert(0, "seed", s)
            frame.insert(0, "method", m.label)
            rows.append(frame)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["method", "seed", "step"])


def write_figures(plan: Plan, per_seed: pd.DataFrame, curves: pd.DataFrame) -> list[Path]:
    """Figure 4 (with ground truth in the testbed) and the quality-against-JDR scatters; returns the files."""
    from pgot.files import atomic_write

    folder = plan.out / "figures"
    written = []

    def save(fig, name: str) -> None:
        path = folder / name
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), fsync=False)
        written.append(path)

    order = [m.label for m in plan.methods] + ([SOUP_LABEL] if plan.soup else [])
    sets = plan.reward_sets
    words = {name: f"{name} on {', '.join(members)}" for name, members in sets.items()}  # JDR2, JDR4
    if plan.ground_truth and not curves.empty and "probe/quality" in curves:
        fig = plots.ground_truth_curves(
            curves, "probe/jdr_JDR4", "probe/quality_change", change=True, methods=order, jdr_label=words["JDR4"]
        )
        save(fig, "fig4_ground_truth.png")
        for jdr in ("JDR4", "JDR2"):
            points = per_seed[["method", "seed", jdr, "quality_change"]]
            save(
                plots.quality_vs_jdr(points, jdr, methods=order, jdr_label=words[jdr]), f"quality_vs_{jdr.lower()}.png"
            )
    elif not curves.empty:
        mean = curves.groupby(["method", "step"]).mean(numeric_only=True).reset_index()
        by_method = {
            m: mean[mean["method"] == m].drop(columns=["method", "seed"]) for m in order if m in set(mean["method"])
        }
        keys = [k for k in ("probe/jdr_JDR2", "probe/jdr_JDR4", "probe/jcr_JDR2", "probe/jcr_JDR4") if k in mean]
        save(plots.training_curves(by_method, keys, reward_sets=sets), "fig4_jdr.png")
    return written


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_seed = _int_at_least(0)  # training seeds


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Table 3 and Figure 4 of the paper with one command, in the reward-hacking testbed (CPU) or with "
        "the paper's configs (a GPU cluster).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:8]),
    )
    p.add_argument("--setting", choices=("testbed", "paper"), default="testbed", help="the world (default: testbed)")
    p.add_argument("--out", default=None, help="output folder (default: runs/table3_<setting>, runs/table3_quick)")
    p.add_argument("--seeds", type=_seed, nargs="+", default=None, help="training seeds (default: 0 1 2; --quick: 0)")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (folder names, e.g. pgot_offline)")
    p.add_argument(
        "--launcher",
        default=None,
        help='what starts `-m pgot` for precompute and training, e.g. "accelerate launch --config_file '
        'configs/accelerate/8gpu.yaml" (default: python in the testbed, that accelerate launch in the paper '
        "setting); pgot eval always runs as one process",
    )
    p.add_argument("--jobs", type=_positive_int, default=None, help="commands at a time (default: testbed 2, paper 1)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads per command (default: testbed 1)")
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: PG-OT auto (or --methods), one seed, 2 steps, 4 prompts"
    )
    p.add_argument("--table-only", action="store_true", help="run nothing; rebuild the table and figures")
    return p


def _write_prompts(out: Path, quick: bool) -> None:
    from pgot.files import atomic_write
    from pgot.testbed import scenes

    train, held = scenes.split()
    if quick:
        train, held = train[: Quick.train_prompts], held[: Quick.heldout_prompts]
    for name, prompts in (("train.txt", train), ("heldout.txt", held)):
        text = "\n".join(prompts) + "\n"
        path = out / "prompts" / name
        if not path.is_file() or path.read_text() != text:
            atomic_write(path, lambda tmp, text=text: tmp.write_text(text))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "runs" / ("table3_quick" if args.quick else f"table3_{args.setting}"))
    if args.quick and args.setting == "paper":
        print("error: --quick is a testbed smoke run; drop --setting paper.", file=sys.stderr)
        return 2
    try:
        plan = build_plan(args)
        read_timings(plan.out)  # a damaged timings.json is one error line, before anything runs
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    jobs = args.jobs or (1 if plan.setting == "paper" else 2)
    threads = args.threads if args.threads is not None else (None if plan.setting == "paper" else 1)
    agent = any(m.agent for m in plan.methods) and plan.setting == "testbed"
    if args.dry_run:
        print(f"# Table 3, {plan.setting} setting: {len(plan.jobs)} commands, {jobs} at a time, into {plan.out}")
        if agent:
            print("# <agent-url>: pgot.testbed.agent_server, started by this script on a free local port")
        for job in plan.jobs:
            after = f"   # after: {', '.join(job.after)}" if job.after and len(job.after) <= 2 else (
                f"   # after: the {len(job.after)} trainings of its seed" if job.after else ""
            )  # fmt: skip
            print(format_command(job) + after)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    plan.out.mkdir(parents=True, exist_ok=True)
    code = 0
    if not args.table_only:
        if plan.setting == "testbed":
            _write_prompts(plan.out, args.quick)
        code = _run(plan, jobs, threads, agent)
    _quiet()  # the table stage loads the base model for the step-0 probes: no progress bars, no info lines
    try:
        _, per_seed = write_table(plan)
        curves = probe_curves(plan)
        files = write_figures(plan, per_seed, curves)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if code == 0 else code
    print((plan.out / "table3.md").read_text())
    print("written:", plan.out / "table3.md", plan.out / "table3.csv", *files, sep="\n  ")
    return code


def _quiet() -> None:
    import diffusers
    import transformers

    logging.getLogger("pgot").setLevel(logging.WARNING)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def read_timings(out: Path) -> list[dict]:
    """Every attempt's record of ``<out>/timings.json``, oldest first (``[-1]`` is the latest); ``[]`` when none.

    A file of the first format (one record, a JSON object) reads as a list of that one record.

    Raises:
        ValueError: the file is not JSON, or neither a record nor a list of records.
    """
    path = Path(out) / "timings.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}); move it away to start a new list of attempts.") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path} is not a list of timing records; move it away to start a new list of attempts.")
    return data


def _run(plan: Plan, jobs: int, threads: int | None, agent: bool) -> int:
    """Run the plan, add this attempt's record to ``timings.json``; 0 when every command succeeded, 1 otherwise."""
    from pgot.files import atomic_write_json

    attempts = read_timings(plan.out)  # before running: a damaged file stops nothing half-way
    start = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load0 = os.getloadavg()
    done: list[Result] = []

    def on_done(r: Result) -> None:
        done.append(r)
        log.info("%s: %s (%.0f s wall, %.0f s CPU)", r.name, r.status, r.wall_s, r.cpu_s)

    with agent_endpoint(agent) as url:
        if url is not None:
            log.info("agent server (pgot.testbed.agent_server) at %s", url)
        results = run_plan(plan, jobs, threads, url, on_done)
    wall = time.perf_counter() - start
    record = {
        "setting": plan.setting, "jobs_at_a_time": jobs, "threads_per_job": threads, "cpus": os.cpu_count(),
        "wall_s": round(wall, 1), "cpu_s": round(sum(r.cpu_s for r in done), 1),
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "commands": [dataclasses.asdict(r) for r in done],
    }  # fmt: skip
    record = {"attempt": len(attempts) + 1, "started": started, **record}
    atomic_write_json(plan.out / "timings.json", [*attempts, record])
    log.info("%d commands in %.0f s wall, %.0f s CPU (timings.json)", len(done), wall, record["cpu_s"])
    failed = [r for r in results.values() if r.rc != 0]
    for r in failed:
        log.error("%s: %s (log: %s)", r.name, r.status, plan.out / "logs" / f"{r.name}.log")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
