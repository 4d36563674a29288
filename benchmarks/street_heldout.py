"""Issue 22's acceptance path on photos we have: a gallery indexed with a trained index's features, its revisit
queries asked through `geoindex query --json`, the GPS answer scored within 25 m.

    python benchmarks/street_heldout.py --index NAME [--split test] [--gallery all|split]

The queries are the revisit queries of NAME's `--split` (a photo that has a capture of another date within 25 m
and is the newest within 25 m of itself; with a split by map cell, places NAME never trained on). The gallery
CSV holds every other photo of NAME (`--gallery all`: the queries' spots are there only through the split's older
captures, the rest are distractors) or only the split's other photos (`--gallery split`). Then, as separate
commands, exactly what the issue's check runs:

    geoindex build --data gallery.csv --features-from NAME --name NAME-gallery-SPLIT
    geoindex query --index NAME-gallery-SPLIT --json queries.csv

and scores each answer's `gps` (share within 25 m, 100 m and 1 km, median metres, share answered at street level
and how often those are right) and whether the first neighbour lies within 25 m. Saves
benchmarks/results/street_heldout_<split>.json.
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

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save, without_option  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # an abbreviated --workdir would escape without_option
    parser.add_argument("--index", required=True)
    parser.add_argument("--index-dir", default=None)
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--gallery", default="all", choices=("all", "split"))
    parser.add_argument("--tag", default="", help="appended to the results file's name")
    parser.add_argument("--workdir", default=None, help="where the CSVs and logs go [default: a temporary folder]")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                        help="for its build and query [default: theirs]")
    args = parser.parse_args(argv)

    from geoindex.geo_index import load_index
    from geoindex.locate import resolve_index_path
    from geoindex.revisit import revisit_queries
    from geoindex.voting import haversine_km

    path = resolve_index_path(args.index, args.index_dir)
    index = load_index(path, device="cpu")
    table = pd.concat([index.store.metadata(s).assign(split=s) for s in ("train", "val", "test")
                       if index.store.count(s)], ignore_index=True)
    dated = (table["yyyymm"] >= 0) & np.isfinite(table["lat"]) & np.isfinite(table["lon"])
    is_query = np.zeros(len(table), dtype=bool)
    is_query[np.flatnonzero(dated)] = revisit_queries(table["lat"][dated].to_numpy(), table["lon"][dated].to_numpy(),
                                                      table["yyyymm"][dated].to_numpy())
    is_query &= (table["split"] == args.split).to_numpy()
    gallery = table[~is_query] if args.gallery == "all" else table[~is_query & (table["split"] == args.split)]
    queries = table[is_query]
    home = Path(index.path).parent
    gallery_name = f"{index.name}-gallery-{args.split}"
    index.close()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="street-heldout-"))
    workdir.mkdir(parents=True, exist_ok=True)
    columns = ["path", "city", "lat", "lon", "yyyymm"]
    gallery[columns].to_csv(workdir / "gallery.csv", index=False)
    queries[["path", "city"]].to_csv(workdir / "queries.csv", index=False)  # no coordinates: nothing to leak
    env = dict(os.environ, GEOINDEX_HOME=str(home))
    timings = {}
    with open(workdir / "log.txt", "w") as log:
        for step, command in (("build", ["build", "--data", str(workdir / "gallery.csv"), "--features-from",
                                         str(path), "--name", gallery_name, "--overwrite"]),
                              ("query", ["query", "--index", gallery_name, "--json", str(workdir / "queries.csv")])):
            command += ["--device", args.device] if args.device else []
            print("$ geoindex " + " ".join(command), flush=True)
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "geoindex.cli", *command], env=env,
                                  stdout=subprocess.PIPE if step == "query" else log, stderr=log)
            timings[step] = time.perf_counter() - started
            if done.returncode:
                sys.exit(f"geoindex {step} failed (exit {done.returncode}); see {workdir / 'log.txt'}")
    answers = json.loads(done.stdout)
    by_source = {Path(r["source"]).resolve(): r for r in answers["results"]}
    rows = []
    for q in queries.itertuples():
        r = by_source.get(Path(q.path).resolve())
        if r is None:
            continue
        gps = r.get("gps") or {}
        first = (r.get("neighbors") or r.get("neighbours") or [{}])[0]
        rows.append({"error_m": float(haversine_km(q.lat, q.lon, gps.get("lat", np.nan), gps.get("lon", np.nan))
                                      * 1000) if gps.get("lat") is not None else np.inf,
                     "level": gps.get("level"),
                     "first_m": float(haversine_km(q.lat, q.lon, first.get("lat", np.nan), first.get("lon", np.nan))
                                      * 1000) if first.get("lat") is not None else np.inf})
    scored = pd.DataFrame(rows)
    error = np.nan_to_num(scored["error_m"].to_numpy(), nan=np.inf)
    street = (scored["level"] == "street").to_numpy()
    figures = {"queries": int(len(queries)), "answered": int(len(scored)), "gallery_photos": int(len(gallery)),
               **{f"gps_within_{m}m": float((error <= m).mean()) for m in (25, 100, 1000)},
               "gps_median_m": float(np.median(error)),
               "street_share": float(street.mean()),
               "street_precision_25m": float((error[street] <= 25).mean()) if street.any() else None,
               "first_neighbour_within_25m": float((np.nan_to_num(scored["first_m"], nan=np.inf) <= 25).mean()),
               "seconds": timings}
    print(json.dumps(figures, indent=2))
    save(f"street_heldout_{args.split}{args.tag}", {"index": args.index, "split": args.split, "gallery": args.gallery,
                                          "figures": figures,
                                          "command": "python benchmarks/street_heldout.py " + " ".join(without_option(argv or sys.argv[1:], "--workdir"))})


if __name__ == "__main__":
    main()
