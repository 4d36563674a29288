"""Where the embedding model runs: eager PyTorch, or OpenVINO on a CPU.

On a CPU nearly all of a build, a query or a served request is the backbone's forward pass, and eager
PyTorch runs EfficientNet-Lite's depthwise convolution, BatchNorm and ReLU6 as separate kernels.
OpenVINO compiles the same module into fused kernels: on a 2-core CPU it embeds several times the
photos per second (benchmarks/extract.py), in fp32, with embeddings that match PyTorch's to a cosine of
1 - 1e-6 per photo. So an index built with one runtime answers queries embedded with another; the
runtime a build used is recorded in its manifest for information only.

`compile_model(module, image_size, device, runtime)` is the one place where a backbone's module becomes
a callable, float (N, 3, H, W) -> (N, D) float32, for the runtime chosen: "auto" (OpenVINO on a CPU when
it is installed, PyTorch on a GPU), "torch" or "openvino". The exported model is cached in the user
cache ($GEOINDEX_CACHE, else $XDG_CACHE_HOME/geoindex, else ~/.cache/geoindex), keyed by the sha256 of
the module's weights as loaded (so a tuned backbone, or one trained in place, gets its own export),
written atomically and checked (sizes and sha256) before it is used; a damaged entry is exported again.
Every export is compared with PyTorch on a fixed input before it is used, and refused (PyTorch runs
instead) if any photo's cosine falls below TOLERANCE.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .errors import GeoindexError
from .runtime_choice import PRECISIONS, RUNTIME_ENV, RUNTIMES

# Beside each cached export: what it was exported from and the sizes and sha256 of its files.
EXPORT_META = "export.json"

CACHE_ENV = "GEOINDEX_CACHE"
OPENVINO_INSTALL = "pip install 'openvino>=2025.1'"
# Lowest cosine between a photo's embedding from another runtime and from PyTorch fp32 that is accepted.
# Measured on real photos: 1 - 2e-7 for OpenVINO fp32 (tests/test_runtime.py asserts it per photo).
TOLERANCE = 0.9999
# The same for an int8 export (NNCF post-training quantization, calibrated on the index's own train photos), on the
# calibration photos themselves. Measured (effnet): lowest 0.926 on the 300 of a London-or-London build; on 96 other
# photos lowest 0.940, mean 0.986 (benchmarks/extract.py);
# benchmarks/README.md has what that does to city accuracy and revisit recall. Queries embed in fp32: an int8
# index is only built when every calibration photo's int8 embedding is within this of its fp32 one.
INT8_TOLERANCE = 0.90
# The same for OpenVINO's bf16 inference (CPUs that compute bf16 natively: AMX or AVX512-BF16), checked on the fixed
# input of every export and asserted per real photo (tests/test_runtime.py). Measured on 256 London-or-London photos
# (Xeon with AMX, benchmarks/extract.py --runtimes ...,openvino-bf16): lowest 0.9917 (EfficientNet-Lite0) and 0.9931
# (effnet-duo), mean 0.9988 and 0.9978. benchmarks/README.md has what it does to city accuracy and revisit recall.
BF16_TOLERANCE = 0.98
STREAMS_ENV = "GEOINDEX_OPENVINO_STREAMS"  # override of the streams below (benchmarks/extract.py compares them)
MAX_STREAMS = 4           # past a few streams a CNN's batch chunks get too small to keep a core's vector units fed
CACHE_FORMAT = 2          # bump when what an export holds changes (2: its bf16 agreement is recorded)
INT8_RECIPE = 1           # bump when the quantization settings below change: int8 exports are cached under it
CACHE_KEEP = 16           # exports kept in the user cache, most recently used first
_LOADED_KEEP = 4          # compiled models kept in memory, for the next Embedder of the same module

_default_runtime: str | None = None
_said: set[str] = set()
_lock = threading.RLock()
_loaded: OrderedDict = OrderedDict()
_bf16_agreement: dict[str, float] = {}  # export key -> lowest cosine of its bf16 inference to PyTorch fp32
_native_bf16: bool | None = None


def say_once(message: str) -> None:
    """Tell the user something about the runtime once per process (stderr, so --json output stays clean)."""
    with _lock:
        if message in _said:
            return
        _said.add(message)
    print(f"geoindex: {message}", file=sys.stderr, flush=True)


def check_runtime(name: str | None) -> str:
    value = str(name).strip().lower() if name is not None else ""
    if value not in RUNTIMES:
        raise GeoindexError(f"unknown runtime {name!r}; choose one of: {', '.join(RUNTIMES)}")
    return value


def set_default_runtime(name: str | None) -> None:
    """The runtime every Embedder of this process uses unless told otherwise (the CLI's --runtime)."""
    global _default_runtime
    _default_runtime = None if name is None else check_runtime(name)


def default_runtime() -> str:
    if _default_runtime is not None:
        return _default_runtime
    env = os.environ.get(RUNTIME_ENV)
    if env:
        try:
            return check_runtime(env)
        except GeoindexError as exc:
            raise GeoindexError(f"{RUNTIME_ENV}: {exc}") from None
    return "auto"


def _openvino():
    """The openvino module, or None when it cannot be imported.

    Importing openvino (and each convert_model) reports usage to Google Analytics and writes a client id under
    ~/intel unless the user opted out; geoindex makes no network traffic it was not asked for, so openvino is
    imported with its telemetry package hidden, and OpenVINO falls back to its own no-op stand-in.
    """
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]  # import fails -> stub
    try:
        import openvino
        return openvino
    except ImportError:
        return None
    except Exception as exc:  # installed but broken (a missing shared library, say): as good as absent
        say_once(f"OpenVINO is installed but cannot be loaded ({str(exc).strip()[:200] or type(exc).__name__})")
        return None


def resolve_runtime(requested: str | None, device) -> str:
    """The runtime that will run: 'torch' or 'openvino'. Falls back to torch, saying why once."""
    requested = check_runtime(requested) if requested is not None else default_runtime()
    if requested == "torch":
        return "torch"
    device = torch.device(device)
    if device.type != "cpu":
        if requested == "openvino":
            say_once(f"--runtime openvino runs on the CPU; on {device.type} the model runs in PyTorch")
        return "torch"
    if _openvino() is None:
        say_once(f"OpenVINO is not installed, so the model runs in eager PyTorch (several times slower on a CPU); "
                 f"install it with: {OPENVINO_INSTALL}")
        return "torch"
    return "openvino"


def check_precision(name: str | None) -> str:
    value = str(name).strip().lower() if name is not None else "auto"
    if value not in PRECISIONS:
        raise GeoindexError(f"unknown precision {name!r}; choose one of: {', '.join(PRECISIONS)}")
    return value


def native_bf16() -> bool:
    """Whether OpenVINO computes bf16 natively on this CPU (AMX or AVX512-BF16): it then makes bf16 its own default."""
    global _native_bf16
    if _native_bf16 is None:
        ov = _openvino()
        try:
            _native_bf16 = ov is not None and ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT") == ov.Type.bf16
        except Exception:  # an OpenVINO without the property, or no CPU plugin: as good as no bf16
            _native_bf16 = False
    return _native_bf16


def resolve_precision(requested: str | None, runtime: str) -> str:
    """The precision that will run: "fp32", "bf16" or "int8". auto is bf16 in OpenVINO on a CPU that computes bf16
    natively (about twice fp32's photos/s there, within BF16_TOLERANCE of it), else fp32; eager PyTorch runs fp32."""
    precision = check_precision(requested)
    if precision == "int8":
        return precision
    if precision == "auto":
        return "bf16" if runtime == "openvino" and native_bf16() else "fp32"
    if precision == "bf16" and not (runtime == "openvino" and native_bf16()):
        raise GeoindexError("--precision bf16 runs in OpenVINO on a CPU with AMX or AVX512-BF16" + (
            "" if runtime == "openvino" else " (use --runtime auto or openvino)") + "; this one would emulate it, "
            "slower than fp32: use --precision fp32 or auto")
    return precision


def describe_runtime(name: str, device=None, precision: str = "fp32") -> dict:
    """What the manifest records about the runtime that embedded an index."""
    if name == "openvino":
        ov = _openvino()
        return {"name": "openvino", "version": ov.get_version().split("-")[0] if ov else None,
                "precision": {"int8": "i8", "bf16": "bf16"}.get(precision, "f32")}
    cuda = device is not None and torch.device(device).type == "cuda"
    return {"name": "torch", "version": torch.__version__, "precision": "fp16 autocast" if cuda else "f32"}


# ------------------------------------------------------------------------------------------- PyTorch
class TorchModel:
    """Eager PyTorch: inference_mode, channels-last, fp16 autocast on a GPU."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, device, amp: bool | None = None, channels_last: bool = True):
        self.module = module
        self.device = torch.device(device)
        self.amp = (self.device.type == "cuda") if amp is None else amp
        self.channels_last = channels_last
        if channels_last:
            module.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp):
            return self.module(x).float()

    def info(self) -> dict:
        return describe_runtime("torch", self.device) | ({"precision": "bf16 autocast"} if self.amp and
                                                          self.device.type == "cpu" else {})


# ------------------------------------------------------------------------------------------- OpenVINO
def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "geoindex"
    return Path(base).expanduser() / "openvino"


def _versions(module: torch.nn.Module) -> int:
    """Sum of the in-place version counters of the module's tensors: it changes when any is trained or loaded."""
    return sum(getattr(t, "_version", 0) for t in (*module.parameters(), *module.buffers()))


def _describe_graph(module: torch.nn.Module) -> str:
    """Everything but the weights that decides what the module computes (its modules and their settings)."""
    return f"{type(module).__module__}.{type(module).__qualname__}\n{module!r}"


def export_key(module: torch.nn.Module, image_size: int) -> str:
    """sha256 of the module's weights as loaded, its structure, the input size and the OpenVINO version."""
    ov = _openvino()
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, "openvino": ov.get_version() if ov else None,
                              "input": [3, image_size, image_size], "graph": _describe_graph(module)}).encode())
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(module: torch.nn.Module, image_size: int):
    """The module as an OpenVINO model with a dynamic batch, traced on the CPU at this input size."""
    ov = _openvino()
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and tracer warnings: nothing a user can act on
            return ov.convert_model(module, example_input=torch.zeros(1, 3, image_size, image_size),
                                    input=[(-1, 3, image_size, image_size)])
    finally:
        module.train(was_training)


def _read_cached(folder: Path):
    """(model, what was recorded beside it) from `folder` if its files are whole (sizes and sha256 as recorded),
    else raise ValueError."""
    ov = _openvino()
    try:
        meta = json.loads((folder / EXPORT_META).read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"no readable {EXPORT_META} ({type(exc).__name__})") from None
    for name in ("model.xml", "model.bin"):
        path = folder / name
        expected = files.get(name) if isinstance(files, dict) else None
        if not isinstance(expected, dict) or not path.is_file():
            raise ValueError(f"{name} is missing")
        if path.stat().st_size != expected.get("size") or _file_digest(path) != expected.get("sha256"):
            raise ValueError(f"{name} does not match its recorded size and sha256")
    try:
        return ov.Core().read_model(str(folder / "model.xml")), meta
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        raise ValueError(f"OpenVINO cannot read it: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") from None


def _write_cache(folder: Path, model, info: dict) -> None:
    """Save to a private folder, then rename it into place: a reader sees a whole export or none."""
    ov = _openvino()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)  # fp32 weights: embeddings must match
        files = {name: {"size": (tmp / name).stat().st_size, "sha256": _file_digest(tmp / name)}
                 for name in ("model.xml", "model.bin")}
        (tmp / EXPORT_META).write_text(json.dumps(info | {"files": files}, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / EXPORT_META).is_file():  # not another process's identical export: something else
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune_cache(root: Path, keep: int = CACHE_KEEP) -> None:
    """Keep the most recently used exports; each tuned backbone adds one (20-50 MB for the EfficientNets)."""
    with contextlib.suppress(OSError):
        entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / EXPORT_META).exists()]
        entries.sort(key=lambda p: (p / EXPORT_META).stat().st_mtime, reverse=True)
        for old in entries[keep:]:
            shutil.rmtree(old, ignore_errors=True)


def _fixed_input(image_size: int, n: int = 2) -> torch.Tensor:
    """A reproducible batch in the normalised input range, to compare a runtime with PyTorch."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, image_size, image_size, generator=generator) * 4 - 2


def min_cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).reshape(len(a), -1), np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(cos.min())


def _agreement(module: torch.nn.Module, model, image_size: int, hints=("f32",)) -> list[float]:
    """Lowest cosine between the export's outputs (at each inference precision hint) and PyTorch fp32's on a fixed
    batch: checked once per export (the cache then guards the files by sha256), so a conversion that went wrong,
    or a bf16 inference that strays, is never used."""
    x = _fixed_input(image_size)
    with torch.inference_mode():
        reference = module(x).float().numpy()
    core = _openvino().Core()
    return [min_cosine(core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint}).create_infer_request()
                       .infer({0: x.numpy()})[0], reference) for hint in hints]


def bf16_agreement(module: torch.nn.Module, model, image_size: int, key: str) -> float:
    """The export's bf16 agreement with PyTorch fp32: as _exported_model found it recorded beside the export (made
    on a CPU with native bf16), else measured once in this process."""
    with _lock:
        if key not in _bf16_agreement:
            _bf16_agreement[key] = _agreement(module, model, image_size, ("bf16",))[0]
        return _bf16_agreement[key]


def _exported_model(module: torch.nn.Module, image_size: int, label: str, key: str):
    """(OpenVINO model, where it came from), from the user cache or a fresh export cached for next time."""
    root = cache_root()
    folder = root / f"{key[:40]}-{image_size}px"
    if folder.exists():
        try:
            model, meta = _read_cached(folder)
            with contextlib.suppress(OSError):
                os.utime(folder / EXPORT_META)  # most recently used: kept by _prune_cache
            if isinstance(meta.get("min_cosine_bf16_vs_torch"), (int, float)):
                with _lock:
                    _bf16_agreement[key] = float(meta["min_cosine_bf16_vs_torch"])
            return model, f"cached {folder}"
        except ValueError as why:
            say_once(f"the cached OpenVINO export {folder} is damaged ({why}); exporting it again")
            shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    # Every export is announced (a pause of seconds otherwise unexplained), not only the first of a process.
    print(f"geoindex: exporting {label} (weights {key[:12]}) to OpenVINO, once: it is cached in {root}",
          file=sys.stderr, flush=True)
    model = _convert(module, image_size)
    agreement, *bf16 = _agreement(module, model, image_size, ("f32", "bf16") if native_bf16() else ("f32",))
    if bf16:
        _bf16_agreement[key] = bf16[0]
    if not agreement >= TOLERANCE:
        raise GeoindexError(f"its OpenVINO export disagrees with PyTorch (cosine {agreement:.6f} < {TOLERANCE})")
    seconds = time.perf_counter() - started
    ov = _openvino()
    info = {"key": key, "label": label, "input": [-1, 3, image_size, image_size], "openvino": ov.get_version(),
            "torch": torch.__version__, "export_seconds": round(seconds, 2), "min_cosine_vs_torch": agreement,
            **({"min_cosine_bf16_vs_torch": bf16[0]} if bf16 else {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return model, _cache_export(root, folder, model, info, f"exported in {seconds:.0f} s", "OpenVINO export",
                                "exported")


class Calibration:
    """The photos an int8 export is calibrated on (a build: a seeded sample of the index's own train photos) and how
    they become model inputs. `key` names them cheaply (paths, sizes, mtimes), for the export cache."""

    def __init__(self, paths, load):
        self.paths = [str(p) for p in paths]
        self.load = load  # path -> float (3, H, W) tensor, normalised as the model takes it
        digest = hashlib.sha256()
        for path in self.paths:
            try:
                st = os.stat(path)
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path}\0missing\n".encode())
        self.key = digest.hexdigest()

    def inputs(self) -> np.ndarray:
        from .errors import ImageError
        tensors = []
        for path in self.paths:
            with contextlib.suppress(ImageError):  # an unreadable photo is simply not among them
                tensors.append(self.load(path))
        if len(tensors) < 8:
            raise GeoindexError(f"int8 calibration needs photos; only {len(tensors)} of {len(self.paths)} could be read")
        return torch.stack(tensors).numpy()


def _nncf():
    try:
        import nncf
        return nncf
    except ImportError:
        raise GeoindexError("--precision int8 needs NNCF: pip install 'nncf>=2.14'") from None


def _quantize(model, inputs: np.ndarray):
    """NNCF post-training quantization of an fp32 OpenVINO model. The first and last convolution stay in fp32 (with
    every layer in int8, EfficientNet-Lite's embeddings agreed visibly less with fp32's), activations are asymmetric
    (ReLU6 outputs) and the bias correction is the full one."""
    nncf = _nncf()
    convolutions = [op.get_friendly_name() for op in model.get_ordered_ops()
                    if op.get_type_name() in ("Convolution", "GroupConvolution")]
    ignored = nncf.IgnoredScope(names=[convolutions[0], convolutions[-1]]) if len(convolutions) > 2 else None
    dataset = nncf.Dataset([inputs[i:i + 1] for i in range(len(inputs))])
    nncf.set_log_level(logging.ERROR)  # its per-layer INFO lines say nothing a user can act on
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        return nncf.quantize(model, dataset, subset_size=len(inputs), preset=nncf.QuantizationPreset.MIXED,
                             fast_bias_correction=False, ignored_scope=ignored)


def _int8_model(module: torch.nn.Module, image_size: int, label: str, key: str, calibration: Calibration):
    """(int8 OpenVINO model, where it came from): the fp32 export quantized on the calibration photos, checked
    against PyTorch fp32 on those photos (INT8_TOLERANCE), cached under the weights, the photos and the recipe."""
    root = cache_root()
    int8_key = hashlib.sha256(f"{key}\0int8-{INT8_RECIPE}\0{calibration.key}".encode()).hexdigest()
    folder = root / f"{int8_key[:40]}-{image_size}px-int8"
    if folder.exists():
        try:
            model, _ = _read_cached(folder)
            with contextlib.suppress(OSError):
                os.utime(folder / EXPORT_META)
            return model, f"cached {folder}"
        except ValueError as why:
            say_once(f"the cached int8 export {folder} is damaged ({why}); quantizing it again")
            shutil.rmtree(folder, ignore_errors=True)
    fp32, _ = _exported_model(module, image_size, label, key)
    started = time.perf_counter()
    print(f"geoindex: quantizing {label} to int8 on {len(calibration.paths)} of the index's train photos, once: "
          f"it is cached in {root}", file=sys.stderr, flush=True)
    inputs = calibration.inputs()
    model = _quantize(fp32, inputs)
    compiled = _openvino().Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    got, want = [], []
    with torch.inference_mode():
        for start in range(0, len(inputs), 32):
            chunk = inputs[start:start + 32]
            got.append(np.array(request.infer({0: chunk})[0]))
            want.append(module(torch.from_numpy(chunk)).float().numpy())
    agreement = min_cosine(np.concatenate(got), np.concatenate(want))
    if not agreement >= INT8_TOLERANCE:
        raise GeoindexError(f"its int8 export disagrees with fp32 on the calibration photos (cosine {agreement:.4f} "
                            f"< {INT8_TOLERANCE}); build with --precision fp32")
    seconds = time.perf_counter() - started
    info = {"key": int8_key, "fp32_key": key, "label": label, "precision": "int8", "recipe": INT8_RECIPE,
            "calibration_photos": len(inputs), "input": [-1, 3, image_size, image_size],
            "openvino": _openvino().get_version(), "quantize_seconds": round(seconds, 2),
            "min_cosine_vs_torch": agreement, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return model, _cache_export(root, folder, model, info, f"quantized in {seconds:.0f} s", "int8 export", "quantized")


def _cache_export(root: Path, folder: Path, model, info: dict, done: str, what: str, verb: str) -> str:
    """Keep a fresh export for the next run (best effort: a full or read-only cache costs only time); says where."""
    try:
        _write_cache(folder, model, info)
        _prune_cache(root)
        return f"{done} to {folder}"
    except OSError as exc:
        say_once(f"cannot cache the {what} in {root} ({exc.strerror or exc}); it is {verb} again next run")
        return f"{done} (not cached)"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _compile_config(threads: int | None, streams: int | None, precision: str = "fp32", stretch: bool = True) -> dict:
    """Up to MAX_STREAMS streams sharing the cores (on 2 cores: two streams of one thread), each batch split among
    them; at the precision asked (bf16, or f32 for fp32 and for an int8 model's layers left in float).

    On a small CPU a multi-threaded operator waits at every step for its slowest thread, so a DataLoader
    decoder (or an HTTP thread) taking a core stalls the whole model; one-thread streams each lose only what
    they lose themselves, as `geoindex serve`'s two model threads do for the same reason. On an idle 2-core
    CPU one stream of two threads measured the same (effnet-duo end to end, 43 photos/s either way).
    stretch=False keeps exactly `threads`: a model one caller runs beside the others (the dense matcher in
    `geoindex serve`'s decoding lane) takes that caller's share of the cores, not all of them.
    The precision is always named: on CPUs with AMX or AVX512-BF16 OpenVINO would otherwise pick bf16 by itself,
    unchecked, for an fp32 or int8 model too.
    """
    threads = max(1, threads or torch.get_num_threads())
    cores = usable_cores()
    # `geoindex serve` gives each of its model threads a share of the cores as torch threads: together they
    # use them all, so the compiled model (shared by the model threads) gets all of them too.
    total = threads * max(1, cores // threads) if stretch else threads
    streams = max(1, streams or int(os.environ.get(STREAMS_ENV) or 0) or min(total, MAX_STREAMS))
    per_stream = max(1, total // streams)
    return {"PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT", "NUM_STREAMS": str(streams),
            "INFERENCE_NUM_THREADS": str(streams * per_stream),
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}


class OpenVinoModel:
    """A module exported to OpenVINO and compiled for the CPU; callable from several threads at once (each thread
    has its own infer request, and the compiled model one stream per concurrent caller)."""

    name = "openvino"

    def __init__(self, module: torch.nn.Module, image_size: int, label: str = "the model", threads: int | None = None,
                 streams: int | None = None, precision: str | None = None, calibration: Calibration | None = None,
                 stretch_threads: bool = True):
        self.module, self.image_size, self.label = module, image_size, label
        self.precision, self.calibration = resolve_precision(precision, "openvino"), calibration
        if self.precision == "int8" and calibration is None:
            raise GeoindexError("an int8 model needs calibration photos")
        self.config = _compile_config(threads, streams, self.precision, stretch_threads)
        self.streams = int(self.config["NUM_STREAMS"])
        self._local = threading.local()
        self._rebuild = threading.Lock()
        self._load()

    def _load(self) -> None:
        ov = _openvino()
        self._version = _versions(self.module)
        self.key = export_key(self.module, self.image_size)
        memo = (self.key, tuple(sorted(self.config.items())), self.precision,
                self.calibration.key if self.calibration is not None else None)
        with _lock:
            compiled = _loaded.get(memo)
        self.source = "compiled earlier in this process"
        if compiled is None:
            if self.precision == "int8":
                model, self.source = _int8_model(self.module, self.image_size, self.label, self.key, self.calibration)
            else:
                model, self.source = _exported_model(self.module, self.image_size, self.label, self.key)
            if self.precision == "bf16":
                agreement = bf16_agreement(self.module, model, self.image_size, self.key)
                if not agreement >= BF16_TOLERANCE:
                    say_once(f"{self.label} strays in bf16 (cosine {agreement:.4f} to fp32 < {BF16_TOLERANCE}); "
                             "it runs in fp32")
                    self.precision = "fp32"
                    self.config = self.config | {"INFERENCE_PRECISION_HINT": "f32"}
                    memo = (self.key, tuple(sorted(self.config.items())), self.precision, None)
            compiled = ov.Core().compile_model(model, "CPU", self.config)
        self._compiled = compiled
        self._local = threading.local()  # requests of the previous compiled model must not be reused
        with _lock:
            _loaded[memo] = compiled
            _loaded.move_to_end(memo)
            while len(_loaded) > _LOADED_KEEP:
                _loaded.popitem(last=False)

    def _requests(self) -> list:
        """This thread's infer requests, one per stream: requests are not thread-safe, the compiled model is."""
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = [self._compiled.create_infer_request() for _ in range(self.streams)]
        return requests

    def _infer(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        requests = self._requests()
        chunks = [c for c in np.array_split(x, min(len(requests), max(1, len(x)))) if len(c)]
        if len(chunks) == 1:
            return np.asarray(requests[0].infer({0: chunks[0]}, share_inputs=True, share_outputs=False)[0])
        for request, chunk in zip(requests, chunks):  # each on its own stream, side by side
            request.start_async({0: chunk}, share_inputs=True)
        for request in requests[:len(chunks)]:
            request.wait()
        return np.concatenate([np.array(request.get_output_tensor(0).data) for request in requests[:len(chunks)]])

    def __call__(self, x) -> torch.Tensor:
        if _versions(self.module) != self._version:  # trained or reloaded in place since the export
            with self._rebuild:
                if _versions(self.module) != self._version:
                    self._load()
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
            raise GeoindexError(f"the OpenVINO export of {self.label} takes {self.image_size} px inputs; "
                                f"got {tuple(x.shape)}")
        return torch.from_numpy(self._infer(x))

    def info(self) -> dict:
        return describe_runtime("openvino", precision=self.precision) | {"streams": int(self.config["NUM_STREAMS"]),
                                               "threads": int(self.config["INFERENCE_NUM_THREADS"])}


def compile_model(module: torch.nn.Module, image_size: int, device="cpu", *, runtime: str | None = None,
                  amp: bool | None = None, channels_last: bool = True, label: str = "the model",
                  threads: int | None = None, streams: int | None = None, precision: str | None = None,
                  calibration: Calibration | None = None, stretch_threads: bool = True):
    """The module as a callable float (N, 3, H, W) -> (N, D) float32 tensor (on `device` for torch, on the CPU for
    OpenVINO), for the runtime asked for. An fp32 OpenVINO export that fails or disagrees with PyTorch is said once,
    and PyTorch runs instead; int8 (OpenVINO only) was asked for explicitly, so its failure is an error."""
    device = torch.device(device)
    runs_in = resolve_runtime(runtime, device)
    precision = resolve_precision(precision, runs_in)
    if precision == "int8":
        if runs_in != "openvino":
            raise GeoindexError("--precision int8 runs in OpenVINO on a CPU; use --precision fp32 with "
                                f"--runtime torch or on {device.type}" + ("" if _openvino() else f" ({OPENVINO_INSTALL})"))
        return OpenVinoModel(module, image_size, label, threads=threads, streams=streams, precision="int8",
                             calibration=calibration)
    if runs_in == "openvino" and not amp:
        try:
            return OpenVinoModel(module, image_size, label, threads=threads, streams=streams, precision=precision,
                                 stretch_threads=stretch_threads)
        except Exception as exc:  # an unconvertible module must never stop a build: PyTorch can still run it
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            say_once(f"{label} cannot run in OpenVINO ({detail[:300]}); it runs in PyTorch")
    return TorchModel(module, device, amp=amp, channels_last=channels_last)
