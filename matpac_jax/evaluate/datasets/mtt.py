"""MagnaTagATune adapter (``mtt``): top-50 tags, multi-label, mAP, train / valid / test.

Expected layout under ``root`` (``annotations_final.csv`` next to the extracted ``mp3.zip.00[1-3]`` parts)::

    root/annotations_final.csv   TAB-separated, fields may be double-quoted;
                                 header: clip_id, 188 tag columns (0/1), mp3_path
    root/mp3/<mp3_path>          e.g. mp3/f/american_bach_soloists-...-01-bwv54__i_aria-30-59.mp3
"""

from __future__ import annotations

import os

import numpy as np

from matpac_jax.evaluate.datasets.common import AudioIndex, Task, expand, field, finish, need, read_csv

__all__ = ["mtt"]


_MTT_LAYOUT = (
    "the MagnaTagATune layout: annotations_final.csv (tab-separated: clip_id, 188 tag columns, mp3_path) and "
    "mp3/<0-f>/*.mp3"
)
_MTT_SPLIT = {**{c: "train" for c in "0123456789ab"}, "c": "valid", **{c: "test" for c in "def"}}


def mtt(root: str, top_k: int = 50) -> Task:
    """MagnaTagATune top-50 tagging (Law et al. 2009), multi-label, mAP.

    Layout (``annotations_final.csv`` next to the extracted ``mp3.zip.00[1-3]`` parts)::

        root/annotations_final.csv   TAB-separated, fields may be double-quoted;
                                     header: clip_id, 188 tag columns (0/1), mp3_path
        root/mp3/<mp3_path>          e.g. mp3/f/american_bach_soloists-...-01-bwv54__i_aria-30-59.mp3

    Tags = every column except ``clip_id`` and ``mp3_path``. The ``top_k`` (50) tags with the most positive clips
    over the whole file are kept; class order = descending count, ties broken by column order. All clips are kept,
    including those with no positive top-50 tag. Clips are in file order. ``split`` by the first character of the
    ``mp3_path`` directory: ``0``-``b`` train, ``c`` valid, ``d``-``f`` test (the common 12:1:3 split).
    """
    root, dataset = expand(root), "MagnaTagATune"
    meta = need(os.path.join(root, "annotations_final.csv"), dataset, _MTT_LAYOUT)
    fields, rows = read_csv(meta, dataset, ("clip_id", "mp3_path"), delimiter="\t")
    tags = [f for f in fields if f and f not in ("clip_id", "mp3_path")]
    if not tags:
        raise ValueError(f"{dataset}: {meta} has no tag columns")
    matrix = np.zeros((len(rows), len(tags)), dtype=np.float32)
    paths: list[str] = []
    splits: list[str] = []
    for i, row in enumerate(rows):
        line_no = i + 2
        for j, tag in enumerate(tags):
            value = field(row, tag)
            try:
                matrix[i, j] = 1.0 if int(value) else 0.0
            except ValueError:
                raise ValueError(
                    f"{dataset}: {meta} row {line_no}: tag {tag!r} must be 0 or 1, got {value!r}"
                ) from None
        mp3_path = field(row, "mp3_path").replace("\\", "/")
        split = _MTT_SPLIT.get(mp3_path.split("/")[0][:1].lower())
        if split is None:
            raise ValueError(f"{dataset}: {meta} row {line_no}: mp3_path {mp3_path!r} must start with a directory 0..f")
        paths.append(os.path.join(root, "mp3", *mp3_path.split("/")))
        splits.append(split)
    counts = matrix.sum(axis=0)
    order = sorted(range(len(tags)), key=lambda j: (-counts[j], j))[:top_k]
    return finish(
        "mtt",
        dataset,
        root,
        os.path.join(root, "mp3", "<0-f>"),
        paths,
        AudioIndex().present(paths),
        matrix[:, order],
        [tags[j] for j in order],
        multilabel=True,
        split=np.asarray(splits, dtype=str),
    )
