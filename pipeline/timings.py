"""`make run`'s clock: run `dvc repro`, pass its output through, and time each stage group.

    python -m pipeline.timings --since <epoch seconds> --out reports/timings.json -- dvc repro

DVC prints `Running stage 'train@ptb-lstm2':` as a stage starts. A stage's wall time
runs from its line to the next stage's line (or the end of the command), so DVC's own
bookkeeping between two stages is counted with the first; a stage DVC skips costs only
the moment it takes to check. `--since` is when `make run` started: everything before
`dvc repro` (the virtual environment, KenLM's build) is the set-up group. At the end a
table of the groups is printed and, when `dvc repro` succeeded and ran a stage, written
to --out (a run with nothing to do keeps the file of the last one that worked):
seconds per group and per stage (wall clock of this machine: these numbers, unlike the
metrics, depend on its load).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from pipeline.atomic import write_json

STAGE_LINE = re.compile(r"^Running stage '([^']+)'")
ORDER = ["set-up", "download/prepare", "ngram", "train", "analyse", "sample", "report"]


def group_of(stage: str) -> str:
    """`train@ptb-lstm2` -> `train ptb`; `ngram@ptb-5` -> `ngram`; `report` -> `report`."""
    name, _, item = stage.partition("@")
    if name == "train":
        return f"train {item.rsplit('-', 1)[0]}"
    if name in ("download", "prepare"):
        return "download/prepare"
    if name in ("leaderboard", "report"):
        return "report"
    return name


def run_timed(command: list[str]) -> tuple[int, dict[str, float]]:
    """(exit status, {stage: seconds}) of `command`, its stdout echoed line by line."""
    stages: dict[str, float] = {}
    current, started = None, time.monotonic()
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            match = STAGE_LINE.match(line)
            if match:
                now = time.monotonic()
                if current is not None:
                    stages[current] = stages.get(current, 0.0) + now - started
                current, started = match.group(1), now
    if current is not None:
        stages[current] = stages.get(current, 0.0) + time.monotonic() - started
    return proc.returncode, stages


def grouped(stages: dict[str, float], setup_s: float) -> dict[str, float]:
    """Seconds per group, in pipeline order (groups with no stage this run left out)."""
    groups: dict[str, float] = {"set-up": setup_s}
    for stage, seconds in stages.items():
        groups[group_of(stage)] = groups.get(group_of(stage), 0.0) + seconds

    def rank(name: str) -> tuple[int, str]:
        return ORDER.index(name.split()[0]), name

    return {name: round(groups[name], 1) for name in sorted(groups, key=rank)}


def table(groups: dict[str, float]) -> str:
    """The groups as aligned text lines, minutes and seconds, with the total."""
    total = sum(groups.values())
    rows = [*groups.items(), ("total", total)]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {int(s // 60):3d} min {s % 60:4.1f} s"
                     for name, s in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--since", type=float, help="epoch seconds when `make run` began "
                        "(the set-up group is the time from then to this command)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the times")
    parser.add_argument("command", nargs="+", help="the command to time (after --)")
    args = parser.parse_args(argv)
    setup_s = max(0.0, time.time() - args.since) if args.since else 0.0
    status, stages = run_timed(args.command)
    groups = grouped(stages, setup_s)
    print(f"\nwall time per stage group (this run):\n{table(groups)}", flush=True)
    if status == 0 and not stages:
        print(f"no stage ran: {args.out} keeps the last run's times")
    elif status == 0:
        write_json(args.out, {"command": " ".join(args.command), "groups_s": groups,
                              "total_s": round(sum(groups.values()), 1),
                              "stages_s": {k: round(v, 1) for k, v in stages.items()}})
        print(f"wrote {args.out}")
    sys.exit(status)


if __name__ == "__main__":
    main()
