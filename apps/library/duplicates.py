"""Groups of near-identical photos: the same bytes (one content hash), or embeddings within a cosine
threshold of each other (a resized, re-encoded or lightly edited copy), largest groups first. A video is one
file: its frames are joined from the start, and it is in a group when one of its frames is linked to another
file's (a copy of the video, or a photo of one of its scenes)."""

import numpy as np

from .db import Library
from .search import Vectors

DEFAULT_THRESHOLD = 0.95


def groups(library: Library, model_id: int, threshold: float = DEFAULT_THRESHOLD, block: int = 2048):
    """[{"paths": [...], "ids": [...], "exact": bool, "score": lowest linking cosine}] with two or more
    files each, largest first. Files are linked when their cosine is >= `threshold`, and a group is every
    file reachable through links (single linkage), so a chain of near copies stays together."""
    vectors = Vectors.load(library, model_id)
    n = len(vectors)
    parent = list(range(n))
    weakest = {}  # root -> lowest cosine that joined its group
    video = vectors.video
    first: dict[int, int] = {}  # a video's id -> its first frame's row
    for r in np.flatnonzero(video >= 0):
        parent[r] = first.setdefault(int(video[r]), int(r))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, n, block):  # (block, n) similarities at a time: memory stays bounded
        scores = vectors.matrix[start : start + block] @ vectors.matrix.T
        rows, cols = np.nonzero(scores >= threshold)
        for r, c in zip(rows + start, cols, strict=True):
            if r < c and not (video[r] >= 0 and video[r] == video[c]):  # not two frames of one video
                a, b = find(r), find(c)
                low = min(float(scores[r - start, c]), weakest.get(a, 1.0), weakest.get(b, 1.0))
                if a != b:
                    parent[b] = a
                    weakest.pop(b, None)
                weakest[a] = low
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    hashes = library.hashes(model_id)
    found = []
    for root, rows in members.items():
        files = {int(video[r]) if video[r] >= 0 else -1 - r: r for r in reversed(rows)}  # a video's 1st frame
        if len(files) > 1:
            rows = sorted(files.values())
            ids = [int(vectors.ids[r]) for r in rows]
            found.append(
                {
                    "paths": [
                        vectors.paths[r].rsplit("#t=", 1)[0] if video[r] >= 0 else vectors.paths[r]
                        for r in rows
                    ],
                    "ids": ids,
                    "exact": len({hashes[i].split("#t=")[0] for i in ids}) == 1,  # a frame's: its video's
                    "score": round(weakest.get(root, 1.0), 6),
                }
            )
    return sorted(found, key=lambda g: (-len(g["paths"]), g["paths"][0]))
