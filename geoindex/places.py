"""Places for metric learning: which training photos show the same spot, batches of P places x K photos, and the
multi-similarity loss that pulls a place's photos together and pushes other places away.

The recipe is GSV-Cities' (Ali-bey et al., 2022), which MixVPR and BoQ train with: a place is a GSV-Cities place id
or, where the data has coordinates instead, a group of photos within SPOT_M of each other; a batch holds P places
with K photos each; the loss is the multi-similarity loss (Wang et al., 2019) over cosine similarities with its
miner. Two photos count as the same place when they share a place id or lie within SPOT_M of each other, as the
revisit protocol scores them (geoindex.revisit); as different places only when they are further apart than
APART_M (or have different place ids and no coordinates): a photo 40 m along the same street is neither pulled
nor pushed.
"""
from __future__ import annotations

import numpy as np
import torch

from .revisit import SPOT_M
from .voting import EARTH_RADIUS_KM

APART_M = 100.0
# gsv-cities' settings for the loss and its miner (pytorch-metric-learning's MultiSimilarityLoss/Miner)
MS_ALPHA, MS_BETA, MS_BASE, MS_EPSILON = 1.0, 50.0, 0.0, 0.1


def group_places(lat, lon, place_id=None, radius_m: float = SPOT_M) -> np.ndarray:
    """A place number per photo (-1: a photo alone at its spot). Place ids where the data has them (>= 0);
    otherwise photos within radius_m of a seed photo, seeds taken in order of how many photos lie around them,
    so a place sits on a revisited spot rather than between two."""
    from sklearn.neighbors import BallTree

    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    places = np.full(len(lat), -1, dtype=np.int64)
    if place_id is not None and (np.asarray(place_id) >= 0).any():
        ids = np.asarray(place_id, dtype=np.int64)
        known = ids >= 0
        _, places[known] = np.unique(ids[known], return_inverse=True)
    else:
        located = np.flatnonzero(np.isfinite(lat) & np.isfinite(lon))
        if len(located):
            points = np.radians(np.column_stack([lat[located], lon[located]]))
            near = BallTree(points, metric="haversine").query_radius(points, radius_m / 1000 / EARTH_RADIUS_KM)
            order = np.argsort(-np.array([len(n) for n in near]), kind="stable")
            number = 0
            for seed in order:
                if places[located[seed]] >= 0:
                    continue
                members = located[near[seed]]
                members = members[places[members] < 0]
                places[members] = number
                number += 1
    sizes = np.bincount(places[places >= 0]) if (places >= 0).any() else np.zeros(0, dtype=np.int64)
    alone = (places >= 0) & (sizes[np.clip(places, 0, None)] < 2) if len(sizes) else places >= 0
    places[alone] = -1
    _, places[places >= 0] = np.unique(places[places >= 0], return_inverse=True)
    return places


def place_batches(places: np.ndarray, places_per_batch: int, photos_per_place: int, generator: torch.Generator):
    """One epoch of batches (arrays of photo numbers): every place of two or more photos once, in a random order,
    P places a batch, K of its photos drawn at random (all of them when it has fewer)."""
    numbers = np.flatnonzero(np.bincount(places[places >= 0]) >= 2) if (places >= 0).any() else np.zeros(0, int)
    members = {p: np.flatnonzero(places == p) for p in numbers}
    order = numbers[torch.randperm(len(numbers), generator=generator).numpy()]
    for start in range(0, len(order), places_per_batch):
        chosen = order[start:start + places_per_batch]
        if len(chosen) < 2:  # a lone place has no negative to push away
            continue
        batch = []
        for place in chosen:
            photos = members[place]
            if len(photos) > photos_per_place:
                photos = photos[torch.randperm(len(photos), generator=generator)[:photos_per_place].numpy()]
            batch.append(photos)
        yield np.sort(np.concatenate(batch))


def pair_masks(rows: torch.Tensor, places: torch.Tensor, lat: torch.Tensor, lon: torch.Tensor):
    """(same place, different places) boolean matrices for photos `rows` (the diagonal is neither)."""
    p, la, lo = places[rows], torch.deg2rad(lat[rows]), torch.deg2rad(lon[rows])
    # haversine, in metres; NaN where a photo has no coordinates
    a = torch.sin((la[:, None] - la[None, :]) / 2) ** 2 + torch.cos(la[:, None]) * torch.cos(la[None, :]) * \
        torch.sin((lo[:, None] - lo[None, :]) / 2) ** 2
    metres = 2 * EARTH_RADIUS_KM * 1000 * torch.asin(torch.sqrt(a.clamp(0, 1)))
    same_id = (p[:, None] == p[None, :]) & (p[:, None] >= 0)
    located = torch.isfinite(metres)
    same = same_id | (located & (metres <= SPOT_M))
    apart = ~same & torch.where(located, metres > APART_M, ~same_id)
    eye = torch.eye(len(rows), dtype=torch.bool, device=rows.device)
    return same & ~eye, apart & ~eye


def multi_similarity_loss(embeddings: torch.Tensor, same: torch.Tensor, apart: torch.Tensor, alpha: float = MS_ALPHA,
                          beta: float = MS_BETA, base: float = MS_BASE, epsilon: float = MS_EPSILON) -> torch.Tensor:
    """The multi-similarity loss over L2-normalised embeddings, after its miner: a positive pair is kept when it is
    less similar than the anchor's most similar negative plus epsilon, a negative when it is more similar than the
    anchor's least similar positive minus epsilon. Mean over anchors with a kept pair; 0 when there is none."""
    sim = embeddings @ embeddings.T
    big = torch.finfo(sim.dtype).max
    hardest_negative = torch.where(apart, sim, torch.full_like(sim, -big)).amax(1, keepdim=True)
    easiest_positive = torch.where(same, sim, torch.full_like(sim, big)).amin(1, keepdim=True)
    positives = same & (sim - epsilon < hardest_negative)
    negatives = apart & (sim + epsilon > easiest_positive)
    pos_term = torch.log1p(torch.where(positives, torch.exp(-alpha * (sim - base)), torch.zeros_like(sim)).sum(1)) / alpha
    neg_term = torch.log1p(torch.where(negatives, torch.exp(beta * (sim - base)), torch.zeros_like(sim)).sum(1)) / beta
    anchors = positives.any(1) | negatives.any(1)
    if not bool(anchors.any()):
        return sim.sum() * 0.0  # keeps the graph: a batch with nothing mined still backpropagates
    return (pos_term + neg_term)[anchors].mean()
