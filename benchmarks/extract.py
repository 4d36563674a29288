"""Extraction speed: geoindex's pipeline against the model's own ceiling and a naive loop, same images, one run.

    python benchmarks/extract.py [--backbone resnet18] [--n 256] [--device cpu|cuda] [--memory-sizes 500,5000]

(a) ceiling: forward passes on tensors already in memory (same batch size, inference_mode, channels-last,
    fp16 autocast on a GPU) -- nothing can beat it;
(b) pipeline: geoindex.extraction.iter_embeddings on the files (DataLoader workers decode);
(c) naive: PIL open + torchvision transform + batch of 1, fp32, one image at a time.
Prints images/s and the ratios (b)/(a), (b)/(c), then the share of CPU time spent in the kernel (and the
minor page faults) of a build-like extraction in fresh processes, with glibc's allocator defaults (before)
and geoindex's settings (after), side by side. With --memory-sizes, full `build_index` runs at each
size in fresh processes report their peak RSS, to show memory stays flat as the data grows.
"""
from __future__ import annotations

import argparse
import json
import os
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
from geoindex.extraction import Embedder, iter_embeddings, resolve_device  # noqa: E402


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


def ceiling(backbone, n, batch_size, device, repeats=1, streams=1) -> float:
    """Images/s of forward passes on one uint8 batch kept in memory. streams > 1 runs that many such loops side
    by side on threads (each with the torch threads the caller set), as `geoindex serve --model-threads` does."""
    import threading

    embedder = Embedder(backbone, device)
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


def pipeline(backbone, paths, batch_size, device, num_workers) -> float:
    for _ in iter_embeddings(backbone, paths[:batch_size], batch_size=batch_size, device=device, num_workers=0,
                             progress=False):
        pass  # warm-up outside the timing
    with Timer() as t:
        n = sum(len(item.positions) for item in iter_embeddings(backbone, paths, batch_size=batch_size, device=device,
                                                                num_workers=num_workers, progress=False))
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
print(json.dumps({"malloc_tuned": MALLOC_TUNED, "n": n, "wall_s": wall, "img_s": n / wall, "user_s": user,
                  "sys_s": system, "kernel_share": system / (user + system), "minor_faults": int(d[2] + d[5]),
                  "minor_faults_per_image": (d[2] + d[5]) / n, "main_user_s": d[0], "main_sys_s": d[1],
                  "decoders_user_s": d[3], "decoders_sys_s": d[4], "peak_rss_mb": peak_rss_mb()}))
"""


def kernel_time(paths, backbone: str, weights: str, batch_size: int, workers, workdir: Path) -> dict:
    """A build-like extraction in fresh processes, with glibc's allocator defaults (before) and geoindex's
    settings (after): CPU time in the kernel vs in user space, and minor page faults, of it and its decoders."""
    paths_file = workdir / "kernel_paths.txt"
    paths_file.write_text("\n".join(paths))
    runs = {}
    for label, env in (("before", {"GEOINDEX_MALLOC": "glibc"}), ("after", {})):
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SOURCE + KERNEL_CHILD, str(paths_file), backbone,
                               weights, str(batch_size), str(workers)], capture_output=True, text=True, check=True,
                              env={**os.environ, "GEOINDEX_MALLOC": "", **env})
        runs[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    b, a = runs["before"], runs["after"]
    print(f"kernel time, {len(paths)} images ({b['n']} embedded), batch {batch_size}:   before (glibc defaults)   after")
    for key, fmt in (("kernel_share", "{:.1%}"), ("sys_s", "{:.1f} s"), ("user_s", "{:.1f} s"),
                     ("minor_faults_per_image", "{:,.0f}"), ("img_s", "{:.1f}"), ("peak_rss_mb", "{:,.0f} MB")):
        print(f"  {key:<24} {fmt.format(b[key]):>24}   {fmt.format(a[key]):>10}")
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="none", help="'none' (random; same speed as real ones) or a file")
    parser.add_argument("--n", type=int, default=512, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs of each")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--naive-n", type=int, default=None, help="images for the naive loop [default: n]")
    parser.add_argument("--memory-sizes", default="", help="e.g. 500,5000: peak RSS of full builds at these sizes")
    parser.add_argument("--workdir", default=None, help="where test photos are written [default: a temp dir]")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--kernel-n", type=int, default=None,
                        help="images for the kernel-time comparison [default: n; 0 skips it]")
    args = parser.parse_args()

    device = resolve_device(args.device)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="geoindex-bench-"))
    paths = make_photos(workdir / "photos", args.n)
    backbone = create_backbone(args.backbone, weights=args.weights, device=device)
    print(f"{args.backbone} at {backbone.image_size}px on {device}, batch {args.batch_size}, {args.n} images "
          f"of 640x480, torch threads {torch.get_num_threads()}")
    results = {"backbone": args.backbone, "device": str(device), "n": args.n, "batch_size": args.batch_size,
               "image_size": backbone.image_size, "amp": device.type == "cuda"}
    # Best of --repeats for each, interleaved, so drift in machine load hits all three alike.
    runs = {"ceiling": [], "pipeline": [], "naive": []}
    for _ in range(args.repeats):
        runs["ceiling"].append(ceiling(backbone, args.n, args.batch_size, device))
        runs["pipeline"].append(pipeline(backbone, paths, args.batch_size, device, args.workers))
        runs["naive"].append(naive(backbone, paths[: args.naive_n or args.n], device))
    for key in runs:
        results[f"{key}_img_s"] = max(runs[key])
        results[f"{key}_runs"] = runs[key]
    print(f"(a) model-only ceiling : {results['ceiling_img_s']:8.1f} img/s")
    print(f"(b) geoindex pipeline  : {results['pipeline_img_s']:8.1f} img/s")
    print(f"(c) naive loop         : {results['naive_img_s']:8.1f} img/s")
    results["pipeline_over_ceiling"] = results["pipeline_img_s"] / results["ceiling_img_s"]
    results["pipeline_over_naive"] = results["pipeline_img_s"] / results["naive_img_s"]
    print(f"(b)/(a) = {results['pipeline_over_ceiling']:.2f}   (b)/(c) = {results['pipeline_over_naive']:.2f}")
    results["peak_rss_mb_this_process"] = peak_rss_mb()
    kernel_n = args.n if args.kernel_n is None else args.kernel_n
    if kernel_n:
        paths_k = make_photos(workdir / "photos", kernel_n)
        results["kernel_time"] = kernel_time(paths_k, args.backbone, args.weights, args.batch_size, args.workers,
                                             workdir)
        results["kernel_share_before"] = results["kernel_time"]["before"]["kernel_share"]
        results["kernel_share_after"] = results["kernel_time"]["after"]["kernel_share"]
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
