"""Edited copies of images, found from their pixels: two files whose pixels match once one is aligned on the other
(resized, cropped or shifted by a few pixels, re-encoded). Why pixels and not the backbone's features, and how the
settings below were chosen: :mod:`.duplicates`.

Every image is read as a grayscale :data:`FRAME` × :data:`FRAME` frame (values in [0, 1], the aspect ratio not kept:
a copy and its original are squeezed alike), blurred by :data:`BLUR` px. The candidates of an image are its
:data:`CANDIDATES` nearest images by the cosine of their mean-centred :data:`THUMB` × :data:`THUMB` thumbnails. Each
candidate is compared with every warp of the image (its content scaled by each of :data:`ZOOMS` about the frame's
centre and shifted by :data:`SHIFTS` px in x and y, bilinear) over the pixels the warp covers; the pair's *pixel
similarity* is ``1 - the smallest root-mean-square difference`` (1: the same pixels; 0.956: a mean difference of
about 11 grey levels in 255).

Cost, on this 2-core machine: a frame is 4.6 KB (float16; 460 MB for 100,000 images); reading 3,000 28-px PNGs took
2.2 s, comparing 2,020 images with their 40 candidates among 1,000 (144 warps each) 3.5-5.5 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

FRAME = 48  # px: every image is compared as a FRAME × FRAME grayscale frame
THUMB = 16  # px: the thumbnails that choose the candidates (FRAME is a multiple of it)
BLUR = 1.0  # px of the frame: the Gaussian blur that evens out resampling and JPEG noise
CANDIDATES = 40  # images compared pixel by pixel with each image
ZOOMS = tuple(np.round(np.arange(0.86, 1.1601, 0.02), 2).tolist())  # the image's content scaled by each
SHIFTS = (-1.0, 0.0, 1.0)  # px of the frame, in x and in y
CHUNK = 32  # images warped at a time (CHUNK × warps × FRAME² float32: 42 MB)


def read_frames(files: Sequence[str | Path]) -> np.ndarray:
    """The images ``files`` as (N, FRAME, FRAME) float16 grayscale frames in [0, 1], blurred by :data:`BLUR` (any
    size and mode). Raises :class:`~featurestore.errors.ImageDecodeError` for a file that cannot be read."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    from ..encode.images import load_image

    frames = np.empty((len(files), FRAME, FRAME), np.float16)
    for i, file in enumerate(files):
        image = load_image(Path(file)).convert("L").resize((FRAME, FRAME), Image.BICUBIC)
        frames[i] = gaussian_filter(np.asarray(image, np.float32) / 255.0, BLUR)
    return frames


def thumbnails(frames: np.ndarray) -> np.ndarray:
    """frames (N, FRAME, FRAME) → (N, THUMB²) float32 mean-centred unit rows (block means of the frame)."""
    n, step = len(frames), FRAME // THUMB
    thumbs = frames.astype(np.float32).reshape(n, THUMB, step, THUMB, step).mean(axis=(2, 4)).reshape(n, -1)
    thumbs -= thumbs.mean(axis=1, keepdims=True)
    return thumbs / np.maximum(np.linalg.norm(thumbs, axis=1, keepdims=True), 1e-6)


def candidates(queries: np.ndarray, references: np.ndarray | None = None, k: int = CANDIDATES) -> np.ndarray:
    """(Q, k') int64 indices into ``references`` (R, FRAME, FRAME) of each query frame's k' = min(k, R) nearest
    thumbnails (cosine), most similar first. Without ``references``, the queries' own neighbours among themselves
    (each row's own index left out; k' = min(k, Q - 1); -1 pads a row the approximate search left short)."""
    from .graph import neighbour_graph

    if references is None:
        return neighbour_graph(thumbnails(queries), k).indices
    import faiss

    index = faiss.IndexFlatIP(THUMB * THUMB)
    index.add(thumbnails(references))
    _, found = index.search(thumbnails(queries), max(0, min(k, len(references))))
    return found.astype(np.int64)


@lru_cache(maxsize=1)
def warp_operator() -> tuple:
    """The sparse (W·FRAME², FRAME²) float32 bilinear operator of every warp, and the (W, FRAME²) float32 mask of the
    output pixels each covers (0 where it would sample outside the frame); W = len(ZOOMS) · len(SHIFTS)²."""
    from scipy import sparse

    centre, size = FRAME / 2, FRAME * FRAME
    grid = np.arange(FRAME, dtype=np.float64) + 0.5  # output pixel centres
    rows, cols, weights, masks = [], [], [], []
    for warp, (zoom, dx, dy) in enumerate((z, x, y) for z in ZOOMS for x in SHIFTS for y in SHIFTS):
        u, v = np.meshgrid((grid - centre - dx) / zoom + centre - 0.5, (grid - centre - dy) / zoom + centre - 0.5)
        inside = ((u >= -0.5) & (u <= FRAME - 0.5) & (v >= -0.5) & (v <= FRAME - 0.5)).ravel()
        u, v = np.clip(u, 0, FRAME - 1), np.clip(v, 0, FRAME - 1)
        x0, y0 = np.minimum(u.astype(int), FRAME - 2), np.minimum(v.astype(int), FRAME - 2)
        fx, fy = (u - x0).ravel(), (v - y0).ravel()
        out = warp * size + np.arange(size)
        for ox, oy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy),
                               (1, 1, fx * fy)):
            rows.append(out[inside])
            cols.append(((y0 + oy) * FRAME + x0 + ox).ravel()[inside])
            weights.append(weight[inside])
        masks.append(inside.astype(np.float32))
    operator = sparse.csr_matrix((np.concatenate(weights).astype(np.float32),
                                  (np.concatenate(rows), np.concatenate(cols))), shape=(len(masks) * size, size))
    return operator, np.stack(masks)


def pixel_similarity(queries: np.ndarray, references: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """The pixel similarity (module docstring) of each query frame (Q, FRAME, FRAME) with each of its candidates
    ``pairs`` (Q, C) int64, indices into ``references`` (R, FRAME, FRAME): (Q, C) float32, -1 where the index is
    -1. The query is the image warped."""
    operator, masks = warp_operator()
    covered = masks.sum(axis=1, keepdims=True)  # (W, 1): pixels each warp compares
    found = np.full(pairs.shape, -1.0, np.float32)
    for start in range(0, len(queries), CHUNK):
        rows = pairs[start:start + CHUNK]
        if not (rows >= 0).any():
            continue
        used, local = np.unique(np.maximum(rows, 0), return_inverse=True)  # the chunk's candidates, each once
        local = local.reshape(rows.shape)
        refs = references[used].reshape(len(used), -1).astype(np.float32)
        ref_energy = masks @ (refs * refs).T  # (W, U): each candidate's squared pixels under each warp
        chunk = queries[start:start + CHUNK].reshape(len(rows), -1).astype(np.float32)
        warped = np.ascontiguousarray((operator @ chunk.T).T).reshape(len(rows), len(masks), -1)
        for offset, warps in enumerate(warped):  # warps (W, FRAME²): one query, zero outside each warp's mask
            cols = local[offset]
            squared = (warps * warps).sum(axis=1, keepdims=True) - 2 * warps @ refs[cols].T + ref_energy[:, cols]
            found[start + offset] = 1.0 - np.sqrt(np.maximum((squared / covered).min(axis=0), 0.0))
    found[pairs < 0] = -1.0
    return found
