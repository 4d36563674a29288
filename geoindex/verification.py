"""Spatial verification: does a query photo and an indexed photo show the same scene, seen from where each was taken?

Local features (RootSIFT: SIFT descriptors L1-normalised and square-rooted, Arandjelović & Zisserman 2012) are
matched with Lowe's ratio test and a homography is fitted to the matches by RANSAC; the inlier count says how much
of one photo reappears, in place, in the other. Global embeddings rank photos that look alike; inliers separate a
revisited facade from a look-alike street, which is why landmark and place retrieval re-rank their shortlists
this way. Here the street space's first STREET_K (10) neighbours are verified and, where the best holds at least the
inlier count val calibrated (`calibrate_verification`, saved as the street calibration's `verify`), the GPS answer
is that photo's spot at street level.

OpenCV (opencv-python-headless) does the work; without it, or for a photo that cannot be read, nothing is
verified and answers stay as the embeddings give them.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np

RATIO = 0.85            # Lowe's ratio test, looser than his 0.8: seasons and years apart, true matches are weaker
RANSAC_PX = 5.0         # homography reprojection error, in pixels of the photo as read
SIFT_FEATURES = 1000
MAX_SIDE = 640          # larger photos are shrunk first: keypoints at street-view scale, bounded time
CACHE_PHOTOS = 1024     # indexed photos whose features stay in memory (float16: at most 256 KB each, ~80 KB at 224 px)


def opencv():
    """The cv2 module, or None when OpenCV is not installed."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


class Verifier:
    """Local features per photo (a path, cached; or upload bytes, a PIL image or an array, not cached) and the
    inliers between two."""

    def __init__(self, cv2=None, cache_photos: int = CACHE_PHOTOS):
        self.cv2 = cv2 or opencv()
        if self.cv2 is None:
            raise ImportError("spatial verification needs OpenCV: pip install opencv-python-headless")
        self.cache_photos = cache_photos
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
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
                # files and uploads are decoded by geoindex's own decoder, with its checks on size and pixels,
                # so `query` and the service read the same pixels
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

    def features(self, source):
        """(keypoint positions (N, 2) float32, RootSIFT descriptors (N, 128) float16), or None: unreadable, or
        too few keypoints to fit a homography."""
        if source is None:
            return None
        if isinstance(source, LocalFeatures):  # computed already (the service does it beside decoding)
            return source.found
        key = None
        if isinstance(source, str) or hasattr(source, "__fspath__"):
            try:  # a file rewritten in place (an index rebuilt over new photos) is read again
                stat = os.stat(source)
                key = (os.fspath(source), stat.st_mtime_ns, stat.st_size)
            except OSError:
                return None
        if key is not None:
            with self._lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
        image = self._grey(source)
        found = None
        if image is not None:
            try:
                points, descriptors = self._tools()[0].detectAndCompute(image, None)
            except self.cv2.error:  # an image OpenCV cannot work on (too small for its pyramid): not verified
                points, descriptors = (), None
            if descriptors is not None and len(descriptors) >= 4:
                descriptors = np.sqrt(descriptors / (descriptors.sum(1, keepdims=True) + 1e-7))
                found = (np.float32([p.pt for p in points]), descriptors.astype(np.float16))
        if key is not None:
            with self._lock:
                self._cache[key] = found
                while len(self._cache) > self.cache_photos:
                    self._cache.popitem(last=False)
        return found

    def inliers(self, a, b) -> int:
        """RANSAC homography inliers among the ratio-test matches of two photos' features (0: nothing to fit)."""
        if a is None or b is None:
            return 0
        (points_a, desc_a), (points_b, desc_b) = a, b
        matches = self._tools()[1].knnMatch(desc_a.astype(np.float32), desc_b.astype(np.float32), k=2)
        good = [m[0] for m in matches if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
        if len(good) < 5:
            return 0
        # OpenCV's RANSAC draws its samples from a generator of its own with a fixed seed: a pair always gives the
        # same count, in `query` and in the service
        try:
            _, mask = self.cv2.findHomography(points_a[[g.queryIdx for g in good]],
                                              points_b[[g.trainIdx for g in good]], self.cv2.RANSAC, RANSAC_PX)
        except self.cv2.error:
            return 0
        return int(np.count_nonzero(mask)) if mask is not None else 0

    def shortlist_inliers(self, queries: list, candidates: np.ndarray, paths) -> np.ndarray:
        """Inliers (Q, K) between each query (path or image) and its candidates (indexed photo numbers into
        `paths`, -1 for none)."""
        out = np.zeros(candidates.shape, dtype=np.int32)
        for q, source in enumerate(queries):
            query = self.features(source)
            if query is None:
                continue
            for j, i in enumerate(candidates[q]):
                if i >= 0:
                    out[q, j] = self.inliers(query, self.features(paths[int(i)]))
        return out


_shared: Verifier | None = None
_shared_lock = threading.Lock()


def shared_verifier() -> Verifier | None:
    """One Verifier per process (its cache of indexed photos' features is shared), or None without OpenCV."""
    global _shared
    with _shared_lock:
        if _shared is None and opencv() is not None:
            _shared = Verifier()
        return _shared


def best_verified(inliers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(column, inlier count) of each row's best-verified candidate; ties go to the search's earlier one."""
    if not inliers.size:
        return np.zeros(len(inliers), dtype=np.int64), np.zeros(len(inliers), dtype=np.int32)
    column = np.argmax(inliers, axis=1)  # the first of equal counts
    return column, inliers[np.arange(len(inliers)), column]


class LocalFeatures:
    """A photo's features computed ahead of the search (Verifier.features' result), to be used as its source."""

    def __init__(self, found):
        self.found = found
