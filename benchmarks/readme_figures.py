"""Writes the README's measured figures from the results the benchmark scripts saved, so they cannot drift apart.

    python benchmarks/readme_figures.py            # rewrite the README's figure blocks from benchmarks/results/
    python benchmarks/readme_figures.py --check    # exit 1, naming each block, where the README differs

A figure block is the text between `<!-- figures:NAME -->` and `<!-- /figures -->` in README.md; each NAME has a
writer below that reads one results file (written by the script the block names) and returns the block's text.
After rerunning a benchmark, rerun this script: the README then says what the new results say.
tests/test_readme_figures.py runs the check on the committed README and results.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
README = BENCHMARKS.parent / "README.md"
BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.S)


def _load(name: str, results: Path) -> dict:
    return json.loads((results / name).read_text())


def _pct(share: float) -> str:
    return f"{100 * share:.1f}%"


def openset(results: Path) -> str:
    """The open-set paragraph, from `python benchmarks/openset.py --index london`."""
    data = _load("openset_london.json", results)
    rows = data["rows"]
    test_knn, foreign_knn = rows["test/knn"], rows["foreign/knn"]
    head = next(k.split("/", 1)[1] for k in rows if k.startswith("foreign/classifier"))
    test_head, foreign_head = rows[f"test/{head}"], rows[f"foreign/{head}"]
    flagged = round(foreign_knn["share_unlike_indexed"] * foreign_knn["n"])
    return _wrap(f"**Photos from none of the index's cities.** The {foreign_knn['n']} OSV-5M photos of "
                 f"`../shared/data/real/osv5m-sample` (70 towns worldwide) still get an answer, but a less sure one: "
                 f"on the `{data['index']}` index ({data['backbone']}), mean top probability "
                 f"{foreign_knn['mean_top_probability']:.2f} (kNN) and {foreign_head['mean_top_probability']:.2f} "
                 f"({head.split(':')[-1]}) against {test_knn['mean_top_probability']:.2f} and "
                 f"{test_head['mean_top_probability']:.2f} on the {test_knn['n']} test photos; kNN flags "
                 f"{_pct(foreign_knn['share_unlike_indexed'])} ({flagged} of {foreign_knn['n']}) of them as unlike "
                 f"anything indexed ({_pct(test_knn['share_unlike_indexed'])} of test photos), and `geoindex query` "
                 "and the page say so for each. A two-city index cannot say \"neither\": read its probabilities as "
                 f"\"which of these two\", not \"where\". (`{data['command']}`, {data['date']}, {data['machine']}: "
                 "`results/openset_london.json`.)")


def _wrap(paragraph: str) -> str:
    """Lines of at most 115 characters, never broken inside a `code span`."""
    glued = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\0"), paragraph)
    return textwrap.fill(glued, width=115, break_long_words=False, break_on_hyphens=False).replace("\0", " ") + "\n"


def heldout(results: Path) -> str:
    """The held-out-places table and its timings, from `python benchmarks/heldout.py`."""
    data = _load("heldout.json", results)
    scored = [r for r in data["rows"] if "method" in r]
    timed = {r["train_mode"]: r for r in data["rows"] if "seconds" in r}

    def row(mode, set_name, method):
        return next(r for r in scored if (r["train_mode"], r["set"], r["method"]) == (mode, set_name, method))

    methods = [("knn", "kNN"), ("classifier:probe", "classifier: probe"), ("hybrid", "hybrid")]
    n_test, n_external = row("auto", "test", "knn")["n"], row("auto", "external", "knn")["n"]
    auto = timed["auto"]["seconds"]
    lines = [_wrap(f"The default pipeline, each command as a user types it, on a {data['machine']['cpus']}-core CPU: "
                   f"build {auto['build']:.0f} s, `train` {auto['train']:.0f} s, `bench --external` "
                   f"{auto['bench']:.0f} s, **{timed['auto']['total_seconds'] / 60:.1f} min** in all "
                   f"({data['created'][:10]}; index built from {data['split']['index_photos']:,} photos)."), 
             f"| `geoindex train` | method | internal test ({n_test}) | **held-out east ({n_external:,})** | "
             "held-out macro-F1 | held-out median km |", "|---|---|---|---|---|---|"]
    for method, title in methods:
        test, external = row("auto", "test", method), row("auto", "external", method)
        lines.append(f"| default (tail adapted) | {title} | {test['accuracy']:.3f} | **{external['accuracy']:.3f}** | "
                     f"{external['macro_f1']:.3f} | {external['median_km']:.1f} |")
    if "probe" in timed:
        tests = [row("probe", "test", m) for m, _ in methods]
        externals = [row("probe", "external", m) for m, _ in methods]
        lines.append("| `--mode probe` (the previous default) | kNN / probe / hybrid | "
                     + " / ".join(f"{r['accuracy']:.3f}" for r in tests) + " | "
                     + " / ".join(f"{r['accuracy']:.3f}" for r in externals) + " | | "
                     + " / ".join(f"{r['median_km']:.1f}" for r in externals) + " |")
    dropped = data["split"]["external_photos"] - n_external
    lines += ["", f"({dropped} of the {data['split']['external_photos']:,} held-out photos share a 1 km cell with an "
              "index photo and are dropped by `bench --external`.)"]
    return "\n".join(lines) + "\n"


WRITERS = {"openset": openset, "heldout": heldout}


def render(readme_text: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """The README with every figure block rewritten, and the names of the blocks that changed."""
    changed = []

    def replace(match):
        name = match.group("name")
        if name not in WRITERS:
            raise SystemExit(f"README block figures:{name} has no writer in {Path(__file__).name} "
                             f"(known: {', '.join(WRITERS)})")
        body = WRITERS[name](results)
        if body != match.group("body"):
            changed.append(name)
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, readme_text), changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    new, changed = render(text, args.results)
    if args.check:
        if changed:
            print(f"README figure blocks out of date with {args.results}: {', '.join(changed)}; run "
                  "python benchmarks/readme_figures.py", file=sys.stderr)
            return 1
        print("README figure blocks match the results")
        return 0
    if changed:
        args.readme.write_text(new)
    print(f"rewrote {', '.join(changed)}" if changed else "README figure blocks already match the results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
