"""Extraction speed: each runtime of the model side by side (PyTorch, OpenVINO), geoindex's pipeline against the
model's own ceiling and a naive loop, same images, one interleaved run.

    python benchmarks/extract.py [--backbone effnet] [--runtimes torch,openvino] [--n 256] [--photos CSV]
                                 [--build-data CSV] [--device cpu|cuda] [--memory-sizes 500,5000]

For each runtime (interleaved, best of --repeats, so drift in machine load hits them alike):
(a) ceiling: forward passes on tensors already in memory (same batch size, as geoindex runs them) -- the model alone;
(b) pipeline: geoindex.extraction.iter_embeddings on the JPEG files (DataLoader workers decode) -- end to end;
and once per round (c) naive: PIL open + torchvision transform + batch of 1, fp32 eager PyTorch, one image at a time.
Prints photos/s and the ratios, each runtime over torch, then the share of CPU time spent in the kernel of a
build-like extraction in a fresh process per runtime (with --malloc-compare, also torch with glibc's allocator
defaults). With --build-data, whole `geoindex build --runtime R` runs on that CSV, interleaved, report the build
summary's photos/s (start-up and a one-off export excluded, as the build excludes them) and the wall time.
With --memory-sizes, full `build_index` runs at each size in fresh processes report their peak RSS.
A runtime named `openvino-int8` is OpenVINO with the model quantized to int8 (`geoindex build --precision int8`),
calibrated on --calibration photos that follow the measured ones in the list; it also reports each measured photo's
cosine between its int8 and its fp32 embedding. With --stages, where one photo's CPU time goes on one thread: reading,
decoding (and simplejpeg's bare decode to an array, when installed), resizing and cropping to the uint8 tensor,
normalising, and the model (each runtime).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PEAK_RSS_SOURCE, Timer, peak_rss_mb, save  # noqa: E402

from geoindex.backbones import create_backbone  # noqa: E402
from geoindex.extraction import Embedder, iter_embeddings, resolve_device, set_precision  # noqa: E402
from geoindex.runtime import resolve_runtime  # noqa: E402

INT8_SUFFIX = "-int8"
PRECISION_SUFFIXES = ("-fp32", "-bf16", INT8_SUFFIX)


def parse_label(label: str) -> tuple[str, str, int | None]:
    """RUNTIME[-PRECISION][/wN] -> (runtime, precision, decoding processes): "openvino-int8" -> ("openvino", "int8",
    None); "torch" -> ("torch", "fp32", None); "openvino" -> ("openvino", "auto", None); "torch/w1" -> eager PyTorch
    with one DataLoader decoding process, as every CPU build decoded before threads did (`--workers 1`)."""
    label, _, workers = label.partition("/w")
    for suffix in PRECISION_SUFFIXES:
        if label.endswith(suffix):
            return label[:-len(suffix)], suffix[1:], int(workers) if workers else None
    return label, "fp32" if label == "torch" else "auto", int(workers) if workers else None


def label_workers(label: str, default: int | None) -> int | None:
    """The decoding processes a label asks for (/wN), else `default` (--workers)."""
    workers = parse_label(label)[2]
    return default if workers is None else workers


def runtime_and_precision(label: str) -> tuple[str, str]:
    return parse_label(label)[:2]


def resolve_label(label: str, device) -> str:
    """The label of what can run here: an OpenVINO label falls back to torch where OpenVINO cannot run."""
    runtime, precision, workers = parse_label(label)
    ran = resolve_runtime(runtime, device)
    suffix = f"-{precision}" if ran == "openvino" and precision != "auto" else ""
    return ran + suffix + (f"/w{workers}" if workers is not None else "")


def stages(backbone, paths, labels, calibration, device, batch_size, repeats=3) -> dict:
    """One photo's CPU time (process time, one thread, best of `repeats`) in each stage of a build's path."""
    import time

    from geoindex import images

    def cpu_ms(fn, n, repeats=repeats):
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            fn()
            best = min(best, time.process_time() - start)
        return 1e3 * best / n

    transform, n = backbone.transform, len(paths)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = [images.read_image_bytes(p) for p in paths]
        out = {"read": cpu_ms(lambda: [images.read_image_bytes(p) for p in paths], n),
               "decode": cpu_ms(lambda: [images.decode_image(d, draft_size=transform.resize_size) for d in data], n)}
        try:  # another libjpeg-turbo binding, to an array only: what a faster decoder could save at most
            import simplejpeg
            out["(simplejpeg, to an array only)"] = cpu_ms(lambda: [simplejpeg.decode_jpeg(d) for d in data], n)
        except ImportError:
            pass
        decoded = [images.decode_image(d, draft_size=transform.resize_size) for d in data]
        out["resize + crop + uint8 tensor"] = cpu_ms(lambda: [transform(img) for img in decoded], n)
        batch = torch.stack([transform(img) for img in decoded[:batch_size]])
        out["normalise"] = cpu_ms(lambda: [backbone.normalize(batch) for _ in range(4)], 4 * len(batch))
    finally:
        torch.set_num_threads(threads)
    for label in labels:  # the model on all its threads: CPU time of every thread, per photo
        runtime, precision = runtime_and_precision(label)
        set_precision(backbone, precision, calibration)
        embedder = Embedder(backbone, device, runtime=runtime)
        embedder(batch)
        out[f"model ({label}, all threads)"] = cpu_ms(lambda: [embedder(batch) for _ in range(4)], 4 * len(batch), 2)
    set_precision(backbone, "fp32")
    print(f"CPU time per photo, ms ({n} photos; decoding to normalising on one thread):")
    for key, value in out.items():
        print(f"  {key:34}{value:8.2f}")
    pre = out["read"] + out["decode"] + out["resize + crop + uint8 tensor"] + out["normalise"]
    for label in labels:
        model = out[f"model ({label}, all threads)"]
        print(f"  {label}: the model is {model / (model + pre):.0%} of a photo's CPU time, decoding "
              f"{out['decode'] / (model + pre):.0%}, the rest of decoding to normalising {(pre - out['decode']) / (model + pre):.0%}")
    return out


def make_photos(folder: Path, n: int, size=(640, 480), seed=0) -> list[str]:
    """Street-View-sized JPEGs (640x480, like GSV-Cities) with photo-like texture, so decoding costs what it would."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:06d}.jpg"
        if not path.exists():
            small = np.roll(base, i, axis=1) // 2 + rng.integers(0, 128, size=base.shape, dtype=np.uint8)
            img = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
            noise = rng.integers(-12, 12, size=(size[1], size[0], 3))
            img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
            img.save(path, quality=90)
        paths.append(str(path))
    return paths


def ceiling(backbone, n, batch_size, device, repeats=1, streams=1, runtime=None) -> float:
    """Images/s of forward passes on one uint8 batch kept in memory. streams > 1 runs that many such loops side
    by side on threads (each with the torch threads the caller set), as `geoindex serve --model-threads` does."""
    import threading

    embedder = Embedder(backbone, device, runtime=runtime)
    batch = torch.randint(0, 255, (batch_size, 3, backbone.image_size, backbone.image_size), dtype=torch.uint8)
    embedder(batch)  # warm-up: allocator, cudnn autotune, thread pools
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_stream = max(1, n // batch_size // streams) * repeats

    def loop():
        for _ in range(per_stream):
            embedder(batch)

    threads = [threading.Thread(target=loop) for _ in range(streams - 1)]
    with Timer() as t:
        for thread in threads:
            thread.start()
        loop()
        for thread in threads:
            thread.join()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return streams * per_stream * batch_size / t.seconds


def pipeline(backbone, paths, batch_size, device, num_workers, runtime=None) -> float:
    for _ in iter_embeddings(backbone, paths[:batch_size], batch_size=batch_size, device=device, num_workers=0,
                             progress=False, runtime=runtime):
        pass  # warm-up outside the timing (and the one-off export, cached for the timed run)
    with Timer() as t:
        n = sum(len(item.positions) for item in iter_embeddings(backbone, paths, batch_size=batch_size, device=device,
                                                                num_workers=num_workers, progress=False,
                                                                runtime=runtime))
    return n / t.seconds


def naive(backbone, paths, device) -> float:
    from torchvision import transforms
    tf = transforms.Compose([transforms.Resize(backbone.transform.resize_size), transforms.CenterCrop(backbone.image_size),
                             transforms.ToTensor(), transforms.Normalize(backbone.mean, backbone.std)])
    model = backbone.model.to(device).eval().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        for p in paths[:2]:  # warm-up, as for the others
            model(tf(Image.open(p).convert("RGB")).unsqueeze(0).to(device))
    with Timer() as t, torch.no_grad():
        for p in paths:  # what a first script does: no batching, no workers, fp32
            x = tf(Image.open(p).convert("RGB")).unsqueeze(0).to(device)
            model(x).cpu()
    return len(paths) / t.seconds


CHILD = """
import json, resource, sys, time
from geoindex import build_index
root, out, backbone = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
r = build_index(root, name="mem", index_dir=out, backbone=backbone, weights="none", progress=False, overwrite=True,
                log=lambda m: None)
print(json.dumps({"n": sum(r.manifest["counts"].values()), "seconds": time.perf_counter() - t,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def memory_run(workdir: Path, n: int, backbone: str) -> dict:
    """A whole build (extraction, HDF5, FAISS) of n images in a fresh process; its peak RSS."""
    root = workdir / f"tree{n}"
    cities = ["Barcelona", "London", "Osaka", "PRS"]
    per_city = n // len(cities)
    photos = make_photos(workdir / "pool", max(64, min(n, 512)))
    for c, city in enumerate(cities):  # hard links: many files, little disk, real decoding per file
        folder = root / "Images" / city
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_city):
            target = folder / f"{city}_{i:07d}_2020_01_000_{40 + c}.0_{c}.0_pano{i}.jpg"
            if not target.exists():
                target.hardlink_to(photos[(i + c) % len(photos)])
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SOURCE + CHILD, str(root), str(workdir / "idx"), backbone],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


KERNEL_CHILD = """
import json, os, resource, sys, time
from geoindex.backbones import create_backbone
from geoindex.extraction import MALLOC_TUNED, iter_embeddings
paths_file, backbone, weights, batch_size, workers = sys.argv[1:6]
weights = None if weights == "pretrained" else weights
paths = open(paths_file).read().splitlines()
workers = None if workers == "None" else int(workers)
bb = create_backbone(backbone, weights=weights)
for _ in iter_embeddings(bb, paths[:int(batch_size)], batch_size=int(batch_size), num_workers=0, progress=False):
    pass  # warm-up: model, allocator, thread pools

def usage():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return [s.ru_utime, s.ru_stime, s.ru_minflt, c.ru_utime, c.ru_stime, c.ru_minflt]

before, t = usage(), time.perf_counter()
n = sum(len(b.positions) for b in iter_embeddings(bb, paths, batch_size=int(batch_size), num_workers=workers,
                                                  progress=False))
wall = time.perf_counter() - t
d = [b - a for a, b in zip(before, usage())]  # children: the DataLoader decoders, once reaped
user, system = d[0] + d[3], d[1] + d[4]
print(json.dumps({"malloc_tuned": MALLOC_TUNED, "runtime": bb.extras["runtime"], "n": n, "wall_s": wall, "img_s": n / wall, "user_s": user,
                  "sys_s": system, "kernel_share": system / (user + system), "minor_faults": int(d[2] + d[5]),
                  "minor_faults_per_image": (d[2] + d[5]) / n, "main_user_s": d[0], "main_sys_s": d[1],
                  "decoders_user_s": d[3], "decoders_sys_s": d[4], "peak_rss_mb": peak_rss_mb()}))
"""


def kernel_child(paths_file: Path, backbone: str, weights: str, batch_size: int, workers, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SOURCE + KERNEL_CHILD, str(paths_file), backbone,
                           weights, str(batch_size), str(workers)], capture_output=True, text=True, check=True,
                          env={**os.environ, "GEOINDEX_MALLOC": "", **env})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kernel_time(paths, backbone: str, weights: str, batch_size: int, workers, workdir: Path, runtimes,
                malloc_compare: bool = False) -> dict:
    """A build-like extraction in a fresh process per runtime: CPU time in the kernel vs in user space, and minor
    page faults, of it and its decoders. With malloc_compare, also torch with glibc's allocator defaults."""
    paths_file = workdir / "kernel_paths.txt"
    paths_file.write_text("\n".join(paths))
    plan = [(f"torch, glibc malloc", {"GEOINDEX_MALLOC": "glibc", "GEOINDEX_RUNTIME": "torch"})] if malloc_compare else []
    plan += [(runtime, {"GEOINDEX_RUNTIME": runtime}) for runtime in runtimes]
    runs = {label: kernel_child(paths_file, backbone, weights, batch_size, workers, env) for label, env in plan}
    print(f"kernel time, {len(paths)} images, batch {batch_size}, a fresh process each:")
    print(f"  {'':24}" + "".join(f"{label:>22}" for label in runs))
    for key, fmt in (("kernel_share", "{:.1%}"), ("sys_s", "{:.1f} s"), ("user_s", "{:.1f} s"),
                     ("minor_faults_per_image", "{:,.0f}"), ("img_s", "{:.1f}"), ("peak_rss_mb", "{:,.0f} MB")):
        print(f"  {key:<24}" + "".join(f"{fmt.format(r[key]):>22}" for r in runs.values()))
    return runs


BUILD_CHILD = """
import json, sys, time
t = time.perf_counter()
from geoindex.cli import main
try:
    main(sys.argv[1:], prog_name="geoindex", standalone_mode=False)
finally:
    print("WALL", time.perf_counter() - t, file=sys.stderr)
"""


def build_runs(data: str, backbone: str, runtimes, repeats: int, workdir: Path, workers) -> dict:
    """`geoindex build --runtime R` on the same photos, interleaved; each in a fresh process and a fresh index
    folder (a rebuild would reuse the embeddings). photos/s is the build summary's (embedding time only)."""
    runs = {runtime: [] for runtime in runtimes}
    for r in range(repeats):
        for runtime in runtimes:
            out = workdir / f"build-{runtime}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            bare, precision = runtime_and_precision(runtime)
            processes = label_workers(runtime, workers)
            args = ["build", "--data", data, "--backbone", backbone, "--name", "bench", "--index-dir", str(out),
                    "--runtime", bare, "--precision", precision] + (["--workers", str(processes)] if processes is not None else [])
            proc = subprocess.run([sys.executable, "-c", BUILD_CHILD, *args], capture_output=True, text=True,
                                  env={**os.environ, "TQDM_DISABLE": "1"})
            if proc.returncode != 0:
                raise SystemExit(f"geoindex build --runtime {runtime} failed:\n{proc.stderr[-3000:]}")
            manifest = json.loads((out / "bench" / "manifest.json").read_text())
            wall = float(proc.stderr.rsplit("WALL", 1)[1].split()[0])
            extraction = manifest["extraction"]
            runs[runtime].append({"photos_s": extraction["images_per_second"], "wall_s": wall,
                                  "embedded": extraction["embedded_rows"], "runtime": extraction.get("runtime")})
            print(f"  build round {r + 1}, --runtime {runtime:9}: {extraction['images_per_second']:7.1f} photos/s "
                  f"(build summary), {wall:6.1f} s wall for {extraction['embedded_rows']} photos", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return runs


def read_photo_list(source: str, n: int) -> list[str]:
    """Up to n photos from a CSV manifest (`path` column, relative to the CSV) or a folder of JPEGs, sorted, so
    every runtime reads the same files."""
    import pandas as pd
    source_path = Path(source)
    if source_path.is_dir():
        paths = sorted(str(p) for p in source_path.rglob("*.jpg"))
    else:
        table = pd.read_csv(source_path)
        paths = [p if os.path.isabs(p) else str(source_path.parent / p) for p in table["path"]]
    return paths[:n]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="effnet")
    parser.add_argument("--weights", default="none",
                        help="'none' (random; same speed as real ones), 'pretrained' or a file")
    parser.add_argument("--runtimes", default="torch,openvino",
                        help="comma-separated runtimes to compare, RUNTIME[-PRECISION][/wN]: torch, openvino (its "
                             "default precision: bf16 on a CPU with AMX or AVX512-BF16, else fp32), openvino-fp32, "
                             "openvino-bf16, openvino-int8; /wN decodes in N DataLoader processes (torch/w1: every "
                             "CPU build before decoding threads). One that cannot run here falls back to torch, as "
                             "geoindex does, and is reported as what ran")
    parser.add_argument("--calibration", type=int, default=300,
                        help="photos openvino-int8 is calibrated on: the ones after the measured ones")
    parser.add_argument("--stages", action="store_true", help="also one photo's CPU time stage by stage")
    parser.add_argument("--n", type=int, default=512, help="images per measurement")
    parser.add_argument("--photos", default=None,
                        help="a CSV manifest or folder of real JPEGs to read [default: generated 640x480 JPEGs]")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs of each")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--naive-n", type=int, default=None, help="images for the naive loop [default: n; 0 skips it]")
    parser.add_argument("--memory-sizes", default="", help="e.g. 500,5000: peak RSS of full builds at these sizes")
    parser.add_argument("--workdir", default=None, help="where test photos are written [default: a temp dir]")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--kernel-n", type=int, default=None,
                        help="images for the kernel-time comparison [default: n; 0 skips it]")
    parser.add_argument("--malloc-compare", action="store_true",
                        help="kernel time also with glibc's allocator defaults (torch), before geoindex's settings")
    parser.add_argument("--build-data", default=None,
                        help="a CSV manifest: also whole `geoindex build --runtime R` runs on it, interleaved")
    parser.add_argument("--build-repeats", type=int, default=2)
    parser.add_argument("--trunk", action="store_true",
                        help="also the frozen trunk `geoindex train` computes features with, model alone")
    args = parser.parse_args()

    device = resolve_device(args.device)
    weights = None if args.weights == "pretrained" else args.weights
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="geoindex-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    requested = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    int8 = any(runtime_and_precision(r)[1] == "int8" for r in requested)
    wanted = args.n + (args.calibration if int8 else 0)
    every = read_photo_list(args.photos, wanted) if args.photos else make_photos(workdir / "photos", wanted)
    paths, calibration = every[:args.n], every[args.n:]
    backbone = create_backbone(args.backbone, weights=weights, device=device)
    runtimes = list(dict.fromkeys(resolve_label(r, device) for r in requested))  # what can run here
    print(f"{args.backbone} at {backbone.image_size}px on {device}, batch {args.batch_size}, {len(paths)} images "
          f"({'from ' + args.photos if args.photos else '640x480 JPEGs'}), torch threads {torch.get_num_threads()}, "
          f"runtimes {', '.join(runtimes)}")
    results = {"backbone": args.backbone, "weights": args.weights, "device": str(device), "n": len(paths),
               "photos": Path(args.photos).name if args.photos else "generated 640x480",  # no machine paths "batch_size": args.batch_size,
               "image_size": backbone.image_size, "amp": device.type == "cuda", "runtimes": {}}
    # Best of --repeats for each, interleaved, so drift in machine load hits every runtime alike.
    runs = {rt: {"ceiling": [], "pipeline": []} for rt in runtimes}
    naive_runs, what_ran = [], {}
    naive_n = len(paths) if args.naive_n is None else args.naive_n
    if int8:
        results["calibration_photos"] = len(calibration)
    for r in range(args.repeats):
        for rt in runtimes:
            set_precision(backbone, runtime_and_precision(rt)[1], calibration)
            bare = runtime_and_precision(rt)[0]
            runs[rt]["ceiling"].append(ceiling(backbone, len(paths), args.batch_size, device, runtime=bare))
            runs[rt]["pipeline"].append(pipeline(backbone, paths, args.batch_size, device,
                                                 label_workers(rt, args.workers), runtime=bare))
            what_ran[rt] = dict(backbone.extras.get("runtime") or {})
            print(f"  round {r + 1}, {rt:9}: model alone {runs[rt]['ceiling'][-1]:7.1f} photos/s, "
                  f"end to end {runs[rt]['pipeline'][-1]:7.1f} photos/s", flush=True)
        set_precision(backbone, "fp32")
        if naive_n:
            naive_runs.append(naive(backbone, paths[:naive_n], device))
    if args.trunk:  # what `geoindex train` computes once before fine-tuning the tail, interleaved the same way
        import dataclasses

        from geoindex.backbones import tail_split
        split = tail_split(backbone)
        trunk = dataclasses.replace(backbone, model=split.trunk, embed_dim=split.trunk_dim, _embedders={})
        trunk.extras = {}
        for r in range(args.repeats):
            for rt in runtimes:
                if runtime_and_precision(rt)[1] == "int8":  # `train` computes its trunk features in float
                    continue
                set_precision(trunk, runtime_and_precision(rt)[1])
                runs[rt].setdefault("trunk", []).append(ceiling(trunk, len(paths), args.batch_size, device,
                                                                runtime=runtime_and_precision(rt)[0]))
                print(f"  round {r + 1}, {rt:9}: trunk features, model alone {runs[rt]['trunk'][-1]:7.1f} photos/s",
                      flush=True)
    for rt in runtimes:
        results["runtimes"][rt] = {"ceiling_img_s": max(runs[rt]["ceiling"]), "ceiling_runs": runs[rt]["ceiling"],
                                   "pipeline_img_s": max(runs[rt]["pipeline"]), "pipeline_runs": runs[rt]["pipeline"],
                                   "what_ran": what_ran[rt]}
        if args.trunk and runs[rt].get("trunk"):
            results["runtimes"][rt]["trunk_img_s"] = max(runs[rt]["trunk"])
            results["runtimes"][rt]["trunk_runs"] = runs[rt]["trunk"]
        results["runtimes"][rt]["pipeline_over_ceiling"] = (results["runtimes"][rt]["pipeline_img_s"]
                                                            / results["runtimes"][rt]["ceiling_img_s"])
    # The headline figures are the default runtime's (what `geoindex build` runs here).
    default = resolve_runtime("auto", device) if resolve_runtime("auto", device) in runtimes else runtimes[0]
    results["default_runtime"] = default
    results["ceiling_img_s"] = results["runtimes"][default]["ceiling_img_s"]
    results["pipeline_img_s"] = results["runtimes"][default]["pipeline_img_s"]
    w = max(12, max(len(rt) for rt in runtimes) + 2)  # a column per runtime, wide enough for its label
    print(f"\n{'':28}" + "".join(f"{rt:>{w}}" for rt in runtimes))
    print(f"{'(a) model alone, photos/s':28}" + "".join(f"{results['runtimes'][rt]['ceiling_img_s']:{w}.1f}"
                                                        for rt in runtimes))
    print(f"{'(b) end to end, photos/s':28}" + "".join(f"{results['runtimes'][rt]['pipeline_img_s']:{w}.1f}"
                                                       for rt in runtimes))
    print(f"{'(b)/(a)':28}" + "".join(f"{results['runtimes'][rt]['pipeline_over_ceiling']:{w}.2f}" for rt in runtimes))
    if "torch" in runtimes:
        for rt in runtimes:
            if rt != "torch":
                for key in ("ceiling", "pipeline") + (("trunk",) if args.trunk and runs[rt].get("trunk") else ()):
                    ratio = results["runtimes"][rt][f"{key}_img_s"] / results["runtimes"]["torch"][f"{key}_img_s"]
                    results["runtimes"][rt][f"{key}_over_torch"] = ratio
                print(f"{rt} / torch: model alone {results['runtimes'][rt]['ceiling_over_torch']:.2f}x, "
                      f"end to end {results['runtimes'][rt]['pipeline_over_torch']:.2f}x"
                      + (f", trunk features {results['runtimes'][rt]['trunk_over_torch']:.2f}x"
                         if "trunk_over_torch" in results["runtimes"][rt] else ""))
    if naive_runs:
        results["naive_img_s"], results["naive_runs"] = max(naive_runs), naive_runs
        results["pipeline_over_naive"] = results["pipeline_img_s"] / results["naive_img_s"]
        print(f"(c) naive loop (eager fp32, batch 1): {results['naive_img_s']:.1f} photos/s; "
              f"(b)/(c) with {default} = {results['pipeline_over_naive']:.2f}")
    results["pipeline_over_ceiling"] = results["pipeline_img_s"] / results["ceiling_img_s"]
    print(f"(b)/(a) = {results['pipeline_over_ceiling']:.2f} ({default})")
    for rt in runtimes:
        if runtime_and_precision(rt)[1] in ("int8", "bf16"):  # the same photos, lower and fp32, same runtime
            batch = torch.stack([backbone.transform.load(p) for p in paths])
            set_precision(backbone, "fp32")
            fp32 = torch.cat([Embedder(backbone, device, runtime=runtime_and_precision(rt)[0])(b) for b in batch.split(32)])
            set_precision(backbone, runtime_and_precision(rt)[1], calibration)
            low = torch.cat([Embedder(backbone, device, runtime=runtime_and_precision(rt)[0])(b) for b in batch.split(32)])
            set_precision(backbone, "fp32")
            cosine = (fp32 * low).sum(1).double().numpy()  # both L2-normalised
            results["runtimes"][rt]["cosine_vs_fp32"] = {"min": float(cosine.min()), "p1": float(np.percentile(cosine, 1)),
                                                         "mean": float(cosine.mean()), "n": len(cosine)}
            print(f"{rt}: per-photo cosine to fp32 on the {len(cosine)} measured photos: min {cosine.min():.4f}, "
                  f"1st percentile {np.percentile(cosine, 1):.4f}, mean {cosine.mean():.4f}")
    if args.stages:
        results["stages_cpu_ms_per_photo"] = stages(backbone, paths, runtimes, calibration, device, args.batch_size)
    results["peak_rss_mb_this_process"] = peak_rss_mb()
    kernel_n = len(paths) if args.kernel_n is None else args.kernel_n
    if kernel_n:
        paths_k = (read_photo_list(args.photos, kernel_n) if args.photos
                   else make_photos(workdir / "photos", kernel_n))
        results["kernel_time"] = kernel_time(paths_k, args.backbone, args.weights, args.batch_size, args.workers,
                                             workdir, [rt for rt in runtimes if rt in ("torch", "openvino")],
                                             args.malloc_compare)
        for label, run in results["kernel_time"].items():
            if label in results["runtimes"]:
                results["runtimes"][label]["kernel_share"] = run["kernel_share"]
    if args.build_data:
        print(f"\ngeoindex build on {args.build_data}, interleaved:")
        builds = build_runs(args.build_data, args.backbone, runtimes, args.build_repeats, workdir, args.workers)
        results["builds"] = builds
        for rt in runtimes:
            results["runtimes"][rt]["build_photos_s"] = max(b["photos_s"] for b in builds[rt])
        if "torch" in runtimes:
            for rt in runtimes:
                if rt != "torch":
                    ratio = results["runtimes"][rt]["build_photos_s"] / results["runtimes"]["torch"]["build_photos_s"]
                    results["runtimes"][rt]["build_over_torch"] = ratio
                    print(f"build photos/s, {rt} / torch: {ratio:.2f}x (best of {args.build_repeats} each)")
    if args.memory_sizes:
        runs = [memory_run(workdir, int(s), args.backbone) for s in args.memory_sizes.split(",")]
        for r in runs:
            print(f"full build of {r['n']:6d} images: peak RSS {r['peak_rss_mb']:7.1f} MB, {r['seconds']:.0f} s")
        results["memory"] = runs
        spread = max(r["peak_rss_mb"] for r in runs) / min(r["peak_rss_mb"] for r in runs) - 1
        results["memory_peak_spread"] = spread
        print(f"peak RSS spread across sizes: {100 * spread:.1f}%")
    save(f"extract_{args.backbone}_{device.type}{args.tag}", results)


if __name__ == "__main__":
    main()
