"""Test hooks for subprocess runs (never imported by pgot): put ``tests/hooks`` first on ``PYTHONPATH``.

Python imports ``sitecustomize`` at start-up in every process, the ``accelerate launch`` workers included. Driven
by environment variables, so the same file serves every test:

- ``PGOT_TEST_SLOW_RANK=<rank>``: in the worker of that rank (``RANK``, under ``accelerate launch``), each collective write
  starts ``PGOT_TEST_SLOW_S`` seconds (default 1) late: accelerate's ``save_state`` (checkpoints),
  ``pgot.checkpoints.load`` (resume, agent revert) and ``pgot.frontier.write_shard`` (precompute shards). A
  missing barrier then shows deterministically: the other ranks rename, prune or merge before it has written.
  Its preflight checks (``pgot.preflight.check_inputs``) start late too: the main process would otherwise take
  the output folder's lock while that rank still looks at the folder.
- ``PGOT_TEST_PROBLEM_RANK=<rank>``: the preflight checks of that rank find one more problem, ``a problem only
  process <rank> sees`` (an input missing on one node).
- ``PGOT_TEST_SIGNAL=<step>:<SIGNAL>[:<rank>]``: the worker of that rank (without a rank: a single-process run)
  sends itself ``SIGNAL`` when training step ``<step>`` starts (inside its first rollout), so the signal is in
  flight during that step.
- ``PGOT_TEST_PRECOMPUTE_SIGNAL=<batch>:<SIGNAL>[:<rank>]``: the worker of that rank (without a rank: a
  single-process run) sends itself ``SIGNAL`` when it starts generating the ``<batch>``-th batch it does in this
  run (1-based, counting that process's batches: ``pgot.precompute.generate`` is wrapped), so the signal is in
  flight during that batch, before its shard is written.
- ``PGOT_TEST_STEP_S=<seconds>``: in a process not started by ``accelerate launch`` (a single-process run), each
  training step starts that late, so a run holds its folder for a known least time (longer than
  :data:`pgot.files.GRACE_S`, for the tests of a second run).

The ``accelerate launch`` process itself (no ``LOCAL_RANK``) is hooked by nothing but ``PGOT_TEST_STEP_S``, which
it never uses.
"""

from __future__ import annotations

import functools
import os
import signal
import time

_RANK = os.environ.get("RANK", "0")


def _delayed(fn, seconds: float):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return wrapper


_WORKER = os.environ.get("LOCAL_RANK") is not None  # a process started by accelerate launch / torchrun

if _WORKER and os.environ.get("PGOT_TEST_SLOW_RANK") == _RANK:
    import accelerate

    import pgot.checkpoints
    import pgot.frontier
    import pgot.preflight

    _s = float(os.environ.get("PGOT_TEST_SLOW_S", "1"))
    accelerate.Accelerator.save_state = _delayed(accelerate.Accelerator.save_state, _s)
    pgot.checkpoints.load = _delayed(pgot.checkpoints.load, _s)
    pgot.frontier.write_shard = _delayed(pgot.frontier.write_shard, _s)
    pgot.preflight.check_inputs = _delayed(pgot.preflight.check_inputs, _s)

if _WORKER and os.environ.get("PGOT_TEST_PROBLEM_RANK") == _RANK:
    import pgot.preflight

    _check_inputs = pgot.preflight.check_inputs

    @functools.wraps(_check_inputs)
    def _one_more_problem(*args, _check_inputs=_check_inputs, **kwargs):
        return [*_check_inputs(*args, **kwargs), f"a problem only process {_RANK} sees"]

    pgot.preflight.check_inputs = _one_more_problem

if os.environ.get("PGOT_TEST_SIGNAL"):
    _step, _name, *_only = os.environ["PGOT_TEST_SIGNAL"].split(":")
    if (_WORKER and _only and _only[0] == _RANK) or (not _WORKER and not _only):
        import pgot.train

        _rollout = pgot.train._rollout

        @functools.wraps(_rollout)
        def _signalling_rollout(r, step, micro, _rollout=_rollout):
            if step == int(_step) and micro == 0:
                os.kill(os.getpid(), getattr(signal, _name))
            return _rollout(r, step, micro)

        pgot.train._rollout = _signalling_rollout

if os.environ.get("PGOT_TEST_PRECOMPUTE_SIGNAL"):
    _batch, _sig, *_on = os.environ["PGOT_TEST_PRECOMPUTE_SIGNAL"].split(":")
    if (_WORKER and _on and _on[0] == _RANK) or (not _WORKER and not _on):
        import pgot.precompute

        _generate = pgot.precompute.generate
        _calls = [0]

        @functools.wraps(_generate)
        def _signalling_generate(*args, _generate=_generate, **kwargs):
            _calls[0] += 1
            if _calls[0] == int(_batch):
                os.kill(os.getpid(), getattr(signal, _sig))
            return _generate(*args, **kwargs)

        pgot.precompute.generate = _signalling_generate

if os.environ.get("PGOT_TEST_STEP_S") and not _WORKER:
    import pgot.train

    _rollout_late = pgot.train._rollout

    @functools.wraps(_rollout_late)
    def _late_rollout(r, step, micro, _rollout=_rollout_late, _s=float(os.environ["PGOT_TEST_STEP_S"])):
        if micro == 0:
            time.sleep(_s)
        return _rollout(r, step, micro)

    pgot.train._rollout = _late_rollout
