"""ESC-50 adapter (``esc50``): 50 classes, accuracy, folds 1..5.

Expected layout under ``root`` (the GitHub repository ``karolpiczak/ESC-50`` as downloaded)::

    root/meta/esc50.csv    header: filename,fold,target,category,esc10,src_file,take
    root/audio/<filename>  e.g. audio/1-100032-A-0.wav
"""

from __future__ import annotations

import os

from matpac_jax.evaluate.datasets.common import (
    AudioIndex,
    Task,
    expand,
    field,
    finish,
    int_column,
    names_by_index,
    need,
    read_csv,
)

__all__ = ["esc50"]


_ESC50_LAYOUT = "the ESC-50 repository layout: meta/esc50.csv and audio/*.wav"


def esc50(root: str) -> Task:
    """ESC-50 (Piczak 2015), 5-fold cross-validation, accuracy.

    Layout (the GitHub repository ``karolpiczak/ESC-50`` as downloaded)::

        root/meta/esc50.csv    header: filename,fold,target,category,esc10,src_file,take
        root/audio/<filename>  e.g. audio/1-100032-A-0.wav

    Clips are in metadata order. Class index = ``target`` (0..49); ``class_names[target]`` = ``category``.
    ``folds`` = ``fold`` (1..5).
    """
    root, dataset = expand(root), "ESC-50"
    meta = need(os.path.join(root, "meta", "esc50.csv"), dataset, _ESC50_LAYOUT)
    _, rows = read_csv(meta, dataset, ("filename", "fold", "target", "category"))
    targets = int_column(rows, "target", meta, dataset)
    class_names = names_by_index(targets, [field(r, "category") for r in rows], meta, dataset)
    paths = [os.path.join(root, "audio", field(r, "filename")) for r in rows]
    return finish(
        "esc50",
        dataset,
        root,
        os.path.join(root, "audio"),
        paths,
        AudioIndex().present(paths),
        targets,
        class_names,
        multilabel=False,
        folds=int_column(rows, "fold", meta, dataset),
    )
