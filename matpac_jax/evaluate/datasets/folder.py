"""Generic adapter (``folder``): any dataset described by one CSV, single- or multi-label, split or folds.

Expected layout under ``root``::

    root/labels.csv  header with: path, labels, and split (train | valid | test) or fold (integer)
    root/<path>      audio paths relative to ``root``, or absolute
"""

from __future__ import annotations

import os

import numpy as np

from matpac_jax.evaluate.datasets.common import (
    SPLITS,
    AudioIndex,
    Task,
    expand,
    field,
    finish,
    int_column,
    multi_hot,
    need,
    read_csv,
)

__all__ = ["folder"]


_FOLDER_LAYOUT = (
    "a folder with labels.csv whose header has path, labels and either split (train/valid/test) or fold (integer); "
    "labels are class names separated by ';' and paths are relative to the folder or absolute"
)


def folder(root: str) -> Task:
    """Any dataset described by one CSV.

    Layout::

        root/labels.csv  header with: path, labels, and split (train | valid | test) or fold (integer)
        root/<path>      or an absolute path

    ``labels`` holds one class name or several separated by ``;`` (surrounding spaces ignored, duplicates merged).
    The task is multi-label (mAP) if any row has a number of labels other than one, else single-label (accuracy).
    Classes = the sorted unique names over all rows. Clips are in CSV order. A missing ``path`` / ``labels``
    column, neither or both of ``split`` / ``fold``, or an unknown split value raises ValueError.
    """
    root, dataset = expand(root), "folder"
    meta = need(os.path.join(root, "labels.csv"), dataset, _FOLDER_LAYOUT)
    fields, rows = read_csv(meta, dataset, ("path", "labels"))
    has_split, has_fold = "split" in fields, "fold" in fields
    if has_split == has_fold:
        which = "both" if has_split else "neither"
        raise ValueError(f"{dataset}: {meta} must have exactly one of the columns 'split' or 'fold', it has {which}")
    row_labels = [list(dict.fromkeys(n.strip() for n in field(r, "labels").split(";") if n.strip())) for r in rows]
    multilabel = any(len(names) != 1 for names in row_labels)
    class_names = sorted({n for names in row_labels for n in names})
    if not class_names:
        raise ValueError(f"{dataset}: {meta}: no row has a label")
    class_index = {n: i for i, n in enumerate(class_names)}
    if multilabel:
        labels = multi_hot([[class_index[n] for n in names] for names in row_labels], len(class_names))
    else:
        labels = np.asarray([class_index[names[0]] for names in row_labels], dtype=np.int64)
    folds = split = None
    if has_fold:
        folds = int_column(rows, "fold", meta, dataset)
    else:
        split = np.asarray([field(r, "split") for r in rows], dtype=str)
        bad = sorted(set(split.tolist()) - set(SPLITS))
        if bad:
            raise ValueError(f"{dataset}: {meta}: split values must be one of {list(SPLITS)}, got {bad}")
    paths = [os.path.normpath(os.path.join(root, field(r, "path"))) for r in rows]
    return finish(
        "folder",
        dataset,
        root,
        root,
        paths,
        AudioIndex().present(paths),
        labels,
        class_names,
        multilabel=multilabel,
        folds=folds,
        split=split,
    )
