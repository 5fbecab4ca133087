"""``smslab sim``: a topology or a scenario in the simulator (one process, no broker), one seed
or a sweep of many."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from emulator.cli.common import (
    add_json,
    emit_json,
    ends_like_ctrl_c,
    note,
    progress_for,
    refuse_used_dir,
    say,
)
from emulator.errors import ConfigError
from emulator.lab import LabDir
from emulator.scenario import CHAOS_KINDS, Scenario, chaos_weights_problem, load_scenario, parse_scenario

DEFAULT_CHAOS = {"kill": 2.0, "pause": 1.0, "partition": 2.0, "drop": 2.0, "duplicate": 1.0, "reorder": 1.0,
                 "delay": 1.0, "disconnect": 1.0}
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``1h30m``: seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh]?)", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 10m, 2h)")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"a duration is more than 0, not {text!r}")
    return seconds


def chaos_weights(text: str) -> dict[str, float]:
    """``kill=2,partition=1``: fault kinds and their weights (``all``: the default mix)."""
    if text in ("", "all", "default"):
        return dict(DEFAULT_CHAOS)
    out: dict[str, float] = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        kind = kind.strip()
        if kind not in CHAOS_KINDS:
            raise argparse.ArgumentTypeError(f"--chaos: unknown fault kind {kind!r}; use {', '.join(CHAOS_KINDS)}")
        try:
            out[kind] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"--chaos {part!r}: the weight is a number (kill=2)") from None
    problem = chaos_weights_problem(out)
    if problem:
        raise argparse.ArgumentTypeError(f"--chaos {text}: {problem}")
    return out


def _is_scenario(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # load_scenario / load_topology says what is wrong
    return isinstance(data, dict) and "scenario" in data


def scenario_from_topology(path: Path, *, seconds: float, chaos: dict[str, float] | None, seed: int) -> str:
    """The scenario ``smslab sim TOPOLOGY`` runs: the workload (and chaos) for ``seconds``,
    then every fault healed, the lab converged and judged."""
    data: dict[str, Any] = {"scenario": re.sub(r"[^a-z0-9-]", "-", path.stem.lower())[:40] or "sim",
                            "description": f"{path.name} in the simulator", "topology": str(path.resolve()),
                            "seed": seed}
    if chaos:
        data["chaos"] = {"duration": seconds, "faults": chaos, "converge_timeout": 600}
    else:
        data["steps"] = [{"wait": seconds}, {"wait-converged": 600}]
    return yaml.safe_dump(data, sort_keys=False)


def _extra(args: argparse.Namespace) -> str:
    """The options a replay needs besides the seed."""
    bits = []
    if args.duration is not None:
        bits.append(f"--duration {args.duration_text}")
    if args.chaos is not None:
        bits.append(f"--chaos {args.chaos_text}" if args.chaos_text else "--chaos")
    return " ".join(bits)


def _load(args: argparse.Namespace) -> tuple[Scenario, str | None, str | None]:
    """(scenario, its file if it is one, the text made from a topology if not)."""
    path = Path(args.target)
    if not path.exists():
        raise ConfigError(f"{path}: no such file", hint="give a topology (examples/lab.yaml) or a scenario (scenarios/)")
    seed = args.seed if args.seed is not None else 1
    if _is_scenario(path):
        scenario = load_scenario(path)
        if args.duration is not None or args.chaos is not None:
            if not any(step.name == "chaos" for step in scenario.steps):
                raise ConfigError(f"{path}: --duration and --chaos change a scenario's chaos step, and this"
                                  " scenario has none",
                                  hint="give a topology to run it under chaos, or add a chaos: step")
            text = _scenario_yaml(path, args)
            return parse_scenario(text, str(path), path.parent), None, text
        return scenario, str(path), None
    text = scenario_from_topology(path, seconds=args.duration or 60.0, chaos=args.chaos, seed=seed)
    return parse_scenario(text, str(path), path.parent), None, text


def _scenario_yaml(path: Path, args: argparse.Namespace) -> str:
    """The scenario file with its chaos steps' duration / fault mix changed."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if isinstance(data.get("topology"), str):
        data["topology"] = str((path.parent / data["topology"]).resolve())

    def change(chaos: dict[str, Any]) -> None:
        if args.duration is not None:
            chaos["duration"] = args.duration
        if args.chaos is not None:
            chaos["faults"] = args.chaos

    if isinstance(data.get("chaos"), dict):
        change(data["chaos"])
    for step in data.get("steps") or []:
        if isinstance(step, dict) and isinstance(step.get("chaos"), dict):
            change(step["chaos"])
    return str(yaml.safe_dump(data, sort_keys=False))


def cmd_sim(args: argparse.Namespace, _lab_dir: LabDir) -> int:
    from emulator import sim

    _parse_options(args)
    scenario, scenario_path, text = _load(args)
    extra = _extra(args)
    if args.seeds:
        return _sweep(args, scenario, scenario_path, text, extra)
    seed = args.seed if args.seed is not None else scenario.seed
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) if args.out else Path("smslab-runs") / f"sim-{scenario.scenario}-{stamp}-seed{seed}"
    refuse_used_dir(run_dir)  # one run a directory, as smslab run: refused before anything is written
    started = time.monotonic()
    with ends_like_ctrl_c():  # SIGTERM or stdout's reader gone: the run ends as on Ctrl-C, written
        result = sim.simulate(scenario, seed=seed, run_dir=run_dir,
                              scenario_path=Path(scenario_path) if scenario_path else None,
                              progress=progress_for(args), replay_extra=extra)
    if scenario_path is None:
        result.replay = sim.replay_command(args.target, seed, extra)
    wall = time.monotonic() - started
    simulated = LabDir(run_dir / "lab")
    virtual = _simulated(run_dir)
    if args.json:
        emit_json({"run_dir": str(result.run_dir), "seed": seed, "replay": result.replay, "exit": result.exit_code,
                   "verdict": result.verdict, "error": result.error, "wall": round(wall, 3), "simulated": virtual,
                   "speed": round(virtual / wall, 2) if wall > 0 else None,
                   "lab": str(simulated.path),
                   "expectations": [o.__dict__ for o in result.outcomes]})
    else:
        say(f"simulated {virtual:.0f}s in {wall:.1f}s wall ({virtual / wall:.1f}x real time); run directory {run_dir}")
        say(f"replay: {result.replay}")
    return result.exit_code


def _simulated(run_dir: Path) -> float:
    import json

    try:
        return float(json.loads((run_dir / "run.json").read_text()).get("simulated") or 0.0)
    except (OSError, ValueError):
        return 0.0


def _sweep(args: argparse.Namespace, scenario: Scenario, scenario_path: str | None, text: str | None,
           extra: str) -> int:
    from emulator import sim

    seeds = sim.parse_seeds(args.seeds)
    jobs = args.jobs or os.cpu_count() or 1
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_root = Path(args.out) if args.out else Path("smslab-runs") / f"sweep-{scenario.scenario}-{stamp}"
    refuse_used_dir(out_root, "the sweep's folder")  # one sweep a folder: two sweeps' failing seeds not mixed
    out_root.mkdir(parents=True, exist_ok=True)
    job = sim.SweepJob(scenario_path=scenario_path, scenario_text=text, source=args.target,
                       out_root=str(out_root.resolve()), replay_extra=extra, keep=args.keep)
    tell = note if args.json else say
    tell(f"sweeping {len(seeds)} seed(s) of {scenario.scenario} on {jobs} job(s); failing runs kept in {out_root}")
    done = 0

    def on_outcome(outcome: sim.SeedOutcome) -> None:
        nonlocal done
        done += 1
        if not outcome.passed:
            tell(outcome.line())
        elif sys.stderr.isatty() and not args.json:
            print(f"\r{done}/{len(seeds)} seeds", end="", file=sys.stderr, flush=True)

    with ends_like_ctrl_c():  # a sweep prints only its failing seeds: a reader gone is watched for
        result = sim.sweep(job, seeds, jobs=jobs, fail_fast=args.fail_fast, on_outcome=on_outcome)
    if sys.stderr.isatty() and not args.json:
        print("\r", end="", file=sys.stderr)
    if args.json:
        emit_json({"seeds": len(seeds), "run": len(result.outcomes), "passed": len(result.outcomes) - len(result.failed),
                   "failed": [o.__dict__ for o in result.failed], "wall": round(result.wall, 3),
                   "stopped_early": result.stopped_early, "out": str(out_root)})
    else:
        say(result.summary())
    return 1 if result.failed else 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    text = ("run a topology or a scenario in the simulator: every site's real runtime and store in one process,"
            " on an in-memory broker and a virtual clock (no RabbitMQ, no processes); the same seed, the same run")
    s: argparse.ArgumentParser = sub.add_parser("sim", parents=[common], help=text, description=text)
    s.set_defaults(handler=cmd_sim)
    s.add_argument("target", metavar="TOPOLOGY|SCENARIO", help="a topology (examples/) or a scenario (scenarios/) file")
    s.add_argument("--seed", type=int, help="the seed (default: the scenario's, else 1)")
    s.add_argument("--seeds", metavar="A..B", help="a sweep: run these seeds (1..500, 3,7,9) and report each failing one")
    s.add_argument("--jobs", type=int, metavar="N", help="seeds run at once in a sweep (default: the number of cores)")
    s.add_argument("--fail-fast", action="store_true", help="a sweep stops at the first failing seed")
    s.add_argument("--keep", action="store_true", help="a sweep keeps the run directories of passing seeds too")
    s.add_argument("--duration", metavar="TIME", help="a topology: how long the workload runs (default 60s); a scenario:"
                   " its chaos step's duration (90s, 10m, 2h)")
    s.add_argument("--chaos", nargs="?", const="all", metavar="KIND=W,...",
                   help="seeded faults while it runs (default mix: " + ",".join(f"{k}={v:g}" for k, v in DEFAULT_CHAOS.items())
                   + f"; kinds: {', '.join(CHAOS_KINDS)})")
    s.add_argument("--out", metavar="DIR", help="the run directory (a sweep: the folder of its runs)")
    add_json(s)


def _parse_options(args: argparse.Namespace) -> None:
    """Parse the options whose text the replay command repeats."""
    args.duration_text = args.duration
    args.chaos_text = None if args.chaos in (None, "all") else args.chaos
    try:
        args.duration = duration(args.duration) if args.duration is not None else None
        args.chaos = chaos_weights(args.chaos) if args.chaos is not None else None
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(str(exc)) from None
    if args.seeds and args.seed is not None:
        raise ConfigError("--seed and --seeds exclude each other", hint="--seeds 1..500 runs many; --seed N one")
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs is 1 or more")
