"""The `geoindex` command: a thin layer over the Python API (every command is one API call)."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .backbones import backbone_spec, list_backbones
from .cities import display_name
from .errors import GeoindexError
from .search import INDEX_TYPES
from .voting import VOTE_METHODS

index_dir_option = click.option("--index-dir", type=click.Path(file_okay=False), default=None,
                                help="Where indexes live [default: $GEOINDEX_HOME or ./indexes].")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                             help="auto uses a CUDA GPU when torch sees one.")


def friendly_errors(func):
    """User errors become one line and exit 1; Ctrl-C exits 130 without a traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except GeoindexError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted; rerun the same command to resume where it stopped", err=True)
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="geoindex")
def main():
    """Tell which city a street-level photo was taken in.

    \b
    geoindex build --data PATH     embed a GSV-Cities tree (or <city>/*.jpg folder) and index it
    geoindex query photo.jpg       top-5 cities, a GPS estimate and the nearest photos
    geoindex indexes               list built indexes
    geoindex backbones             list embedding backbones
    """


@main.command()
@click.option("--data", "data", required=True, type=click.Path(exists=True, file_okay=False),
              help="A GSV-Cities root (Dataframes/, Images/<City>/) or a folder of <city>/*.jpg.")
@click.option("--backbone", default="auto", show_default=True,
              type=click.Choice(["auto", *list_backbones()]),
              help="auto: densenet if its ImageNet weights are cached, else effnet (weights ship with pip).")
@click.option("--weights", default=None, help="A state-dict file, or 'none' for seeded random weights "
              "[default: the library's pretrained weights from its cache].")
@click.option("--name", default=None, help="Index name [default: <data folder>-<backbone>].")
@click.option("--per-city", type=click.IntRange(1), default=None, help="Use about N images per city (whole places).")
@click.option("--image-size", type=click.IntRange(16), default=None, help="Model input size [default: the backbone's].")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=None, help="Decoding processes [default: cores - 1].")
@device_option
@click.option("--index", "index_type", type=click.Choice(INDEX_TYPES), default="flat", show_default=True,
              help="flat: exact search; hnsw: the choice for large indexes (graph + exact re-ranking, "
                   "fast one photo at a time); ivfpq: compressed, the smallest index.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the place-disjoint split.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="How embeddings are stored in embeddings.h5.")
@click.option("--overwrite", is_flag=True, help="Replace an existing index (or unfinished build) of this name.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Who embeds: this process, or shards as tasks on a Ray cluster (pip install 'geoindex[ray]').")
@click.option("--ray-address", default=None, help="A running Ray cluster ('auto' or HOST:PORT) "
              "[default: a private Ray instance on this machine].")
@index_dir_option
@friendly_errors
def build(data, backbone, weights, name, per_city, image_size, batch_size, workers, device, index_type, seed, dtype,
          overwrite, engine, ray_address, index_dir):
    """Embed every image, split by place (80/10/10), and index the train split.

    An interrupted build resumes when the same command is run again.
    """
    from .build import build_index
    from .engines import get_engine

    report = build_index(data, name=name, backbone=backbone, weights=weights, index_dir=index_dir, per_city=per_city,
                         image_size=image_size, batch_size=batch_size, num_workers=workers, device=device,
                         index_type=index_type, seed=seed, dtype=dtype, overwrite=overwrite, log=click.echo,
                         engine=get_engine(engine, address=ray_address))
    m = report.manifest
    click.echo(f"\nindex {report.name!r} written to {report.path}")
    click.echo(f"  backbone   {m['backbone']} ({m['weights']['source']} weights), {m['embed_dim']}-d")
    click.echo(f"  images     " + ", ".join(f"{s} {m['counts'][s]}" for s in ("train", "val", "test"))
               + f" across {len(m['classes'])} cities")
    if report.extracted_rows:
        click.echo(f"  speed      {report.images_per_second:.1f} images/s ({report.extracted_rows} embedded this run"
                   + (f", {report.resumed_rows} resumed" if report.resumed_rows else "") + ")")
    index = m["index"]
    recall = {k: v for k, v in index.items() if k.startswith("recall@")}
    click.echo(f"  index      {index['type']} {index['params'] or ''} {index['bytes'] / 1e6:.1f} MB"
               + (f", {', '.join(f'{k} {v}' for k, v in recall.items())}" if recall else ""))
    click.echo(f"  skipped    {len(report.skipped)} file(s)")
    for item in report.skipped[:10]:
        click.echo(f"    {item['path']}: {item['reason']}")
    if len(report.skipped) > 10:
        click.echo(f"    ... and {len(report.skipped) - 10} more (all listed in manifest.json)")
    if m.get("synthetic"):
        click.secho("  NOTE: built on SYNTHETIC images; these figures say nothing about real photos", fg="yellow")


@main.command()
@click.argument("photos", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--index", "index_name", default=None, help="Index name or path [default: the latest built].")
@click.option("--k", type=click.IntRange(1), default=20, show_default=True, help="Neighbours that vote.")
@click.option("--vote", "vote_method", type=click.Choice(VOTE_METHODS), default="softmax", show_default=True)
@click.option("--temperature", type=click.FloatRange(min=1e-4), default=0.05, show_default=True,
              help="Softmax vote temperature on cosine similarity.")
@click.option("--backbone", default=None, help="Refuse to run unless the index was built with this backbone.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@device_option
@index_dir_option
@friendly_errors
def query(photos, index_name, k, vote_method, temperature, backbone, as_json, device, index_dir):
    """Which city? Top-5 cities, a GPS estimate and the nearest indexed photos, per photo."""
    from .errors import BackboneMismatch, ImageError
    from .geo_index import load_index
    from .images import load_image

    for photo in photos:  # check every file before loading a model, and name the bad one
        if not Path(photo).is_file():
            raise click.ClickException(f"{photo}: no such file")
        try:
            load_image(photo)
        except ImageError as exc:
            raise click.ClickException(f"{photo}: {exc}") from None
    index = load_index(index_name, index_dir, device=device)
    if backbone is not None and backbone != index.manifest["backbone"]:
        raise BackboneMismatch(f"index {index.name!r} was built with backbone {index.manifest['backbone']!r}, "
                               f"not {backbone!r}; query it without --backbone or build one with {backbone!r}")
    predictions = index.query(list(photos), k=k, vote_method=vote_method, temperature=temperature)
    if as_json:
        click.echo(json.dumps({"index": index.name, "backbone": index.manifest["backbone"],
                               "results": [p.to_dict() for p in predictions]}, indent=2))
        return
    for p in predictions:
        click.echo(f"\n{p.source}")
        click.echo(f"  city: {display_name(p.city)} ({p.city})")
        gps = "unknown" if p.lat != p.lat else f"{p.lat:.5f}, {p.lon:.5f}"
        click.echo(f"  GPS estimate: {gps}")
        click.echo("  kNN vote:      " + "  ".join(f"{display_name(c)} {pr:.2f}" for c, pr in p.cities))
        if p.classifier:
            click.echo("  classifier:    " + "  ".join(f"{display_name(c)} {pr:.2f}" for c, pr in p.classifier))
        click.echo("  nearest:")
        for n in p.neighbours:
            click.echo(f"    {n.similarity:.3f}  {display_name(n.city):<14} {n.lat:9.5f} {n.lon:10.5f}  {n.path}")


@main.command("indexes")
@index_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the manifests as JSON.")
@friendly_errors
def indexes_command(index_dir, as_json):
    """List built indexes."""
    from .fileio import index_home
    from .geo_index import list_indexes

    manifests = list_indexes(index_dir)
    if as_json:
        click.echo(json.dumps(manifests, indent=2))
        return
    if not manifests:
        click.echo(f"no index in {index_home(index_dir)}; build one with `geoindex build --data PATH`")
        return
    for m in manifests:
        counts = m["counts"]
        flag = "  [synthetic data]" if m.get("synthetic") else ""
        click.echo(f"{m['name']:<28} {m['backbone']:<9} {m['weights']['source']:<10} {m['index']['type']:<6} "
                   f"train {counts['train']:>7}  val {counts['val']:>6}  test {counts['test']:>6}  "
                   f"{len(m['classes'])} cities  {m['created']}{flag}")


@main.command()
@click.option("--index", "index_name", default=None, help="Index name or path [default: the latest built].")
@click.option("--mode", type=click.Choice(["probe", "finetune"]), default="probe", show_default=True,
              help="probe: softmax head on the stored embeddings (fast on CPU); finetune: the whole backbone "
                   "on images with augmentation (wants a GPU).")
@click.option("--epochs", type=click.IntRange(1), default=None, help="[default: probe 30, finetune 10]")
@click.option("--lr", type=float, default=None, help="Adam learning rate [default: probe 1e-3, finetune 1e-4].")
@click.option("--weight-decay", type=float, default=1e-5, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=None, help="[default: probe 256, finetune 32]")
@click.option("--patience", type=click.IntRange(1), default=3, show_default=True,
              help="Stop after this many epochs without a better validation accuracy.")
@click.option("--resume", is_flag=True, help="Continue an interrupted fine-tuning from its last checkpoint.")
@click.option("--workers", type=click.IntRange(0), default=None, help="Decoding processes (finetune).")
@device_option
@index_dir_option
@friendly_errors
def train(index_name, mode, epochs, lr, weight_decay, batch_size, patience, resume, workers, device, index_dir):
    """Train a classifier head; saved with its curves under <index>/heads/<mode>/."""
    from .geo_index import load_index
    from .heads import train_finetune, train_probe

    index = load_index(index_name, index_dir, device=device)
    common = dict(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, patience=patience,
                  device=device, log=click.echo)
    if mode == "probe":
        result = train_probe(index, **common)
    else:
        result = train_finetune(index, resume=resume, num_workers=workers, **common)
    click.echo(f"best validation accuracy {result.best_val_accuracy:.3f} at epoch {result.best_epoch}; "
               f"head, history.csv and curves.png in {result.folder}")


@main.command()
@click.option("--index", "index_name", default=None, help="Index name or path [default: the latest built].")
@click.option("--methods", default=",".join(("knn", "classifier", "zeroshot", "hybrid")), show_default=True,
              help="Comma-separated: knn, classifier, zeroshot, hybrid.")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="[default: <index>/bench/]")
@click.option("--external", type=click.Path(exists=True, file_okay=False), default=None,
              help="A second labelled folder (e.g. fresh Street View photos) scored in its own rows.")
@click.option("--k", type=click.IntRange(1), default=20, show_default=True)
@click.option("--vote", "vote_method", type=click.Choice(VOTE_METHODS), default="softmax", show_default=True)
@click.option("--clip-weights", default=None, help="CLIP weights for zero-shot when the index is not a CLIP one "
              "(a file, or 'none') [default: open_clip's cache].")
@click.option("--templates", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Prompt templates for the ensemble, one per line with {place}.")
@click.option("--workers", type=click.IntRange(0), default=None)
@device_option
@index_dir_option
@friendly_errors
def bench(index_name, methods, split, out, external, k, vote_method, clip_weights, templates, workers, device, index_dir):
    """Score kNN, classifier heads, CLIP zero-shot and their fusion on the same images, one metrics function."""
    from .bench import format_table, run_bench
    from .geo_index import load_index

    index = load_index(index_name, index_dir, device=device)
    results = run_bench(index, [m.strip() for m in methods.split(",") if m.strip()], split=split, out=out,
                        external=external, log=click.echo, k=k, vote_method=vote_method, clip_weights=clip_weights,
                        templates_file=templates, device=device, num_workers=workers)
    click.echo("")
    click.echo(format_table(results))
    if results["synthetic"]:
        click.secho("NOTE: SYNTHETIC data: these figures say nothing about real photos", fg="yellow")
    click.echo(f"\nresults.json, results.md and confusion matrices in {results['out']}")


@main.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="A GSV-Cities root [default: the sample in ../shared, else a generated tree].")
@click.option("--backbone", default="auto", show_default=True, type=click.Choice(["auto", *list_backbones()]))
@click.option("--per-city", type=click.IntRange(1), default=None, help="Use about N images per city.")
@device_option
@index_dir_option
@friendly_errors
def demo(data, backbone, per_city, device, index_dir):
    """Build, query and score an index end to end, on your data or a sample."""
    from .build import build_index
    from .demo import find_demo_data
    from .geo_index import load_index

    from .errors import IndexNotFound
    from .geo_index import resolve_index_path

    root, synthetic = find_demo_data(data, log=click.echo)
    name = "demo-synthetic" if synthetic else f"demo-{Path(root).resolve().name}-{backbone}"
    try:  # a second demo on the same real data reuses its index instead of re-embedding everything
        path = None if synthetic else resolve_index_path(name, index_dir)
        click.echo(f"reusing index {name!r} (delete {path} to rebuild it)")
    except IndexNotFound:
        path = None
    if path is None:
        report = build_index(root, name=name, backbone=backbone, per_city=per_city, device=device,
                             index_dir=index_dir, overwrite=synthetic, log=click.echo)
        click.echo(f"built {report.name!r}: {report.manifest['counts']}, {report.images_per_second:.1f} images/s")
        path = report.path
    index = load_index(path, device=device)
    test = index.store.metadata("test")
    sample = test.groupby("city").head(1).head(3)
    for prediction, truth in zip(index.query(list(sample["path"])), sample["city"]):
        click.echo(f"query {Path(prediction.source).name}: predicted {display_name(prediction.city)} "
                   f"(p={prediction.cities[0][1]:.2f}), truth {display_name(truth)}")
    from .bench import format_table, run_bench

    import os
    # The demo downloads nothing: zero-shot runs when CLIP weights are already cached, else is reported skipped.
    os.environ.setdefault("GEOINDEX_OFFLINE", "1")
    click.echo("\nscoring kNN, a linear-probe classifier, CLIP zero-shot and their fusion on the test split:")
    results = run_bench(index, log=click.echo, device=device)
    click.echo(format_table(results))
    click.echo(f"results in {results['out']}")
    if synthetic:
        click.secho("NOTE: SYNTHETIC data: these figures are meaningless; pass --data for real ones", fg="yellow")


@main.command("backbones")
def backbones_command():
    """List the embedding backbones."""
    from .backbones import default_weights_available

    for name in list_backbones():
        spec = backbone_spec(name)
        cached = "weights available" if default_weights_available(name) else "weights not cached"
        click.echo(f"{name:<10} {spec.description}  [{cached}]")


if __name__ == "__main__":
    main()
