"""The default pipeline on photos of places no index photo comes near: build, train, bench --external, timed.

    python benchmarks/heldout.py --data ../shared/data/real/london-or-london [--train-modes auto,probe]
        [--backbones effnet-duo] [--external-fraction 0.33] [--workdir DIR]

What a user runs, as separate commands (`geoindex build --data index.csv`, `geoindex train [--mode M]`,
`geoindex bench --external external.csv`), on a geographic split of a geotagged CSV: per city, the photos
east of a longitude (the last --external-fraction of them) are held out entirely and scored only as the
external set, so they come from areas the index never saw, farther than any 1 km cell split puts them;
the index is built from the rest (and splits those by 1 km cells into train/val/test as usual).
For each backbone and `train` mode it reports the internal test split and the external photos
(accuracy, macro-F1, median km, per method) and the wall time of each command; saves
benchmarks/results/heldout<tag>.json. Everything is tuned on the index's val split only.
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

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402


def geographic_split(data: Path, fraction: float, workdir: Path, per_city: int | None = None) -> tuple[Path, Path, dict]:
    """index.csv (per city, the western 1 - fraction of photos) and external.csv (the eastern fraction)."""
    table = pd.read_csv(data / "index.csv") if data.is_dir() else pd.read_csv(data)
    if per_city:  # a seeded sample of each city, for a quick run
        table = pd.concat([g.sample(min(len(g), per_city), random_state=0) for _, g in table.groupby("city")])
    root = (data if data.is_dir() else data.parent).resolve()  # the CSVs are written elsewhere: absolute paths
    table["path"] = [str(p) if Path(p).is_absolute() else str(root / p) for p in table["path"]]
    index_rows, external_rows, cut = [], [], {}
    for city, group in table.groupby("city"):
        group = group.sort_values("lon", kind="stable")
        n_external = int(round(len(group) * fraction))
        index_rows.append(group.iloc[:len(group) - n_external])
        external_rows.append(group.iloc[len(group) - n_external:])
        cut[city] = float(group["lon"].iloc[len(group) - n_external])
    index_csv, external_csv = workdir / "index.csv", workdir / "external.csv"
    pd.concat(index_rows).to_csv(index_csv, index=False)
    pd.concat(external_rows).to_csv(external_csv, index=False)
    return index_csv, external_csv, {"external_east_of_lon": cut, "index_photos": int(sum(map(len, index_rows))),
                                     "external_photos": int(sum(map(len, external_rows)))}


def run(args: list[str], env: dict, log_file) -> float:
    start = time.perf_counter()
    print("$ geoindex " + " ".join(args), flush=True)
    result = subprocess.run([sys.executable, "-m", "geoindex.cli", *args], env=env, stdout=log_file,
                            stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"geoindex {' '.join(args)} failed (exit {result.returncode}); see {log_file.name}")
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a geotagged CSV, or a folder with index.csv")
    parser.add_argument("--backbones", default="auto", help="comma-separated; auto = build's default")
    parser.add_argument("--train-modes", default="auto,probe", help="geoindex train --mode values to compare")
    parser.add_argument("--external-fraction", type=float, default=1 / 3)
    parser.add_argument("--per-city", type=int, default=None, help="a seeded sample of this many photos per city")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="geoindex-heldout-"))
    workdir.mkdir(parents=True, exist_ok=True)
    index_csv, external_csv, split = geographic_split(Path(args.data), args.external_fraction, workdir,
                                                           args.per_city)
    print(f"index photos {split['index_photos']}, external photos {split['external_photos']} "
          f"(east of longitude {split['external_east_of_lon']})")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GEOINDEX_HOME": str(workdir / "indexes"),
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    rows = []
    with open(workdir / "log.txt", "a") as log_file:
        for backbone in args.backbones.split(","):
            for mode in args.train_modes.split(","):
                name = f"heldout-{backbone}-{mode}"
                seconds = {"build": run(["build", "--data", str(index_csv), "--name", name, "--overwrite"]
                                        + ([] if backbone == "auto" else ["--backbone", backbone]), env, log_file)}
                seconds["train"] = run(["train", "--index", name] + ([] if mode == "auto" else ["--mode", mode]), env,
                                       log_file)
                seconds["bench"] = run(["bench", "--index", name, "--external", str(external_csv)], env, log_file)
                results = json.loads((workdir / "indexes" / name / "bench" / "results.json").read_text())
                for set_name, scored in results["sets"].items():
                    for method, m in scored["methods"].items():
                        if "accuracy" not in m:
                            continue
                        rows.append({"backbone": results["backbone"], "train_mode": mode, "set": set_name,
                                     "method": method, "n": m["n"], "accuracy": m["accuracy"],
                                     "macro_f1": m["macro_f1"], "median_km": m.get("median_km")})
                total = sum(seconds.values())
                rows.append({"backbone": results["backbone"], "train_mode": mode, "seconds": seconds,
                             "total_seconds": total})
                print(f"{results['backbone']} train --mode {mode}: build {seconds['build']:.0f} s, train "
                      f"{seconds['train']:.0f} s, bench {seconds['bench']:.0f} s = {total / 60:.1f} min", flush=True)
    print(f"\n{'backbone':12} {'train':6} {'set':10} {'method':18} {'n':>5} {'accuracy':>9} {'macro-F1':>9} {'median km':>10}")
    for r in rows:
        if "set" in r:
            print(f"{r['backbone']:12} {r['train_mode']:6} {r['set']:10} {r['method']:18} {r['n']:5d} {r['accuracy']:9.3f} "
                  f"{r['macro_f1']:9.3f} {r['median_km'] if r['median_km'] is not None else float('nan'):10.1f}")
    save(f"heldout{args.tag}", {"command": "python benchmarks/heldout.py " + " ".join(sys.argv[1:]), "data": args.data,
                                "split": split, "rows": rows, "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
