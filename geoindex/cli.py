"""The `geoindex` command: a thin layer over the Python API (every command is one API call)."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .catalog import BACKBONES, NO_PRETRAINED, weights_status
from .layout import CHECKPOINT, HEAD_META, HEAD_MODES, KNN_PARAMS, TAIL_MODE, TRUNK_CACHE, head_dir
from .cities import full_name
from .config import (DTYPES, INDEX_TYPES, MODE_DEFAULTS, PLACE_DEFAULTS, SPLIT_UNITS, TRAIN_MODES, BuildConfig,
                     ExtractionConfig, QueryConfig, TrainConfig)
from .jsonio import dumps
from .errors import GeoindexError
from .runtime_choice import PRECISIONS, runtime_option

VOTE_METHODS = ("majority", "weighted", "softmax")  # geoindex.voting.VOTE_METHODS, without importing numpy


def list_backbones():
    return sorted(BACKBONES)

index_dir_option = click.option("--index-dir", type=click.Path(file_okay=False), default=None,
                                help="Where indexes live [default: $GEOINDEX_HOME or ./indexes].")


def device_option(default: str):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=default, show_default=True,
                        help="auto uses a CUDA GPU when torch sees one.")


def _mode_defaults(setting: str) -> str:
    """'[default: tail 6, probe 30, finetune 10]' from config.MODE_DEFAULTS, for train's help."""
    return "[default: " + ", ".join(f"{mode} {values[setting]:g}" for mode, values in MODE_DEFAULTS.items()) + "]"


def friendly_errors(func):
    """User errors become one line and exit 1; Ctrl-C (and SIGTERM during a build) exits 130 without a traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except GeoindexError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted; rerun the same command to resume where it stopped", err=True)
            sys.exit(130)
        except OSError as exc:  # a read-only folder, a full disk, a file where a folder should be
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="geoindex")
def main():
    """Tell which city a street-level photo was taken in.

    \b
    geoindex build --data PATH     embed photos (GSV-Cities tree, <city>/*.jpg folder or CSV manifest), index them
    geoindex train                 adapt the backbone's last stages to the cities (EfficientNet-Lite), then
                                   train a classifier head and tune kNN and their fusion on the validation split
    geoindex query PHOTO|FOLDER    the city (led by the method best on val), a GPS estimate, the nearest photos
    geoindex bench                 score kNN, classifier, zero-shot and hybrid on the same photos
    geoindex indexes               list built indexes
    geoindex backbones             list embedding backbones and their weights
    geoindex rm NAME               remove an index (only folders geoindex made)
    geoindex relocate NAME DIR     point an index at its photos' new folder
    geoindex serve                 a web page and an HTTP API that keep the model loaded
    geoindex demo                  build, train, query and score end to end on a sample

    \b
    Environment: GEOINDEX_HOME (where indexes live, default ./indexes), GEOINDEX_OFFLINE=1 (never download
    weights; also detected automatically when the network is unreachable), GEOINDEX_RUNTIME (--runtime).
    """


@main.command()
@click.option("--data", "data", required=True, type=click.Path(exists=True),
              help="A GSV-Cities root (Images/<City>/...), a folder of <city>/*.jpg, or a CSV manifest "
                   "(path, city[, lat, lon, place_id]; OSV-5M's metadata CSV works too).")
@click.option("--split-by", type=click.Choice(SPLIT_UNITS), default=BuildConfig.split_by, show_default=True,
              help="Unit of the train/val/test split. auto: place ids where the data has them, else map cells where "
                   "it has coordinates, else images (with a warning: photos metres apart can leak into test).")
@click.option("--cell-km", type=click.FloatRange(min=0.01), default=BuildConfig.cell_km, show_default=True,
              help="Side of the map cells of --split-by cell; each cell lies wholly in one split.")
@click.option("--follow-symlinks", is_flag=True, default=BuildConfig.follow_symlinks,
              help="Index symlinks that point outside the data folder "
              "(skipped with their reason by default).")
@click.option("--backbone", default="auto", show_default=True,
              type=click.Choice(["auto", *list_backbones()]),
              help="auto: effnet-duo (EfficientNet-Lite0 + Lite2), the most accurate offline backbone on real photos "
                   "(benchmarks/accuracy.md); effnet (Lite0 alone) is the fastest.")
@click.option("--weights", default=None, help="A state-dict file, or 'none' for seeded random weights "
              "[default: the library's pretrained weights from its cache].")
@click.option("--name", default=None, help="Index name [default: <data folder>-<backbone>].")
@click.option("--features-from", "features_from", default=BuildConfig.features_from, metavar="NAME",
              help="Embed with index NAME's backbone and tuned weights and copy its kNN settings (street-level GPS "
                   "calibration included); no split: every photo is searchable, NAME did the training and tuning. "
                   "Run `geoindex train --index NAME` first.")
@click.option("--per-city", type=click.IntRange(1), default=BuildConfig.per_city,
              help="Use about N images per city (whole places).")
@click.option("--image-size", type=click.IntRange(16), default=ExtractionConfig.image_size,
              help="Model input size [default: the backbone's].")
@click.option("--batch-size", type=click.IntRange(1), default=ExtractionConfig.batch_size, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=ExtractionConfig.num_workers,
              help="Decoding processes [default: none on a CPU, where threads of this process decode beside the "
                   "model; cores - 1 feeding a GPU].")
@device_option(ExtractionConfig.device)
@runtime_option
@click.option("--precision", type=click.Choice(PRECISIONS), default=ExtractionConfig.precision, show_default=True,
              help="auto: bf16 where OpenVINO computes it natively (a CPU with AMX or AVX512-BF16: 1.7-2.2x "
                   "fp32's speed, embeddings within a checked cosine of 0.98 of fp32's, interchangeable with them), "
                   "else fp32. int8: the model quantized by NNCF (OpenVINO on a CPU; calibrated on a few hundred of "
                   "the index's train photos, once), faster still, within a checked cosine of 0.90; queries embed at "
                   "auto. The manifest records what ran; benchmarks/README.md has what each does to accuracy.")
@click.option("--index-type", "index_type", type=click.Choice(INDEX_TYPES), default=BuildConfig.index_type,
              show_default=True, help="flat: exact search; hnsw: the choice for large indexes (graph + exact "
                                      "re-ranking, fast one photo at a time); ivfpq: compressed, the smallest index.")
# Deprecated: --index names an index in every other command. Kept for one release, with a note.
@click.option("--index", "old_index_type", type=click.Choice(INDEX_TYPES), default=None, hidden=True)
@click.option("--seed", type=int, default=BuildConfig.seed, show_default=True, help="Seed of the place-disjoint split.")
@click.option("--dtype", type=click.Choice(DTYPES), default=BuildConfig.dtype, show_default=True,
              help="How embeddings are stored in embeddings.h5.")
@click.option("--overwrite", is_flag=True, help="Rebuild an existing index of this name (it keeps answering until the "
              "new one replaces it; unchanged photos are not embedded again), or discard an unfinished build "
              "with other settings.")
@click.option("--max-pixels", type=click.IntRange(1), default=BuildConfig.max_pixels, show_default=True,
              help="Refuse images with more pixels than this (JPEGs counted at their draft-decoded size), before "
                   "decoding them.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default=BuildConfig.engine, show_default=True,
              help="Who embeds: this process, or shards as tasks on a Ray cluster (pip install 'geoindex[ray]').")
@click.option("--ray-address", default=None, help="A running Ray cluster ('auto' or HOST:PORT) "
              "[default: a private Ray instance on this machine].")
@index_dir_option
@friendly_errors
def build(data, split_by, cell_km, follow_symlinks, backbone, weights, name, features_from, per_city, image_size,
          batch_size, workers, device, precision, index_type, old_index_type, seed, dtype, overwrite, max_pixels, engine,
          ray_address, index_dir):
    """Embed every image, split by place or map cell (80/10/10), and index the train split.

    An interrupted build resumes when the same command is run again.
    """
    from .build import build_index
    from .engines import get_engine

    if old_index_type is not None:
        source = click.get_current_context().get_parameter_source("index_type")
        if source is not None and source.name != "DEFAULT" and index_type != old_index_type:
            raise click.UsageError(f"--index {old_index_type} and --index-type {index_type} disagree; "
                                   "give --index-type only")
        click.echo(f"note: `build --index {old_index_type}` is deprecated and will be removed in the next release; "
                   f"write `--index-type {old_index_type}` (--index names an index in every other command)", err=True)
        index_type = old_index_type
    config = BuildConfig(per_city=per_city, follow_symlinks=follow_symlinks, max_pixels=max_pixels, split_by=split_by,
                         cell_km=cell_km, seed=seed, dtype=dtype, index_type=index_type,
                         engine=get_engine(engine, address=ray_address), features_from=features_from,
                         extraction=ExtractionConfig(batch_size=batch_size, num_workers=workers, device=device,
                                                     image_size=image_size, precision=precision))
    report = build_index(data, name=name, backbone=backbone, config=config, weights=weights, index_dir=index_dir,
                         overwrite=overwrite, log=click.echo)
    m = report.manifest
    click.echo(f"\nindex {report.name!r} written to {report.path}")
    click.echo(f"  backbone   {m['backbone']} ({m['weights']['source']} weights), {m['embed_dim']}-d")
    source = m.get("features_from")
    if source:
        click.echo(f"  features   from index {source['name']!r} ({'adapted' if source.get('adapted') else 'not adapted'}"
                   f", build {source['build_id']})")
        for part in source["copied"] or ["nothing but its backbone: it has no tuned weights or kNN tuning"]:
            click.echo(f"  copied     {part}")
        for part in source["not_copied"]:
            click.echo(f"  not copied {part}")
        click.echo(f"  images     {m['counts']['train']} searchable across {len(m['classes'])} cities (no split: "
                   f"{source['name']!r} did the training and tuning)")
    else:
        click.echo("  images     " + ", ".join(f"{s} {m['counts'][s]}" for s in ("train", "val", "test"))
                   + f" across {len(m['classes'])} cities")
    click.echo(f"  embedded   {report.extracted_rows} photo(s) this run, {report.failed_rows} unreadable"
               + (f", {report.resumed_rows} reused from checkpoints or the replaced index" if report.resumed_rows else "")
               + (f"; {report.images_per_second:.1f} photos/s" if report.extracted_rows else ""))
    index = m["index"]
    recall = {k: v for k, v in index.items() if k.startswith("recall@")}
    click.echo(f"  index      {index['type']} {index['params'] or ''} {index['bytes'] / 1e6:.1f} MB"
               + (f", {', '.join(f'{k} {v}' for k, v in recall.items())}" if recall else ""))
    click.echo(f"  skipped    {len(report.skipped)} file(s)" + (" (all listed in skipped.json)" if report.skipped else ""))
    for item in report.skipped[:10]:
        click.echo(f"    {item['path']}: {item['reason']}")
    if len(report.skipped) > 10:
        click.echo(f"    ... and {len(report.skipped) - 10} more")
    if report.duplicates:
        cross = sum(1 for d in report.duplicates if len(set(d["cities"])) > 1)
        click.secho(f"  duplicates {len(report.duplicates)} photo(s) stored more than once, {cross} under different "
                    "cities; copies outside train were kept out of evaluation (see skipped.json)", fg="yellow")
    if m.get("synthetic"):
        click.secho("  NOTE: built on SYNTHETIC images; these figures say nothing about real photos", fg="yellow")


@main.command()
@click.argument("photos", nargs=-1, required=True, type=click.Path())
@click.option("--index", "index_name", default=None, help="Index name or path [default: the latest built].")
@click.option("--k", type=click.IntRange(1), default=QueryConfig.k,
              help="Neighbours that vote [default: tuned on val].")
@click.option("--vote", "vote_method", type=click.Choice(VOTE_METHODS), default=QueryConfig.vote_method,
              help="[default: tuned on val]")
@click.option("--temperature", type=click.FloatRange(min=1e-4), default=QueryConfig.temperature,
              help="Softmax vote temperature on cosine similarity.")
@click.option("--backbone", default=None, help="Refuse to run unless the index was built with this backbone.")
@click.option("--json", "as_json", is_flag=True, help="Strict JSON: {index, results, errors}.")
@click.option("--csv", "as_csv", is_flag=True, help="One CSV row per photo, in the order given (for batch queries).")
@click.option("--batch-size", type=click.IntRange(1), default=QueryConfig.batch_size, show_default=True,
              help="Photos decoded and embedded together; memory stays flat in the number of photos.")
@click.option("--verify", is_flag=True, default=QueryConfig.verify,
              help="Hash every index file in full before answering.")
@device_option(QueryConfig.device)
@runtime_option
@index_dir_option
@friendly_errors
def query(photos, index_name, k, vote_method, temperature, backbone, as_json, as_csv, batch_size, verify, device,
          index_dir):
    """Which city? Top-5 cities, a GPS estimate and the nearest indexed photos, per photo.

    PHOTOS are image files, folders (a folder stands for its images, sorted by name) or CSV manifests (the photos
    of their path column, relative to the CSV's folder, in the CSV's order). The answer leads with
    the method most accurate on the index's validation split (kNN, the classifier, or their fusion) and shows
    the others beside it. Every photo that can be read is answered; each one that cannot is reported, in
    order (exit status 1).
    """
    from tqdm.auto import tqdm

    from .errors import BackboneMismatch, ImageError
    from .geo_index import load_index
    from .images import DEFAULT_MAX_PIXELS, load_image

    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    photos = _expand_photo_arguments(photos)
    index = load_index(index_name, index_dir, device=device, verify=verify)
    if backbone is not None and backbone != index.manifest["backbone"]:
        raise BackboneMismatch(f"index {index.name!r} was built with backbone {index.manifest['backbone']!r}, "
                               f"not {backbone!r}; query it without --backbone or build one with {backbone!r}")
    # Building the backbone (weights from disk, model set-up) takes seconds before the first answer: say so to a
    # person watching (a terminal), not into a pipe or a script's captured errors.
    if sys.stderr.isatty():
        click.echo(f"loading {index.manifest['backbone']} for index {index.name!r}...", err=True)
    # Decoded exactly as the build decoded its photos, once each, and handed to the model as images.
    draft = index.backbone.transform.resize_size
    max_pixels = (index.manifest.get("preprocessing") or {}).get("max_pixels", DEFAULT_MAX_PIXELS)
    out = _QueryOutput(index, "json" if as_json else "csv" if as_csv else "text")
    out.start()
    with tqdm(total=len(photos), desc="querying", unit="photo", disable=len(photos) <= 8, file=sys.stderr) as bar:
        for start in range(0, len(photos), batch_size):
            batch = photos[start:start + batch_size]
            loaded: list = []  # per photo of the batch: its image, or the error saying why not
            for photo in batch:
                try:
                    loaded.append(load_image(photo, draft_size=draft, max_pixels=max_pixels))
                except ImageError as exc:
                    loaded.append(exc)
            images = [item for item in loaded if not isinstance(item, ImageError)]
            # spatial verification reads the files themselves (not the model's draft-decoded images), as the
            # service reads an upload's bytes
            files = [photo for photo, item in zip(batch, loaded) if not isinstance(item, ImageError)]
            predictions = iter(index.query(images, k=k, vote_method=vote_method, temperature=temperature,
                                           verify_sources=files) if images else [])
            for photo, item in zip(batch, loaded):  # written in the order given, errors in their place
                if isinstance(item, ImageError):
                    out.error(photo, str(item))
                else:
                    prediction = next(predictions)
                    prediction.source = photo
                    out.result(prediction)
            bar.update(len(batch))
    out.finish()
    if out.errors:
        sys.exit(1)


def _expand_photo_arguments(arguments) -> list[str]:
    """Files as given; a CSV manifest becomes the photos it lists, in its order (its path column, relative to the
    CSV's folder); a folder becomes its image files (by extension), sorted by name. A folder with none at its top
    level is a dataset: read through its one CSV manifest when it has one, else its image files at any depth."""
    import os

    from .data.manifest import find_manifest_in, listed_photos
    from .images import IMAGE_EXTENSIONS

    def is_image(name):
        return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS

    photos = []
    for argument in arguments:
        if os.path.isdir(argument):
            found = sorted(e.path for e in os.scandir(argument) if is_image(e.name) and e.is_file())
            if not found:
                manifest = find_manifest_in(Path(argument))
                found = listed_photos(manifest) if manifest is not None else sorted(
                    os.path.join(top, name) for top, _, names in os.walk(argument) for name in names if is_image(name))
            if not found:
                raise click.UsageError(f"{argument}: a folder with no image files ({', '.join(IMAGE_EXTENSIONS)})")
            photos.extend(found)
        elif argument.lower().endswith(".csv") and os.path.isfile(argument):
            photos.extend(listed_photos(argument))
        else:
            photos.append(argument)  # a missing or unreadable file is reported in its place, not fatal
    return photos


def _number(value: float, fmt: str) -> str:
    return "-" if value is None or value != value else format(value, fmt)


METHOD_TITLES = {"knn": "kNN vote", "classifier": "classifier", "hybrid": "hybrid"}


CSV_COLUMNS = ("source", "city", "name", "method", "probability", "lat", "lon", "gps_level", "gps_radius_m",
               "unlike_indexed", "top5", "nearest_path", "nearest_similarity", "error")


class _QueryOutput:
    """Writes answers as they come (text, strict JSON or CSV), so nothing is held for all photos at once."""

    def __init__(self, index, mode: str):
        self.index, self.mode = index, mode
        self.errors: list[dict] = []
        self.count = 0
        self.writer = None

    def start(self):
        m = self.index.manifest
        if self.mode == "json":
            click.echo(json.dumps({"index": self.index.name, "backbone": m["backbone"],
                                   "synthetic": bool(m.get("synthetic"))})[:-1] + ', "results": [', nl=False)
        elif self.mode == "csv":
            import csv
            self.writer = csv.writer(sys.stdout, lineterminator="\n")
            self.writer.writerow(CSV_COLUMNS)
        else:
            click.echo(f"index: {self.index.name} ({m['backbone']}, {m['counts']['train']} indexed photos, "
                       f"{len(self.index.classes)} cities)")
        if m.get("synthetic") and self.mode == "text":  # JSON and CSV carry it as a field / the index name
            click.secho(f"WARNING: index {self.index.name!r} was built on SYNTHETIC images: its answers say nothing "
                        "about real photos", fg="red", bold=True)

    def error(self, source: str, message: str):
        self.errors.append({"source": source, "error": message})
        if self.mode == "csv":
            self.writer.writerow([source] + [""] * (len(CSV_COLUMNS) - 2) + [message])
        click.echo(f"{source}: {message}", err=True)

    def result(self, p):
        if self.mode == "json":
            click.echo(("," if self.count else "") + "\n" + dumps(p.to_dict(), indent=None), nl=False)
        elif self.mode == "csv":
            nearest = p.neighbours[0] if p.neighbours else None
            self.writer.writerow([p.source, p.city, full_name(p.city), p.lead, f"{p.probability:.6f}",
                                  _number(p.lat, ".6f"), _number(p.lon, ".6f"), p.gps_level,
                                  "" if p.gps_radius_m is None else f"{p.gps_radius_m:.0f}", int(p.unlike_indexed),
                                  ";".join(f"{c}:{pr:.4f}" for c, pr in p.ranked(p.lead)),
                                  nearest.path if nearest else "", f"{nearest.similarity:.4f}" if nearest else "", ""])
        else:
            click.echo(f"\n{p.source}")
            click.echo(f"  city: {full_name(p.city)}  (p={p.probability:.2f}, {p.lead_note})")
            if p.unlike_indexed:
                click.secho(f"  WARNING: this photo is unlike anything indexed (nearest similarity "
                            f"{p.top_similarity:.3f}, below the {p.unlike_threshold:.3f} that 99% of validation "
                            "photos exceed): the answer is a guess, and the photo may be from none of the index's "
                            "cities", fg="yellow")
            gps = "-" if p.lat != p.lat else f"{p.lat:.5f}, {p.lon:.5f}"
            if p.lat == p.lat:
                radius = "" if p.gps_radius_m is None else f", 80% of val answers within {p.gps_radius_m:,.0f} m"
                if p.gps_level == "street" and p.gps_inliers:
                    gps += f"  (street level: an indexed photo shares {p.gps_inliers} matched points with it{radius})"
                elif p.gps_level == "street":
                    gps += f"  (street level: {len(p.street_cluster)} indexed photos within 25 m of each other{radius})"
                else:
                    gps += f"  (city level{radius})"
            click.echo(f"  GPS estimate: {gps}")
            methods = [("knn", METHOD_TITLES["knn"], p.cities)]
            if p.classifier:
                methods.append(("classifier", f"classifier ({p.classifier_mode})", p.classifier))
            if p.hybrid:
                methods.append(("hybrid", "hybrid", p.hybrid))
            methods.sort(key=lambda m: m[0] != p.lead)  # the leading method first, the others beside it
            width = max(len(title) for _, title, _ in methods) + 1
            for _, title, ranked in methods:
                click.echo(f"  {title + ':':<{width}} " + "  ".join(f"{full_name(c)} {pr:.2f}" for c, pr in ranked))
            click.echo("  nearest:")
            city_width = max([len(full_name(n.city)) for n in p.neighbours] + [4])
            click.echo(f"    {'similarity':>10}  {'city':<{city_width}} {'lat':>9} {'lon':>10}  photo")
            for n in p.neighbours:
                click.echo(f"    {n.similarity:>10.3f}  {full_name(n.city):<{city_width}} {_number(n.lat, '9.5f'):>9} "
                           f"{_number(n.lon, '10.5f'):>10}  {n.path}")
        self.count += 1

    def finish(self):
        if self.mode == "json":
            click.echo("\n], " + json.dumps({"errors": self.errors}, allow_nan=False)[1:])
        elif self.mode == "text" and self.errors and self.count:
            click.echo(f"\n{self.count} photo(s) answered, {len(self.errors)} could not be read (listed above)", err=True)


@main.command("indexes")
@index_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print every index's status (and manifest) as JSON.")
@friendly_errors
def indexes_command(index_dir, as_json):
    """List built indexes; broken and unfinished ones are listed as such."""
    from .fileio import index_home
    from .integrity import index_entries

    entries = index_entries(index_home(index_dir))
    if as_json:
        click.echo(json.dumps([(e["manifest"] or {}) | {k: v for k, v in e.items() if k != "manifest"}
                               for e in entries], indent=2, allow_nan=False))
        return
    if not entries:
        from .locate import where
        click.echo(f"no index in {where(index_dir)}; build one with `geoindex build --data PATH`")
        return
    rows, notes = [], []
    for e in entries:
        m = e["manifest"]
        if e["status"] != "ok":
            rows.append([e["name"], e["status"].upper()] + [""] * 9)
            notes.append(f"{e['name']}: {e['reason']}")
            continue
        counts, adapted, source = m["counts"], m.get("adapted") or {}, m.get("features_from")
        if source:  # its weights and kNN settings are another index's: say whose
            adapted = source.get("adapted") or {}
        rows.append([m["name"], m["backbone"],
                     f"from {source['name']}" if source else "adapted" if adapted else m["weights"]["source"],
                     f"{adapted.get('mode', 'yes')}, epoch {adapted['best_epoch']}" if adapted.get("best_epoch")
                     else "yes" if adapted else "no",
                     m["index"]["type"], str(counts["train"]), str(counts["val"]), str(counts["test"]),
                     str(len(m["classes"])),
                     f"features from {source['name']}" if source else _trained_summary(Path(e["path"])),
                     str(m["created"])[:16].replace("T", " ") + ("  SYNTHETIC data" if m.get("synthetic") else "")])
        if e.get("unfinished"):
            notes.append(f"{m['name']}: {e['unfinished']}")
    header = ["NAME", "BACKBONE", "WEIGHTS", "ADAPTED", "INDEX", "TRAIN", "VAL", "TEST", "CITIES", "TRAINED", "BUILT"]
    numeric = {"TRAIN", "VAL", "TEST", "CITIES"}
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.rjust(w) if h in numeric else cell.ljust(w)
                             for h, cell, w in zip(header, row, widths)).rstrip())
    for note in notes:
        click.echo(note)


def _trained_summary(path: Path) -> str:
    """What `train` left in an index: its heads and whether kNN was tuned on val (from file names only: instant)."""
    heads = [mode for mode in HEAD_MODES if (path / head_dir(mode) / HEAD_META).is_file()]
    knn = (path / KNN_PARAMS).is_file()
    return ", ".join(heads + (["kNN tuned"] if knn else [])) or "no (run geoindex train)"


@main.command("rm")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--unfinished", is_flag=True, help="Delete only what an interrupted build or train left unfinished "
                                                 "(its staging folder and train's checkpoints); the index stays.")
@index_dir_option
@friendly_errors
def rm_command(name, yes, unfinished, index_dir):
    """Delete an index (and any unfinished build of it). Only folders geoindex made are ever deleted."""
    from .fileio import STAGING, check_index_name, index_home, remove_geoindex_folder
    from .locks import IndexLock

    check_index_name(name)
    home = index_home(index_dir)
    target, staging = home / name, home / STAGING / name
    if unfinished:
        tail = target / head_dir(TAIL_MODE)  # train's resume files (geoindex.adapt)
        leftovers = [p for p in (tail / CHECKPOINT, tail / TRUNK_CACHE) if p.is_file()]
        if not staging.exists() and not leftovers:
            raise GeoindexError(f"index {name!r} has nothing unfinished to delete in {home}")
        if not yes:
            click.confirm(f"delete the unfinished part of {name!r} ({', '.join(map(str, [staging, *leftovers]))}); "
                          "the index stays?", abort=True)
        with IndexLock(home, name, "rm"):
            if staging.exists():
                remove_geoindex_folder(staging, home)
                _remove_if_empty(staging.parent)
            for path in leftovers:
                path.unlink(missing_ok=True)
        click.echo(f"removed the unfinished part of {name!r}" + (f"; the index in {target} is kept" if target.exists()
                                                                   else ""))
        return
    if not target.exists() and not staging.exists():
        raise GeoindexError(f"no index or unfinished build named {name!r} in {home}")
    if not yes:
        click.confirm(f"delete index {name!r} ({target})" + (" and its unfinished build" if staging.exists() else "")
                      + "?", abort=True)
    with IndexLock(home, name, "rm"):
        if target.exists():
            remove_geoindex_folder(target, home)
        if staging.exists():
            remove_geoindex_folder(staging, home)
            _remove_if_empty(staging.parent)
    click.echo(f"removed {name!r}")


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # .staging/ once no other name has an unfinished build
    except OSError:
        pass


@main.command()
@click.option("--index", "index_name", default=None, help="Index name or path [default: the latest built].")
@click.option("--mode", type=click.Choice(TRAIN_MODES), default=TrainConfig.mode, show_default=True,
              help="auto: tail where the backbone allows it (the EfficientNet-Lite family) and the index is not adapted "
                   "yet, else probe. tail: fine-tune the backbone's last stages on cached trunk features (minutes on a "
                   "CPU), re-embed the index with it, then a probe. probe: softmax head on the stored embeddings. "
                   "finetune: the whole backbone on images with augmentation (wants a GPU).")
@click.option("--epochs", type=click.IntRange(1), default=TrainConfig.epochs, help=_mode_defaults("epochs"))
@click.option("--lr", type=float, default=TrainConfig.lr,
              help="Learning rate (the tail's new head learns 10x faster) " + _mode_defaults("lr") + ".")
@click.option("--weight-decay", type=float, default=TrainConfig.weight_decay,
              help="(AdamW for the tail) " + _mode_defaults("weight_decay"))
@click.option("--batch-size", type=click.IntRange(1), default=TrainConfig.batch_size, help=_mode_defaults("batch_size"))
@click.option("--patience", type=click.IntRange(1), default=TrainConfig.patience,
              help="Stop after this many epochs without a better validation figure (the tail: val loss) "
                   + _mode_defaults("patience") + ".")
@click.option("--resume", is_flag=True, default=TrainConfig.resume,
              help="Continue an interrupted whole-backbone fine-tuning from its last checkpoint (tail fine-tuning "
                   "resumes by itself).")
@click.option("--places/--no-places", default=TrainConfig.places,
              help="The tail also learns places: photos of one spot (a GSV-Cities place id, or within 25 m of each "
                   "other) pulled together, other places pushed apart (multi-similarity loss over batches of places "
                   "x photos), keeping the epoch with the best revisit recall on val. Off by default: on the London "
                   "photos it cost city accuracy and did not raise held-out revisit recall (benchmarks/place.md).")
@click.option("--place-weight", type=click.FloatRange(0, min_open=True), default=TrainConfig.place_weight,
              help="With --places: the weight of the place loss beside the cities' cross-entropy [default: "
                   f"{PLACE_DEFAULTS['place_weight']:g}; on the London photos 0.3 gave the best revisit recall at the "
                   "least cost to the cities of the place settings measured, benchmarks/place.md].")
@click.option("--workers", type=click.IntRange(0), default=TrainConfig.num_workers,
              help="Decoding processes (tail, finetune).")
@device_option(TrainConfig.device)
@runtime_option
@index_dir_option
@friendly_errors
def train(index_name, mode, epochs, lr, weight_decay, batch_size, patience, resume, places, place_weight, workers,
          device, index_dir):
    """Train for the index's cities (and, with --places, its places); heads and curves are saved under <index>/heads/<mode>/.

    By default (EfficientNet-Lite backbones) this first adapts the backbone to the index: its last two
    stages are fine-tuned on the train photos for the cities (early-stopped on val loss; with --places, for
    the places too, early-stopped on val's revisit recall), every photo is embedded again with it, and the
    index is swapped for the re-embedded one. Then a linear probe is trained and kNN (space, k, vote,
    temperature) and the street-level GPS answer are tuned on val, on the new embeddings.
    """
    from .pipeline import train as train_index

    config = TrainConfig(mode=mode, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                         patience=patience, resume=resume, places=places, place_weight=place_weight,
                         num_workers=workers, device=device)
    train_index(index_name, config=config, index_dir=index_dir, log=click.echo)


@main.command()
@click.option("--index", "index_name", default=None, help="Index name or path [default: the latest built].")
@click.option("--methods", default=",".join(("knn", "classifier", "zeroshot", "hybrid")), show_default=True,
              help="Comma-separated: knn, classifier, zeroshot, hybrid.")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="[default: <index>/bench/]")
@click.option("--external", type=click.Path(exists=True), default=None,
              help="A second labelled set (CSV manifest, OSV-5M CSV, GSV tree or <city>/*.jpg folder), e.g. fresh "
                   "photos of other places, scored in its own rows; photos already in the index are dropped.")
@click.option("--k", type=click.IntRange(1), default=None, help="Neighbours that vote [default: tuned on val].")
@click.option("--vote", "vote_method", type=click.Choice(VOTE_METHODS), default=None,
              help="[default: tuned on val]")
@click.option("--clip-weights", default=None, help="CLIP weights for zero-shot when the index is not a CLIP one "
              "(a file, or 'none') [default: open_clip's cache].")
@click.option("--templates", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Prompt templates for the ensemble, one per line with {place}.")
@click.option("--names", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A CSV of city_id,name[,country] giving place names for prompts and reports "
                   "[default: GSV-Cities' names; other folder names are humanised, London_Ontario -> London Ontario].")
@click.option("--workers", type=click.IntRange(0), default=None)
@device_option(ExtractionConfig.device)
@runtime_option
@index_dir_option
@friendly_errors
def bench(index_name, methods, split, out, external, k, vote_method, clip_weights, templates, names, workers, device,
          index_dir):
    """Score kNN, classifier heads, CLIP zero-shot and their fusion on the same images, one metrics function."""
    if names:
        from .cities import load_names
        load_names(names)
    if out is None:  # results go into the index: a writer, so the lock comes before any work (geoindex.locks)
        from .locate import default_index_name, resolve_index_path
        from .locks import index_lock
        lock = index_lock(resolve_index_path(index_name or default_index_name(index_dir), index_dir), "bench")
    else:
        import contextlib
        lock = contextlib.nullcontext()
    with lock:
        _bench(index_name, index_dir, [m.strip() for m in methods.split(",") if m.strip()],
               dict(split=split, out=out, external=external, k=k, vote_method=vote_method, clip_weights=clip_weights,
                    templates_file=templates, device=device, num_workers=workers))


def _bench(index_name, index_dir, methods: list[str], options: dict):
    """options: run_bench's keyword arguments."""
    from .bench import format_table, run_bench
    from .geo_index import load_index

    index = load_index(index_name, index_dir, device=options["device"])
    if options["external"] and not Path(options["external"]).exists():
        raise click.ClickException(f"--external {options['external']}: no such file or folder")
    results = run_bench(index, methods, log=click.echo, **options)
    click.echo("")
    click.echo(format_table(results))
    if results["synthetic"]:
        click.secho("NOTE: SYNTHETIC data: these figures say nothing about real photos", fg="yellow")
    click.echo(f"\nresults.json, results.md and confusion matrices in {results['out']}")


@main.command()
@click.option("--data", type=click.Path(exists=True), default=None,
              help="A GSV-Cities tree, <city>/*.jpg folder or CSV manifest [default: the real London-or-London "
                   "photos in ../shared when present, else a generated tree announced as SYNTHETIC].")
@click.option("--backbone", default="auto", show_default=True, type=click.Choice(["auto", *list_backbones()]))
@click.option("--per-city", type=click.IntRange(1), default=None, help="Use about N images per city.")
@click.option("--rebuild", is_flag=True, help="Build the demo index again even if it exists.")
@click.option("--no-adapt", is_flag=True, help="Skip adapting the backbone (geoindex train's first step; about 16 "
                                               "minutes for the 5,419 London photos on 2 CPU cores with effnet-duo).")
@device_option(ExtractionConfig.device)
@runtime_option
@index_dir_option
@friendly_errors
def demo(data, backbone, per_city, rebuild, no_adapt, device, index_dir):
    """Build, train (as `geoindex train` does), query and score an index end to end, on your data or a sample."""
    from .demo import run_demo

    run_demo(data, backbone=backbone, per_city=per_city, rebuild=rebuild, device=device, index_dir=index_dir,
             adapt=not no_adapt, log=click.echo, warn=lambda m: click.secho(m, fg="yellow"))


@main.command("backbones")
@click.option("--check", is_flag=True, help="Load each backbone's weights to prove they are usable (slow).")
def backbones_command(check):
    """List the embedding backbones and where their weights would come from."""
    for name in list_backbones():
        status = weights_status(name)
        if check:
            from .backbones import create_backbone
            try:
                info = create_backbone(name, weights="none" if name in NO_PRETRAINED else None).weights
                status = f"loaded: {info.description or info.source}"
            except GeoindexError as exc:
                status = f"not usable: {exc}"
        click.echo(f"{name:<14} {BACKBONES[name]}\n{'':<14} [{status}]")


@main.command()
@click.argument("index_name", metavar="INDEX")
@click.argument("new_root", type=click.Path(exists=True, file_okay=False))
@click.option("--from", "old_root", default=None, help="The folder the photos were in [default: the index's data root].")
@index_dir_option
@friendly_errors
def relocate(index_name, new_root, old_root, index_dir):
    """Point an index at its photos' new folder after they moved (nothing is embedded again)."""
    from .relocate import relocate_index
    relocate_index(index_name, new_root, old_root, index_dir, log=click.echo)


from .serve.cli import serve  # noqa: E402  (click only: the server's imports happen when it starts)

main.add_command(serve)

if __name__ == "__main__":
    main()
