"""The one place an index's file layout is written down: every file and folder name inside an index.

Names are relative to the index folder (`Path` for those below a subfolder). This module imports nothing of
geoindex, so listing, locking, serving and training code can all read it without importing torch or each other.

    <index>/
      .geoindex              MARKER: geoindex made this folder (nothing without it is ever deleted)
      manifest.json          MANIFEST: what was built, how, and the hash of every file below
      .verified.json         VERIFIED: the stamps of the files last verified against the manifest
      embeddings.h5          EMBEDDINGS: per split, the embeddings and the photos' metadata
      faiss.index            FAISS_INDEX: the train embeddings' search index
      skipped.json           SKIPPED: the photos left out, with their reasons
      backbone.pt            TUNED_WEIGHTS: an adapted index's own backbone (`train` adapts it), or the copy of
                             the one `build --features-from NAME` embeds with
      heads/<mode>/          head_dir(mode): a head ("probe", "finetune") or a tuning ("knn", "hybrid", "tail")
        meta.json head.pt backbone.pt history.csv curves.png checkpoint.pt trunk_features.npz
      heads/knn/params.json whitening.npz whitened.faiss street_whitening.npz street.faiss
      heads/hybrid/params.json
      bench/                 BENCH_DIR: `bench`'s default output folder (results.json, results.md, confusion_*.png)
    <home>/.staging/<name>/  STAGING: an unfinished build, and REEMBED_MARK while `train` re-embeds the index
"""
from __future__ import annotations

from pathlib import Path

MARKER = ".geoindex"
STAGING = ".staging"
MANIFEST = "manifest.json"
VERIFIED = ".verified.json"
EMBEDDINGS = "embeddings.h5"
FAISS_INDEX = "faiss.index"
SKIPPED = "skipped.json"
TUNED_WEIGHTS = "backbone.pt"
REEMBED_MARK = "reembed.json"
INDEX_FILES = (EMBEDDINGS, FAISS_INDEX, SKIPPED)

HEADS = "heads"
HEAD_MODES = ("probe", "finetune")
# Inside heads/<mode>/:
HEAD_META = "meta.json"
HEAD_WEIGHTS = "head.pt"
HEAD_BACKBONE = "backbone.pt"  # the fine-tuned (or adapted) backbone the head reads
HISTORY = "history.csv"
CURVES = "curves.png"
CHECKPOINT = "checkpoint.pt"
TRUNK_CACHE = "trunk_features.npz"
HEAD_FILES = (HEAD_META, HEAD_WEIGHTS, HEAD_BACKBONE)  # what a query loads: the service reloads when one changes
TAIL_MODE = "tail"  # `train`'s adaptation of the backbone's tail: its resume files live in heads/tail/


def head_dir(mode: str) -> Path:
    """heads/<mode>, relative to the index folder."""
    return Path(HEADS) / mode


KNN_DIR = head_dir("knn")
KNN_PARAMS = KNN_DIR / "params.json"
WHITENING = KNN_DIR / "whitening.npz"
WHITENED_INDEX = KNN_DIR / "whitened.faiss"
STREET_WHITENING = KNN_DIR / "street_whitening.npz"
STREET_INDEX = KNN_DIR / "street.faiss"
HYBRID_PARAMS = head_dir("hybrid") / "params.json"

# What `bench` writes: its outputs, by default into <index>/bench/ (never a head, a tuning or the manifest).
BENCH_DIR = "bench"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
