"""The README's main job, step by step and timed: `geoindex build`, `train` and `bench` on one data set, on the
device a user would give them, then issue 22's acceptance path (benchmarks/street_heldout.py) on the result.

    python benchmarks/pipeline_timing.py --data ../shared/data/real/london-or-london --name NAME \
        [--device auto|cpu|cuda] [--steps build,train,heldout,bench] [--tag _x]

Each step is the product's own command in a child process (`python -m geoindex.cli ...`), so a figure here is
what a user's shell would see, model loading and process start included. A step that fails is recorded with its
exit status and the end of its log, and the steps after it that need it are skipped. Saves
benchmarks/results/pipeline_timing<--tag>.json before and after every step (a run stopped at a time limit keeps
what finished and names the step it was in): seconds per step, the machine (CPU count, GPU name), this run's test
split city accuracy of kNN and the best method from bench's results.json, and the acceptance path's GPS figures
(its own file: street_heldout_test<--tag, or _pipeline>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, save, without_option  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("build", "train", "heldout", "bench")
NEEDS = {"train": "build", "heldout": "train", "bench": "train"}


def _command(step: str, args) -> list[str]:
    device = ["--device", args.device] if args.device else []  # else each command's own default
    if step == "build":
        return ["-m", "geoindex.cli", "build", "--data", args.data, "--name", args.name, "--overwrite", *device]
    if step == "train":
        return ["-m", "geoindex.cli", "train", "--index", args.name, *device]
    if step == "bench":
        return ["-m", "geoindex.cli", "bench", "--index", args.name, *device]
    # the acceptance path, its own tag so that no run of this script overwrites its committed headline file
    return [str(Path(__file__).with_name("street_heldout.py")), "--index", args.name, f"--tag={_heldout_tag(args)}",
            *device]


def _heldout_tag(args) -> str:
    return args.tag or "_pipeline"


def _shown(argument: str) -> str:
    """A path as a committed record may hold it: relative to the repository where it lies beside it (as
    ../shared/... does), else its name alone; no machine's folders."""
    path = Path(argument)
    if not path.is_absolute():
        return argument
    if path.resolve().is_relative_to(ROOT.parent):
        return os.path.relpath(path.resolve(), ROOT)
    return path.name


def _city_figures(index_path: Path) -> dict | None:
    results = index_path / "bench" / "results.json"
    if not results.exists():
        return None
    table = json.loads(results.read_text())["sets"]["test"]["methods"]
    accuracy = {method: row["accuracy"] for method, row in table.items() if "accuracy" in row}
    return {"test_accuracy": accuracy, "knn": accuracy.get("knn"), "best": max(accuracy.values(), default=None)}


def _finished(record: dict, step: str) -> bool:
    return record.get(step, {}).get("exit") == 0


def _save(args, argv, steps, record, final: bool) -> dict:
    from geoindex.locate import resolve_index_path

    city = None
    if _finished(record, "bench"):  # only this run's bench: an older results.json would not be this run's figures
        city = _city_figures(resolve_index_path(args.name))
    heldout_file = RESULTS / f"street_heldout_test{_heldout_tag(args)}.json"
    heldout = json.loads(heldout_file.read_text())["figures"] if _finished(record, "heldout") else None
    measured = [record[s]["seconds"] for s in ("build", "train") if _finished(record, s)]
    given = argv if argv is not None else sys.argv[1:]
    shown = [_shown(a) if i and given[i - 1] == "--data" else a
             for i, a in enumerate(without_option(given, "--logs"))]
    payload = {"data": Path(args.data).name, "device": args.device or "each command's default", "finished": final,
               "steps_asked": steps, "steps": record,
               "build_plus_train_seconds": round(sum(measured), 1) if len(measured) == 2 else None,
               "city": city, "street_heldout_test": heldout,
               "command": "python benchmarks/pipeline_timing.py " + " ".join(shown)}
    save(f"pipeline_timing{args.tag}", payload)
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # an abbreviated --logs would escape without_option
    parser.add_argument("--data", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                        help="passed to every step [default: each command's own]")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"a comma list of {', '.join(STEPS)}")
    parser.add_argument("--tag", default="", help="appended to the results files' names")
    parser.add_argument("--logs", default=None, help="where each step's log goes [default: a temporary folder]")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")

    logs = Path(args.logs or tempfile.mkdtemp(prefix="pipeline-timing-"))
    logs.mkdir(parents=True, exist_ok=True)
    record, failed = {}, set()
    for step in steps:
        if NEEDS.get(step) in failed:
            record[step] = {"skipped": f"{NEEDS[step]} failed"}
            failed.add(step)
            continue
        command = [sys.executable, *_command(step, args)]
        shown = [str(Path(a).relative_to(ROOT)) if Path(a).is_absolute() and Path(a).is_relative_to(ROOT) else a
                 for a in command[1:]]
        print("$ python " + " ".join(shown), flush=True)
        record[step] = {"running": True}  # what a run stopped at a time limit was doing
        _save(args, argv, steps, record, final=False)
        started = time.perf_counter()
        with open(logs / f"{step}.log", "w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        seconds = time.perf_counter() - started
        record[step] = {"seconds": round(seconds, 1), "exit": done.returncode}
        print(f"  {step}: {seconds:.1f} s, exit {done.returncode}", flush=True)
        if done.returncode:
            failed.add(step)
            record[step]["log_tail"] = (logs / f"{step}.log").read_text(errors="replace").splitlines()[-15:]
            print("\n".join("  | " + line for line in record[step]["log_tail"]), flush=True)
    payload = _save(args, argv, steps, record, final=True)
    print(json.dumps({k: payload[k] for k in ("build_plus_train_seconds", "city", "street_heldout_test")}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
