"""Benchmark pgot's numeric kernels (Pareto masks, dominating sets, batched OT loss) against peers.

Every case times pgot and its peers side by side in one process, round-robin in shuffled order, and
reports medians and the speedup ``peer time / pgot time`` against the goal column of each case.
Peers that are not importable (moocore, POT, botorch) are skipped with a note.

    OMP_NUM_THREADS=1 python scripts/bench_kernels.py                    # CPU, 1 thread
    python scripts/bench_kernels.py --device cuda --json bench.json      # GPU (moocore/POT loops stay on CPU)
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgot.pareto import dominating_sets, pareto_mask  # noqa: E402


@dataclass
class Row:
    case: str
    impl: str
    median_s: float
    speedup: float | None  # peer time / pgot time (None for the pgot row itself)
    goal: str
    met: bool | None


def _timer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def measure(
    fns: dict[str, Callable[[], object]], device: torch.device, rounds: int, target_s: float
) -> dict[str, float]:
    """Median seconds per call; each round runs every callable once (enough repeats for ~target_s)."""
    sync = _timer(device)
    reps, slow = {}, set()
    for name, fn in fns.items():
        fn()  # warm-up (lazy init, JIT, cuda context)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        reps[name] = max(1, int(target_s / max(dt, 1e-7)))
        if dt > 0.1:
            slow.add(name)  # e.g. a Python loop over POT: time it in every third round only
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        random.shuffle(names)
        for name in names:
            if name in slow and r % 3:
                continue
            fn, k = fns[name], reps[name]
            sync()
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / k)
    return {name: statistics.median(v) for name, v in times.items()}


def _report(case: str, medians: dict[str, float], goals: dict[str, tuple[str, float]], rows: list[Row]) -> None:
    """goals: peer -> (text, minimum speedup)."""
    base = medians["pgot"]
    rows.append(Row(case, "pgot", base, None, "", None))
    for peer, t in medians.items():
        if peer == "pgot":
            continue
        text, minimum = goals.get(peer, ("", float("nan")))
        speedup = t / base
        rows.append(Row(case, peer, t, speedup, text, None if not text else bool(speedup >= minimum)))


def _optional(module: str):
    try:
        return __import__(module)
    except ImportError:
        print(f"note: {module} is not importable; its peers are skipped")
        return None


def bench_pareto(device, rounds, target_s, rows, moocore, botorch_dominance):
    gen = torch.Generator().manual_seed(0)
    b, n, m = 64, 50, 4
    scores = torch.randn(b, n, m, generator=gen).to(device)
    scores_np = scores.double().cpu().numpy()
    fns = {"pgot": lambda: pareto_mask(scores)}
    goals = {}
    if moocore is not None:
        ref = np.stack([moocore.is_nondominated(s, maximise=True, keep_weakly=True) for s in scores_np])
        assert (pareto_mask(scores).cpu().numpy() == ref).all(), "pgot and moocore disagree"
        fns["loop moocore.is_nondominated (CPU)"] = lambda: [
            moocore.is_nondominated(s, maximise=True, keep_weakly=True) for s in scores_np
        ]
        goals["loop moocore.is_nondominated (CPU)"] = ("pgot <= 1.5x slower (>= 0.67)", 1 / 1.5)
    fns["loop over prompts of pgot (torch)"] = lambda: [pareto_mask(s, backend="torch") for s in scores]
    goals["loop over prompts of pgot (torch)"] = (">= 4x faster", 4.0)
    if botorch_dominance is not None:
        fns["botorch is_non_dominated batched"] = lambda: botorch_dominance(scores, maximize=True, deduplicate=False)
        goals["botorch is_non_dominated batched"] = (">= 5x faster", 5.0)
    _report(f"pareto_mask B={b} N={n} M={m}", measure(fns, device, rounds, target_s), goals, rows)

    for n in (256, 1000):
        single = torch.randn(n, m, generator=gen).to(device)
        single_np = single.double().cpu().numpy()
        fns = {"pgot": lambda single=single: pareto_mask(single)}
        fns["pgot backend=torch"] = lambda single=single: pareto_mask(single, backend="torch")
        goals = {}
        if moocore is not None:
            fns["moocore.is_nondominated (CPU)"] = lambda x=single_np: moocore.is_nondominated(
                x, maximise=True, keep_weakly=True
            )
            goals["moocore.is_nondominated (CPU)"] = ("pgot <= 1.5x slower (>= 0.67)", 1 / 1.5)
        _report(f"pareto_mask single N={n} M={m}", measure(fns, device, rounds, target_s), goals, rows)


def bench_online(device, rounds, target_s, rows):
    gen = torch.Generator().manual_seed(1)
    q, g, m = 400, 3200, 4
    queries = torch.randn(q, m, generator=gen).to(device)
    pool = torch.randn(g, m, generator=gen).to(device)
    qn, pn = queries.cpu().numpy(), pool.cpu().numpy()

    def numpy_broadcast():
        le = (qn[:, None, :] <= pn[None, :, :]).all(-1)
        lt = (qn[:, None, :] < pn[None, :, :]).any(-1)
        return le & lt

    assert (dominating_sets(queries, pool).cpu().numpy() == numpy_broadcast()).all()
    fns = {"pgot": lambda: dominating_sets(queries, pool), "numpy (Q,G,M) broadcast (CPU)": numpy_broadcast}
    goals = {"numpy (Q,G,M) broadcast (CPU)": (">= 10x faster", 10.0)}
    _report(f"dominating_sets Q={q} G={g} M={m}", measure(fns, device, rounds, target_s), goals, rows)


def bench_ot(device, rounds, target_s, rows, iters, epsilon):
    try:
        import ot
        from ot.batch import solve_batch, solve_sample_batch

        from pgot.ot_loss import ot_loss
    except ImportError:
        print("note: POT is not importable; the OT case is skipped")
        return
    gen = torch.Generator().manual_seed(2)
    b, n, f, m = 64, 12, 6, 4
    x = torch.randn(b, n, m, generator=gen).to(device).requires_grad_(True)
    y = (torch.randn(b, f, m, generator=gen) + 1.0).to(device)
    a_u = torch.full((n,), 1.0 / n, device=device)
    b_u = torch.full((f,), 1.0 / f, device=device)

    def pgot():
        ot_loss(x, y, epsilon=epsilon, max_iter=iters, tol=0.0).sum().backward()

    def pot_batch():  # the plain POT user: one ot.batch call, envelope gradient (default)
        res = solve_sample_batch(x, y, epsilon, max_iter=iters, tol=0.0, method="log_sinkhorn", grad="envelope")
        res.value_linear.sum().backward()

    def pot_batch_detached():  # POT on a detached direct-difference cost, <T, C> by hand (pgot's core)
        cost = (x[:, :, None] - y[:, None]).square().sum(-1)
        with torch.no_grad():
            plan = solve_batch(cost.detach(), epsilon, max_iter=iters, tol=0.0, method="log_sinkhorn").plan
        (plan * cost).sum().backward()

    def pot_loop():
        total = 0.0
        for i in range(b):
            cost = (x[i, :, None] - y[i, None]).square().sum(-1)
            total = total + ot.sinkhorn2(a_u, b_u, cost, epsilon, method="sinkhorn_log", numItermax=iters, stopThr=0.0)
        total.backward()

    mine = ot_loss(x, y, epsilon=epsilon, max_iter=iters, tol=0.0)
    theirs = solve_sample_batch(x, y, epsilon, max_iter=iters, tol=0.0, method="log_sinkhorn").value_linear
    assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-4), "pgot and POT ot.batch disagree"
    fns = {
        "pgot": pgot,
        "POT ot.batch.solve_sample_batch (envelope)": pot_batch,
        "POT ot.batch.solve_batch, detached cost": pot_batch_detached,
        "loop of POT ot.sinkhorn2 (sinkhorn_log)": pot_loop,
    }
    goals = {
        "POT ot.batch.solve_sample_batch (envelope)": ("pgot <= 1.2x slower (>= 0.83)", 1 / 1.2),
        "loop of POT ot.sinkhorn2 (sinkhorn_log)": (">= 30x faster", 30.0),
    }
    _report(
        f"ot_loss fwd+bwd B={b} {n}x{f} M={m} {iters} it eps={epsilon}",
        measure(fns, device, rounds, target_s),
        goals,
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device of pgot's tensors (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is the fair comparison)")
    parser.add_argument("--rounds", type=int, default=15, help="round-robin rounds per case")
    parser.add_argument("--target-ms", type=float, default=10.0, help="time per measurement (repeats a call)")
    parser.add_argument("--ot-iters", type=int, default=100, help="Sinkhorn iterations, the same for every OT solver")
    parser.add_argument("--epsilon", type=float, default=1.0, help="entropic regularisation of the OT case")
    parser.add_argument("--cases", default="pareto,online,ot", help="comma-separated subset of pareto,online,ot")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # fixed iteration budgets trip the convergence warnings on purpose
    random.seed(0)
    moocore = _optional("moocore")
    try:
        from botorch.utils.multi_objective.pareto import is_non_dominated as botorch_dominance
    except ImportError:
        print("note: botorch is not importable; its peer is skipped")
        botorch_dominance = None

    cases = set(args.cases.split(","))
    rows: list[Row] = []
    target_s = args.target_ms / 1e3
    if "pareto" in cases:
        bench_pareto(device, args.rounds, target_s, rows, moocore, botorch_dominance)
    if "online" in cases:
        bench_online(device, args.rounds, target_s, rows)
    if "ot" in cases:
        bench_ot(device, args.rounds, target_s, rows, args.ot_iters, args.epsilon)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\ndevice {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    print("| case | implementation | median | speedup of pgot (peer / pgot) | goal | met |")
    print("|---|---|---:|---:|---|---|")
    for r in rows:
        t = f"{r.median_s * 1e3:.3f} ms" if r.median_s >= 1e-3 else f"{r.median_s * 1e6:.1f} µs"
        s = "" if r.speedup is None else f"{r.speedup:.2f}x"
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        print(f"| {r.case} | {r.impl} | {t} | {s} | {r.goal} | {met} |")
    if args.json:
        meta = {
            "device": str(device),
            "device_name": name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
