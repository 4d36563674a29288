"""Turning image files into embeddings fast: decode ahead of the model, infer in batches.

Decoders (threads of this process on a CPU, DataLoader processes feeding a GPU) decode and resize to uint8 (a
quarter of float32's bytes); the main thread normalises and runs the model in the runtime geoindex.runtime chose (OpenVINO on a
CPU; PyTorch under inference_mode in channels-last layout, with fp16 autocast on a GPU), and
L2-normalises the pooled features.
"""
from __future__ import annotations

import itertools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import ExtractionConfig
from .errors import GeoindexError, ImageError
from .images import DEFAULT_MAX_PIXELS, ImageTransform

if TYPE_CHECKING:  # annotations only: backbones runs its models through this module (Backbone.embed)
    from .backbones import Backbone


def _libc():
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: nothing to do
        return None


_LIBC = _libc()
# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MALLOC_ENV = "GEOINDEX_MALLOC"  # "glibc": leave glibc's allocator settings as they are


def keep_freed_memory_for_reuse() -> bool:
    """Let each batch reuse the memory the previous batch freed, instead of fresh pages from the kernel.

    With glibc's defaults, blocks above the mmap threshold (at most 32 MB) are mmapped and unmapped
    on free, and each thread gets its own arena, whose heaps cannot hold a block over 64 MB: so
    every batch's activations were new pages that the kernel had to fault in and zero (a build of
    5,419 photos: 13k minor faults per photo, 30% of its CPU time in the kernel). One arena, and
    mmap and trim thresholds of 1 GB, keep freed blocks in the heap for the next batch
    (benchmarks/extract.py prints the kernel share with and without). The arena count only takes
    effect before other threads first allocate, hence a call at import; the periodic
    release_free_memory() still bounds the heap. GEOINDEX_MALLOC=glibc turns this off.
    """
    if _LIBC is None or os.environ.get(MALLOC_ENV, "").lower() == "glibc":
        return False
    _LIBC.mallopt(_M_ARENA_MAX, 1)
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    return True


MALLOC_TUNED = keep_freed_memory_for_reuse()
# A trim hands the heap back and the next batch faults it in again, but without one every 512
# photos the reused heap fragments (measured, full builds of 500 vs 2,500 photos: peak RSS +18%
# with a trim every 4,096, +1.2% every 512).
TRIM_EVERY_IMAGES = 512


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS after a CPU batch.

    Without it, glibc keeps each batch's freed activations in fragmented arenas and the peak RSS
    creeps up with the number of batches (measured: +15% between 500 and 5,000 images).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GeoindexError("--device cuda was asked for, but torch sees no CUDA GPU on this machine")
    return device


def default_num_workers(device: torch.device | None = None) -> int:
    """Decoding processes: on a GPU, every core but one, so the GPU never waits. On a CPU, none: decoding runs in
    threads of this process (decode_threads), because the model already uses every core and a decoding process
    preempts its threads at their synchronisation points, while a decoding thread costs it only its own CPU time
    (benchmarks/extract.py's `/w1` labels compare the two: benchmarks/README.md)."""
    if device is not None and device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def decode_threads() -> int:
    """Threads decoding ahead of the CPU model: one per four cores (a 224-px JPEG takes about 1.5 ms of one core
    from file to tensor, a tenth of what the model spends on it)."""
    from .runtime import usable_cores

    return max(1, usable_cores() // 4)


def _decoded_batches(files: Dataset, batch_size: int, threads: int) -> Iterator[tuple]:
    """Collated batches in order, decoded by `threads` threads a few batches ahead (PIL releases the GIL while it
    decodes and resizes); memory stays at a few batches."""
    starts = iter(range(0, len(files), batch_size))

    def decode(start):
        return _collate([files[i] for i in range(start, min(start + batch_size, len(files)))])

    with ThreadPoolExecutor(threads, thread_name_prefix="geoindex-decode") as pool:
        pending = deque(pool.submit(decode, start) for start in itertools.islice(starts, threads + 1))
        try:
            while pending:
                batch = pending.popleft().result()
                start = next(starts, None)
                if start is not None:
                    pending.append(pool.submit(decode, start))
                yield batch
        finally:
            for future in pending:  # the consumer stopped early (an error, Ctrl-C): decode nothing more
                future.cancel()


class ImageFiles(Dataset):
    """Decodes one file per item; a bad file yields its error instead of raising, so a build never stops.

    Each file is read once: its bytes are hashed (duplicates are found by content) and decoded.
    """

    def __init__(self, paths: Sequence[str], transform: ImageTransform, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.paths = list(paths)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            tensor, digest = self.transform.load_with_digest(self.paths[i], self.max_pixels)
            return i, tensor, "", digest
        except ImageError as exc:
            return i, None, str(exc), ""


def _collate(items):
    positions = np.array([item[0] for item in items], dtype=np.int64)
    ok = np.array([item[1] is not None for item in items], dtype=bool)
    tensors = [item[1] for item in items if item[1] is not None]
    batch = torch.stack(tensors) if tensors else None
    return positions, batch, ok, [item[2] for item in items], [item[3] for item in items]


def _die_with_parent():
    """Linux: the kernel kills this worker the moment its parent dies (even by SIGKILL), so none outlives a build."""
    try:
        import ctypes
        import signal
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux/glibc: torch's own watchdog still ends orphans, only later
        pass


def _worker_init(_):
    _die_with_parent()
    # One thread per decoder, and a lower priority: on a small CPU the model's threads are the
    # bottleneck, and a decoder that preempts them stalls every thread of the parallel region.
    # The prefetch queue lets decoders catch up in the gaps.
    torch.set_num_threads(1)
    try:
        os.nice(10)
    except OSError:
        pass


PRECISION_KEY = "precision"  # in Backbone.extras: {"name": "int8", "calibration": geoindex.runtime.Calibration}
QUANTIZED = ("int8",)        # precisions whose model depends on calibration photos: embeddings are not interchangeable


def set_precision(backbone: Backbone, precision: str, calibration_paths: Sequence[str] = ()) -> None:
    """Embed with this backbone at `precision` from now on: "auto" (bf16 in OpenVINO on a CPU with native bf16,
    else fp32), "fp32", "bf16", or "int8" calibrated on those photos (decoded and normalised as the model takes them)."""
    from .runtime import Calibration, check_precision

    precision = check_precision(precision)
    if precision == ExtractionConfig.precision:
        backbone.extras.pop(PRECISION_KEY, None)
    elif precision != "int8":
        backbone.extras[PRECISION_KEY] = {"name": precision}
    else:
        def load(path):
            return backbone.normalize(backbone.transform.load(path).unsqueeze(0))[0]

        backbone.extras[PRECISION_KEY] = {"name": precision, "calibration": Calibration(calibration_paths, load)}


def precision_of(backbone: Backbone) -> str:
    return (backbone.extras.get(PRECISION_KEY) or {}).get("name", ExtractionConfig.precision)


@dataclass
class EmbeddedBatch:
    positions: np.ndarray   # indices into the `paths` given to iter_embeddings
    ok: np.ndarray          # bool per position
    embeddings: np.ndarray  # float32 (ok.sum(), D), L2-normalised
    errors: list[str]       # "" where ok
    digests: list[str] | None = None  # content hash of each file's bytes, "" where unreadable


class Embedder:
    """Runs a backbone on uint8 batches with the settings that make it fast on the device.

    runtime: "auto" (OpenVINO on a CPU when installed, else PyTorch), "torch" or "openvino"; None for the
    process default (geoindex.runtime.set_default_runtime, the CLI's --runtime, or $GEOINDEX_RUNTIME).
    The precision is the backbone's (set_precision): auto unless a build asked for another.
    """

    def __init__(self, backbone: Backbone, device="auto", amp: bool | None = None, channels_last: bool = True,
                 normalize: bool = True, runtime: str | None = None):
        from .runtime import compile_model

        self.backbone = backbone
        self.normalize = normalize
        self.device = resolve_device(device)
        backbone.to(self.device).model.eval()
        precision = backbone.extras.get(PRECISION_KEY) or {}
        self.model = compile_model(backbone.model, backbone.image_size, self.device, runtime=runtime, amp=amp,
                                   channels_last=channels_last, label=f"{backbone.name} ({backbone.image_size} px)",
                                   precision=precision.get("name", ExtractionConfig.precision),
                                   calibration=precision.get("calibration"))
        self.runtime = self.model.name
        backbone.extras["runtime"] = self.model.info()  # what embedded, for the manifest

    @torch.inference_mode()
    def __call__(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        target = self.device if self.runtime == "torch" else torch.device("cpu")
        x = self.backbone.normalize(batch_uint8.to(target, non_blocking=True))
        features = self.model(x).float()
        return torch.nn.functional.normalize(features, dim=1) if self.normalize else features


def iter_embeddings(backbone: Backbone, paths: Sequence[str], batch_size: int = 64, *,
                    num_workers: int | None = None, device="auto", amp: bool | None = None, progress: bool = True,
                    desc: str = "embedding", normalize: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    runtime: str | None = None) -> Iterator[EmbeddedBatch]:
    """Yield embeddings batch by batch, in the order of `paths`; memory stays at one batch."""
    from tqdm.auto import tqdm

    embedder = Embedder(backbone, device, amp, normalize=normalize, runtime=runtime)
    num_workers = default_num_workers(embedder.device) if num_workers is None else num_workers
    files = ImageFiles(paths, backbone.transform, max_pixels)
    if num_workers:
        loader = DataLoader(files, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
                            pin_memory=embedder.device.type == "cuda", worker_init_fn=_worker_init,
                            prefetch_factor=4, persistent_workers=False)
    else:
        loader = _decoded_batches(files, batch_size, decode_threads())
    trim_countdown = TRIM_EVERY_IMAGES
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, smoothing=0.05) as bar:
        for positions, batch, ok, errors, digests in loader:
            if batch is not None:
                embeddings = embedder(batch).cpu().numpy()
            else:
                embeddings = np.zeros((0, backbone.embed_dim), dtype=np.float32)
            trim_countdown -= len(positions)
            if trim_countdown <= 0 and embedder.device.type == "cpu":
                # Periodic, not per batch: each trim makes the next batch fault its pages in again (~12% at every batch).
                release_free_memory()
                trim_countdown = TRIM_EVERY_IMAGES
            bar.update(len(positions))
            yield EmbeddedBatch(positions, ok, embeddings, errors, digests)


def embed_paths(backbone: Backbone, paths: Sequence[str], **kwargs) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All at once: (embeddings with NaN rows for unreadable files, ok mask, errors)."""
    out = np.full((len(paths), backbone.embed_dim), np.nan, dtype=np.float32)
    ok_all = np.zeros(len(paths), dtype=bool)
    errors = [""] * len(paths)
    for item in iter_embeddings(backbone, paths, **kwargs):
        out[item.positions[item.ok]] = item.embeddings
        ok_all[item.positions] = item.ok
        for p, e in zip(item.positions, item.errors):
            errors[p] = e
    return out, ok_all, errors


def prepare_runtime(backbone, device="cpu", runtime: str | None = None) -> dict:
    """Export and compile the backbone's model now (a build calls this before its clock starts), so the
    Embedder that follows finds it compiled; returns what will run, as the manifest records it."""
    return Embedder(backbone, device, runtime=runtime).model.info()
