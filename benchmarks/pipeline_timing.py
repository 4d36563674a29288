"""The README's main job, step by step and timed: `geoindex build`, `train` and `bench` on one data set, on the
device a user would give them, then issue 22's acceptance path (benchmarks/street_heldout.py) on the result.

    python benchmarks/pipeline_timing.py --data ../shared/data/real/london-or-london --name NAME \
        [--device auto|cpu|cuda] [--steps build,train,heldout,bench] [--tag _x]

Each step is the product's own command in a child process (`python -m geoindex.cli ...`), so a figure here is
what a user's shell would see, model loading and process start included. A step that fails is recorded with its
exit status and the end of its log, and the steps after it that need it are skipped. Saves
benchmarks/results/pipeline_timing<--tag>.json: seconds per step, the machine (CPU count, GPU name), the test
split's city accuracy of kNN and the best method from bench's results.json, and the acceptance path's GPS figures.
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
    device = ["--device", args.device]
    if step == "build":
        return ["-m", "geoindex.cli", "build", "--data", args.data, "--name", args.name, "--overwrite", *device]
    if step == "train":
        return ["-m", "geoindex.cli", "train", "--index", args.name, *device]
    if step == "bench":
        return ["-m", "geoindex.cli", "bench", "--index", args.name, *device]
    # the acceptance path: its own `build --features-from` and `query` run on the device auto picks
    return [str(Path(__file__).with_name("street_heldout.py")), "--index", args.name, f"--tag={args.tag}"]


def _city_figures(index_path: Path) -> dict | None:
    results = index_path / "bench" / "results.json"
    if not results.exists():
        return None
    table = json.loads(results.read_text())["sets"]["test"]["methods"]
    accuracy = {method: row["accuracy"] for method, row in table.items() if "accuracy" in row}
    return {"test_accuracy": accuracy, "knn": accuracy.get("knn"), "best": max(accuracy.values(), default=None)}


def _save(args, argv, steps, record, failed, final: bool) -> dict:
    from geoindex.locate import resolve_index_path

    try:
        city = _city_figures(resolve_index_path(args.name))
    except Exception as error:  # noqa: BLE001 - no index (its build failed): the record says why
        city = {"error": str(error)}
    heldout_file = RESULTS / f"street_heldout_test{args.tag}.json"
    heldout = json.loads(heldout_file.read_text())["figures"] if "heldout" in record and "heldout" not in failed \
        and heldout_file.exists() else None
    measured = [record[s]["seconds"] for s in ("build", "train") if "seconds" in record.get(s, {})]
    payload = {"data": Path(args.data).name, "device": args.device, "finished": final,
               "steps_asked": steps, "steps": record,
               "build_plus_train_seconds": round(sum(measured), 1) if len(measured) == 2 else None,
               "city": city, "street_heldout_test": heldout,
               "command": "python benchmarks/pipeline_timing.py " + " ".join(without_option(argv or sys.argv[1:], "--logs"))}
    save(f"pipeline_timing{args.tag}", payload)
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
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
        shown = [str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT)) else a for a in command[1:]]
        print("$ python " + " ".join(shown), flush=True)
        started = time.perf_counter()
        with open(logs / f"{step}.log", "w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        seconds = time.perf_counter() - started
        tail = (logs / f"{step}.log").read_text(errors="replace").splitlines()[-15:]
        record[step] = {"seconds": round(seconds, 1), "exit": done.returncode}
        print(f"  {step}: {seconds:.1f} s, exit {done.returncode}", flush=True)
        if done.returncode:
            failed.add(step)
            record[step]["log_tail"] = tail
            print("\n".join("  | " + line for line in tail), flush=True)
        _save(args, argv, steps, record, failed, final=False)  # a run stopped at a time limit keeps what finished
    payload = _save(args, argv, steps, record, failed, final=True)
    print(json.dumps({k: payload[k] for k in ("build_plus_train_seconds", "city", "street_heldout_test")}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
