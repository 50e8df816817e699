"""Accuracy of the decision agent on labelled diagnostic images (the paper's table 4 protocol).

Each manifest row is one decision: a base-model image, the current model's image (same prompt and
seed), the prompt, and a human label ``healthy`` or ``collapsed:<reward>``. The agent sees every
configured reward as active (offline strategy) and may remove any of them (strong ones included,
unless --respect-strength). A ``continue`` or ``switch`` counts as ``healthy``, ``remove X`` as
``collapsed:X``. Endpoint failures become ``continue`` (so ``healthy``) and are counted in
``errors``: check that number before trusting the accuracy.

    # GPT-4o (key in $OPENAI_API_KEY)
    python scripts/agent_accuracy.py --manifest diag/manifest.csv
    # an open VLM served by vLLM, no key
    python scripts/agent_accuracy.py --manifest diag/manifest.jsonl \\
        --base-url http://localhost:8000/v1 --model Qwen/Qwen3-VL-32B-Thinking --api-key-env '' --max-tokens 8192
    # agent settings and rewards from a pgot config, with overrides
    python scripts/agent_accuracy.py --manifest diag/manifest.csv --config configs/sd35_turbo_pgot.yaml agent.model=gpt-4o-mini
    # dry run without a VLM: decisions keyed by row number (1-based) or the manifest's step column
    python scripts/agent_accuracy.py --manifest diag/manifest.csv --backend scripted --script answers.yaml --json -

Manifest: .csv or .jsonl with columns base_path, current_path, prompt, label (optional: step);
relative paths are read from the manifest's folder. Output: a markdown report on stdout
(accuracy, per-class accuracy, confusion table) and, with --json PATH (``-``: stdout instead of the
markdown), the same as JSON with one record per row. Every decision is logged under --log-dir.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from pgot.agent import AgentState, build_agent, resolve_reward
from pgot.config import AgentConfig, ConfigError, RewardConfig, load_config

PAPER_REWARDS = "clip:weak,ict:strong,hps:weak,hp:strong"


def read_manifest(path: Path, reward_names: list[str]) -> list[dict]:
    """Rows with resolved image paths and a canonical label (``healthy`` / ``collapsed:<reward>``)."""
    if not path.is_file():
        raise ValueError(f"--manifest {path} does not exist.")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        raise ValueError(f"--manifest must be a .csv or .jsonl file, got {path.name}.")
    problems = []
    for i, row in enumerate(rows):
        missing = [c for c in ("base_path", "current_path", "prompt", "label") if c not in row]
        if missing:
            problems.append(f"row {i + 1}: missing column(s) {', '.join(missing)}")
            continue
        for col in ("base_path", "current_path"):
            p = Path(str(row[col]))
            row[col] = p if p.is_absolute() else path.parent / p
            if not row[col].is_file():
                problems.append(f"row {i + 1}: {col} {row[col]} does not exist")
        label = str(row["label"]).strip()
        if label.lower() == "healthy":
            row["label"] = "healthy"
        elif label.lower().startswith("collapsed:"):
            name, words = resolve_reward(label.split(":", 1)[1], reward_names)
            if name not in reward_names:
                problems.append(
                    f"row {i + 1}: label {label!r} names {words!r}, not a configured reward ({', '.join(reward_names)})"
                )
            row["label"] = f"collapsed:{name}"
        else:
            problems.append(f"row {i + 1}: label {label!r} is neither 'healthy' nor 'collapsed:<reward>'")
        row["step"] = int(row.get("step") or i + 1)
    if problems:
        raise ValueError(
            f"--manifest {path}: " + "; ".join(problems[:20]) + ("; ..." if len(problems) > 20 else "") + "."
        )
    return rows


def load_image(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(1, 3, H, W) float in [0, 1]."""
    image = Image.open(path).convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).unsqueeze(0).float() / 255


def evaluate(agent, rows: list[dict], rewards: list[RewardConfig], log_dir: Path) -> dict:
    """Run the agent on every row; accuracy, per-class accuracy, confusion counts, cost, latency."""
    records = []
    for row in rows:
        base = load_image(row["base_path"])
        current = load_image(row["current_path"], size=(base.shape[-1], base.shape[-2]))
        state = AgentState.initial(rewards)
        d = agent.decide(row["step"], base, current, [str(row["prompt"])], state, log_dir)
        predicted = f"collapsed:{d.reward}" if d.action == "remove" else "healthy"
        records.append(
            {
                "step": row["step"],
                "prompt": str(row["prompt"]),
                "label": row["label"],
                "predicted": predicted,
                "action": d.action,
                "correct": predicted == row["label"],
                "error": d.error,
                "reason": d.reason,
                "latency_s": d.latency_s,
                "cost": d.cost,
            }
        )
        logging.info("%s: %s -> %s (%s)", row["step"], row["label"], predicted, d.reason[:120])
    labels = ["healthy"] + [f"collapsed:{r.name}" for r in rewards]
    confusion = Counter((r["label"], r["predicted"]) for r in records)
    per_class = {}
    for label in labels:
        n = sum(1 for r in records if r["label"] == label)
        correct = confusion[(label, label)]
        per_class[label] = {"n": n, "correct": correct, "accuracy": correct / n if n else None}
    n = len(records)
    correct = sum(r["correct"] for r in records)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else None,
        "errors": sum(1 for r in records if r["error"] is not None),
        "invalid_replies": sum(1 for r in records if r["error"] in ("parse", "invalid")),
        "cost": sum(r["cost"] for r in records),
        "mean_latency_s": sum(r["latency_s"] for r in records) / n if n else 0.0,
        "labels": labels,
        "per_class": per_class,
        "confusion": {f"{a} -> {b}": c for (a, b), c in sorted(confusion.items())},
        "records": records,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown(result: dict, agent_cfg: AgentConfig) -> str:
    who = f"{agent_cfg.backend}" + (
        f" {agent_cfg.model} at {agent_cfg.base_url}" if agent_cfg.backend == "openai" else ""
    )
    out = [
        f"## Agent accuracy ({who})",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {_pct(result['accuracy'])} ({result['correct']}/{result['n']}) |",
        f"| endpoint errors (counted as continue) | {result['errors'] - result['invalid_replies']} |",
        f"| unparseable or invalid replies | {result['invalid_replies']} |",
        f"| mean latency | {result['mean_latency_s']:.2f} s |",
        f"| cost | ${result['cost']:.4f} |",
        "",
        "| label | n | correct | accuracy |",
        "|---|---|---|---|",
    ]
    for label, c in result["per_class"].items():
        out.append(f"| {label} | {c['n']} | {c['correct']} | {_pct(c['accuracy'])} |")
    labels = result["labels"]
    predicted = labels + sorted({r["predicted"] for r in result["records"]} - set(labels))
    counts = Counter((r["label"], r["predicted"]) for r in result["records"])
    out += ["", "Confusion (rows: label, columns: decision)", ""]
    out.append("| label \\ decision | " + " | ".join(predicted) + " |")
    out.append("|---" * (len(predicted) + 1) + "|")
    for label in labels:
        out.append(f"| {label} | " + " | ".join(str(counts[(label, p)]) for p in predicted) + " |")
    return "\n".join(out)


def parse_rewards(text: str) -> list[RewardConfig]:
    rewards = []
    for item in text.split(","):
        name, _, strength = item.strip().partition(":")
        if strength not in ("", "strong", "weak"):
            raise ValueError(f"--rewards item {item!r}: strength must be strong or weak, e.g. {PAPER_REWARDS}.")
        rewards.append(RewardConfig(name=name, strength=strength or "strong"))
    return rewards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--manifest", required=True, type=Path, help=".csv or .jsonl: base_path, current_path, prompt, label"
    )
    parser.add_argument("--config", help="pgot YAML config: agent and rewards sections are used")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. agent.model=gpt-4o-mini"
    )
    parser.add_argument("--backend", choices=["openai", "scripted", "heuristic"])
    parser.add_argument("--base-url")
    parser.add_argument("--model")
    parser.add_argument("--api-key-env", help="environment variable with the key ('' for none)")
    parser.add_argument("--script", help="scripted backend: YAML of decisions keyed by row number or step")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--timeout", type=float)
    parser.add_argument(
        "--rewards", default=PAPER_REWARDS, help=f"without --config: name:strength list (default {PAPER_REWARDS})"
    )
    parser.add_argument("--respect-strength", action="store_true", help="do not let the agent remove strong rewards")
    parser.add_argument("--limit", type=int, default=0, help="first N rows only")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/agent_accuracy"))
    parser.add_argument("--json", help="write the result as JSON to this file ('-': stdout, instead of the markdown)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.config:
            cfg = load_config(args.config, [*args.overrides, "model.tiny=true"])  # only agent and rewards are used
            agent_cfg, rewards = cfg.agent, cfg.rewards
        else:
            if args.overrides:
                raise ValueError("key=value overrides need --config; use the --base-url/--model/... flags instead.")
            agent_cfg, rewards = AgentConfig(backend="openai"), parse_rewards(args.rewards)
        for flag, name in (
            ("backend", "backend"),
            ("base_url", "base_url"),
            ("model", "model"),
            ("api_key_env", "api_key_env"),
            ("script", "script"),
            ("max_tokens", "max_tokens"),
            ("timeout", "timeout"),
        ):
            if getattr(args, flag) is not None:
                setattr(agent_cfg, name, getattr(args, flag))
        if agent_cfg.backend == "none":
            raise ValueError("agent.backend is none; pick --backend openai, scripted or heuristic.")
        agent_cfg.every = 1  # scripted decisions are keyed by row number or step
        agent_cfg.allow_remove_strong = not args.respect_strength
        names = [r.name for r in rewards]
        rows = read_manifest(args.manifest, names)
        rows = rows[: args.limit] if args.limit else rows
        agent = build_agent(agent_cfg, rewards)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = evaluate(agent, rows, rewards, args.log_dir)
    for r in result["records"]:
        r["reason"] = r["reason"][:500]
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
            return 0
        Path(args.json).write_text(text)
    print(markdown(result, agent_cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
