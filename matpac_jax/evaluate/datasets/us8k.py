"""UrbanSound8K adapter (``us8k``): 10 classes, accuracy, folds 1..10.

Expected layout under ``root`` (the official ``UrbanSound8K`` archive, extracted)::

    root/metadata/UrbanSound8K.csv   header: slice_file_name,fsID,start,end,salience,fold,classID,class
    root/audio/fold<fold>/<slice_file_name>
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

__all__ = ["us8k"]


_US8K_LAYOUT = "the UrbanSound8K archive layout: metadata/UrbanSound8K.csv and audio/fold1..fold10/*.wav"


def us8k(root: str) -> Task:
    """UrbanSound8K (Salamon et al. 2014), 10-fold cross-validation, accuracy.

    Layout (the official ``UrbanSound8K`` archive, extracted)::

        root/metadata/UrbanSound8K.csv   header: slice_file_name,fsID,start,end,salience,fold,classID,class
        root/audio/fold<fold>/<slice_file_name>

    Clips are in metadata order. Class index = ``classID`` (0..9); ``class_names[classID]`` = ``class``.
    ``folds`` = ``fold`` (1..10).
    """
    root, dataset = expand(root), "UrbanSound8K"
    meta = need(os.path.join(root, "metadata", "UrbanSound8K.csv"), dataset, _US8K_LAYOUT)
    _, rows = read_csv(meta, dataset, ("slice_file_name", "fold", "classID", "class"))
    class_ids = int_column(rows, "classID", meta, dataset)
    folds = int_column(rows, "fold", meta, dataset)
    class_names = names_by_index(class_ids, [field(r, "class") for r in rows], meta, dataset)
    paths = [
        os.path.join(root, "audio", f"fold{fold}", field(r, "slice_file_name"))
        for r, fold in zip(rows, folds.tolist(), strict=True)
    ]
    return finish(
        "us8k",
        dataset,
        root,
        os.path.join(root, "audio", "fold<k>"),
        paths,
        AudioIndex().present(paths),
        class_ids,
        class_names,
        multilabel=False,
        folds=folds,
    )
