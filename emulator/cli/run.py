"""``smslab run``: a scenario on a lab of its own, judged, kept in a run directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from emulator.cli.common import add_json, amqp_url, emit_json, ends_like_ctrl_c, progress_for, refuse_used_dir
from emulator.lab import LabDir
from emulator.runner import default_run_dir, run_scenario
from emulator.scenario import load_scenario


def cmd_run(args: argparse.Namespace, lab_dir: LabDir) -> int:
    path = Path(args.scenario)
    scenario = load_scenario(path)  # refused here, with file:line, before anything starts
    seed = scenario.seed if args.seed is None else args.seed
    run_dir = Path(args.out) if args.out else default_run_dir(scenario, seed)
    refuse_used_dir(run_dir)  # one run a directory: refused before anything is written or started
    # SIGTERM (a CI job's timeout, `timeout`, kill) ends the run as Ctrl-C does: the lab is
    # brought down and the run directory written, instead of sites left running. So does the
    # reader of stdout going away (smslab run ... | head).
    with ends_like_ctrl_c():
        result = run_scenario(scenario, seed=seed, run_dir=run_dir, amqp_url=amqp_url(args),
                              lab_dir=lab_dir if args.lab_given else None, scenario_path=path,
                              keep_up=args.keep_up, progress=progress_for(args))
    if args.json:
        emit_json({"run_dir": str(result.run_dir), "seed": result.seed, "replay": result.replay,
                   "exit": result.exit_code, "verdict": result.verdict, "error": result.error,
                   "expectations": [o.__dict__ for o in result.outcomes],
                   "schedule": json.loads(json.dumps([a.model_dump() for a in result.schedule]))})
    return result.exit_code


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    text = "run a scenario (steps, faults, expectations, seeded chaos) on a lab of its own and judge it"
    s: argparse.ArgumentParser = sub.add_parser("run", parents=[common], help=text, description=text)
    s.set_defaults(handler=cmd_run)
    s.add_argument("scenario", help="a scenario YAML file (see scenarios/)")
    s.add_argument("--seed", type=int, help="the seed (default: the scenario's); the same seed, the same schedule")
    s.add_argument("--out", metavar="DIR", help="the run directory (default smslab-runs/<scenario>-<time>-seed<N>)")
    s.add_argument("--keep-up", action="store_true", help="leave the lab running at the end")
    add_json(s)
