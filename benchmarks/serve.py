"""`geoindex serve` under load, beside the model's own ceiling, in one run on loopback.

    python benchmarks/serve.py [--backbone effnet-duo] [--clients 16] [--requests 256] [--max-batch 8] [--max-wait-ms 10]
                               [--model-threads 2]

(a) ceiling: the backbone's forward passes on uint8 tensors already in memory, measured exactly as
    benchmarks/extract.py does (its `ceiling` helper), at extract.py's batch size and at --max-batch, one
    loop on all --torch-threads; and the same with --model-threads loops side by side, each on its share of
    the threads, as the server runs them. The ratio to judge by is the one to the best of these ceilings.
    Beside them, the same JPEGs decoded and embedded as a build does (extract.py's `pipeline`): what a service
    could answer if HTTP, batching and the answer cost nothing, since every upload must be decoded;
(b) the real server (`python -m geoindex.serve`, a subprocess) over an index built here with the same
    backbone and weights, the same torch threads, asked by clients on loopback that POST 640x480
    JPEGs as raw image/jpeg bodies over keep-alive connections:
    sequential (one client) latency, then --clients concurrent clients with micro-batching
    (--max-batch) and without it (--max-batch 1): throughput and p50/p99 latency.
The clients run on the same CPU as the server, as they would on one machine. Prints a table and
saves JSON in benchmarks/results/serve_<backbone>_<device><tag>.json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402
from extract import ceiling, make_photos, pipeline  # noqa: E402

from geoindex.build import DEFAULT_BACKBONE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_index(workdir: Path, backbone: str, weights: str | None) -> tuple[Path, str]:
    import geoindex
    from geoindex.synthetic import make_synthetic_gsv
    root = make_synthetic_gsv(workdir / "GSV-Cities", places_per_city=8, images_per_place=2, image_size=(160, 120))
    report = geoindex.build_index(root, name=f"bench-{backbone}", index_dir=workdir / "indexes", backbone=backbone,
                                  weights=weights, batch_size=32, num_workers=0, device="cpu", progress=False,
                                  overwrite=True, log=lambda m: None)
    return workdir / "indexes", report.name


class Server:
    def __init__(self, index_dir, name, max_batch, max_wait_ms, torch_threads, decode_threads, extra_env=(),
                 model_threads=None):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               **dict(item.split("=", 1) for item in extra_env)}
        args = [sys.executable, "-m", "geoindex.serve", "--index", name, "--index-dir", str(index_dir), "--port",
                str(self.port), "--device", "cpu", "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                "--torch-threads", str(torch_threads), "--log-level", "warning"]
        if decode_threads:
            args += ["--decode-threads", str(decode_threads)]
        if model_threads:
            args += ["--model-threads", str(model_threads)]
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited:\n{self.log.read()}")
            try:
                if request(self.port, "GET", "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("server did not start")

    def stats(self) -> dict:
        health = json.loads(request(self.port, "GET", "/healthz")[1])
        return {**health["batching"], "cpu": health.get("cpu_seconds_by_thread") or {}}

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def request(port, method, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request(method, path)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def _request_bytes(photo: bytes) -> bytes:
    head = (f"POST /v1/locate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(photo)}\r\n\r\n").encode()
    return head + photo


async def _exchange(reader, writer, payload: bytes) -> tuple[int, bytes]:
    """One request on a keep-alive connection; the answer's status and body (uvicorn always sends Content-Length)."""
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:"))
    return status, await reader.readexactly(length)


def load(port, photos: list[bytes], clients: int, total: int) -> dict:
    """`clients` concurrent clients, each on its own keep-alive connection, send `total` requests in all, each
    as soon as its previous one is answered. The clients share the server's CPU, so they are made as light as a
    load generator can be in Python: one thread, one event loop, requests serialised before the clock starts."""
    import asyncio

    payloads = [_request_bytes(p) for p in photos]
    latencies, errors = [], []

    async def main():
        counter = iter(range(total))
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]

        async def client(c, reader, writer):
            for i in counter:
                t = time.perf_counter()
                status, data = await _exchange(reader, writer, payloads[(i + c) % len(payloads)])
                elapsed = time.perf_counter() - t
                (latencies if status == 200 else errors).append(elapsed if status == 200 else (status, data[:200]))
            writer.close()

        start = time.perf_counter()
        await asyncio.gather(*(client(c, r, w) for c, (r, w) in enumerate(connections)))
        return time.perf_counter() - start

    cpu = time.process_time()
    wall = asyncio.run(main())
    cpu = time.process_time() - cpu
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": total, "errors": len(errors), "error_samples": [str(e) for e in errors[:3]],
            "seconds": wall, "img_s": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "client_cpu_ms_per_request": cpu * 1000 / total}


def concurrent_run(server, photos, args) -> dict:
    before = server.stats()
    run = load(server.port, photos, args.clients, args.requests)
    after = server.stats()
    batches = after["batches"] - before["batches"]
    run["mean_batch_size"] = (after["items"] - before["items"]) / batches if batches else None
    run["model_busy_fraction"] = (after["busy_seconds"] - before["busy_seconds"]) / run["seconds"] / after["workers"]
    served = after["items"] - before["items"]
    run["server_cpu_ms_per_photo"] = {name: round((seconds - before["cpu"].get(name, 0.0)) * 1000 / served, 2)
                                      for name, seconds in after["cpu"].items()
                                      if served and seconds - before["cpu"].get(name, 0.0) > 0.005}
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="[default: geoindex build's, %(default)s]")
    parser.add_argument("--weights", default=None, help="[default: the backbone's pretrained weights]")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=320, help="requests per concurrent measurement")
    parser.add_argument("--sequential", type=int, default=40, help="requests of the one-client measurement")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--decode-threads", type=int, default=None)
    parser.add_argument("--model-threads", type=int, default=None,
                        help="the server's batches at once [default: geoindex serve's own choice]")
    parser.add_argument("--torch-threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--ceiling-batch", type=int, default=32, help="benchmarks/extract.py's default batch size")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of ceiling, batched, unbatched")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment of the server processes (repeatable), e.g. OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    from geoindex.backbones import create_backbone
    from geoindex.extraction import resolve_device

    torch.set_num_threads(args.torch_threads)
    device = resolve_device("cpu")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="geoindex-serve-bench-"))
    photo_paths = make_photos(workdir / "photos", 64)
    photos = [Path(p).read_bytes() for p in photo_paths]
    index_dir, name = build_index(workdir, args.backbone, args.weights)
    backbone = create_backbone(args.backbone, weights=args.weights, device=device)
    from geoindex.serve.cli import split_threads
    model_threads, stream_threads = split_threads(args.torch_threads, args.model_threads, device.type)
    print(f"{args.backbone} ({backbone.weights.source} weights) at {backbone.image_size}px on {device}, "
          f"torch threads {args.torch_threads}, {os.cpu_count()} cores; {args.clients} clients, 640x480 JPEGs; "
          f"server: {model_threads} model thread(s) of {stream_threads} torch thread(s)")

    def ceilings() -> dict:
        found = {str(b): ceiling(backbone, 128, b, device) for b in sorted({args.ceiling_batch, args.max_batch})}
        if model_threads > 1:  # as the server runs the model: side by side, each on its share of the threads
            torch.set_num_threads(stream_threads)
            for b in sorted({args.ceiling_batch, args.max_batch}):
                found[f"{b}x{model_threads}"] = ceiling(backbone, 128 * model_threads, b, device, streams=model_threads)
            torch.set_num_threads(args.torch_threads)
        # The same JPEGs decoded and embedded as a build does (a decoding thread beside the model): the most a
        # service could answer if HTTP, batching and the answer itself cost nothing.
        found["decoded"] = pipeline(backbone, photo_paths * 4, args.ceiling_batch, device, None)
        return found

    # Both servers stay up (an idle one costs nothing) and the measurements alternate round by round,
    # so a change in machine load hits the ceiling and both servers alike; ratios are taken per round.
    servers = {"batched": Server(index_dir, name, args.max_batch, args.max_wait_ms, args.torch_threads, args.decode_threads,
                                 args.server_env, model_threads),
               "unbatched": Server(index_dir, name, 1, args.max_wait_ms, args.torch_threads, args.decode_threads,
                                   args.server_env, model_threads)}
    try:
        runs = {"batched": {"sequential": None, "concurrent": []}, "unbatched": {"sequential": None, "concurrent": []}}
        for key, server in servers.items():
            load(server.port, photos, args.clients, args.clients * 2)  # warm-up: every batch shape, every connection
            runs[key]["sequential"] = load(server.port, photos, 1, args.sequential)
        rounds = []
        for r in range(args.rounds):
            ceiling_now = ceilings()
            row = {"ceiling_img_s": ceiling_now}
            for key, server in servers.items():
                run = concurrent_run(server, photos, args)
                runs[key]["concurrent"].append(run)
                row[key] = run
            row["batched_over_extract_ceiling"] = row["batched"]["img_s"] / ceiling_now[str(args.ceiling_batch)]
            row["batched_over_best_ceiling"] = row["batched"]["img_s"] / max(
                v for b, v in ceiling_now.items() if b != "decoded")
            row["batched_over_decoded_ceiling"] = row["batched"]["img_s"] / ceiling_now["decoded"]
            row["batched_over_unbatched"] = row["batched"]["img_s"] / row["unbatched"]["img_s"]
            rounds.append(row)
            print(f"round {r + 1}: ceiling " + ", ".join(f"batch {b} {v:.1f}" if b != "decoded" else f"JPEGs decoded {v:.1f}"
                                                         for b, v in ceiling_now.items())
                  + f" img/s; served {row['batched']['img_s']:.1f} batched, {row['unbatched']['img_s']:.1f} unbatched;"
                  f" batched/ceiling(batch {args.ceiling_batch}) {row['batched_over_extract_ceiling']:.2f},"
                  f" /best ceiling {row['batched_over_best_ceiling']:.2f}, /decoded {row['batched_over_decoded_ceiling']:.2f}",
                  flush=True)
    finally:
        for server in servers.values():
            server.stop()

    def median(key):
        return float(np.median([r[key] for r in rounds]))

    results = {"backbone": args.backbone, "weights": backbone.weights.source, "device": str(device),
               "torch_threads": args.torch_threads, "model_threads": model_threads,
               "torch_threads_per_model_thread": stream_threads, "clients": args.clients, "photo": "640x480 JPEG, raw image/jpeg body",
               "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "decode_threads": args.decode_threads,
               "server_env": args.server_env, "client": "one asyncio thread, raw HTTP/1.1 keep-alive",
               "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]), "rounds": rounds,
               "sequential": {k: v["sequential"] for k, v in runs.items()},
               "batched_over_extract_ceiling_median": median("batched_over_extract_ceiling"),
               "batched_over_best_ceiling_median": median("batched_over_best_ceiling"),
               "batched_over_decoded_ceiling_median": median("batched_over_decoded_ceiling"),
               "batched_over_unbatched_median": median("batched_over_unbatched")}
    print(f"\n{'median round':50} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}")
    mid = sorted(rounds, key=lambda r: r["batched_over_extract_ceiling"])[len(rounds) // 2]
    for b, v in mid["ceiling_img_s"].items():
        if b == "decoded":
            label = f"ceiling: the JPEGs decoded and embedded, batch {args.ceiling_batch}"
        elif "x" in b:
            label = f"ceiling: tensors in memory, batch {b.split('x')[0]}, {model_threads} loops of {stream_threads} thread(s)"
        else:
            label = f"ceiling: tensors in memory, batch {b}, one loop of {args.torch_threads} thread(s)"
        print(f"{label:50} {v:8.1f}")
    for key, label in (("batched", f"micro-batching (max batch {args.max_batch})"), ("unbatched", "no batching (max batch 1)")):
        s_, c = runs[key]["sequential"], mid[key]
        print(f"{'sequential, 1 client, ' + label:50} {s_['img_s']:8.1f} {s_['p50_ms']:8.1f} {s_['p99_ms']:8.1f}")
        mean_batch = f"{c['mean_batch_size']:6.1f}" if c["mean_batch_size"] else ""
        print(f"{f'{args.clients} clients, ' + label:50} {c['img_s']:8.1f} {c['p50_ms']:8.1f} {c['p99_ms']:8.1f} "
              f"{mean_batch}   errors {c['errors']}")
    cpu = mid["batched"]["server_cpu_ms_per_photo"]
    if cpu:
        print(f"\nCPU ms per photo, {args.clients} clients with micro-batching: "
              + ", ".join(f"{name} {ms:.2f}" for name, ms in sorted(cpu.items(), key=lambda x: -x[1]))
              + f", the clients {mid['batched']['client_cpu_ms_per_request']:.2f}")
    print(f"\n{args.clients} clients with micro-batching / ceiling at batch {args.ceiling_batch} (extract.py's), median of "
          f"{args.rounds} rounds: {results['batched_over_extract_ceiling_median']:.2f}; / best of the ceilings above "
          f"{results['batched_over_best_ceiling_median']:.2f}; / the JPEGs decoded and embedded "
          f"{results['batched_over_decoded_ceiling_median']:.2f}; / no batching {results['batched_over_unbatched_median']:.2f}")
    save(f"serve_{args.backbone}_{device.type}{args.tag}", results)


if __name__ == "__main__":
    main()
