"""FSD50K adapter (``fsd50k``): 200 classes, multi-label, mAP, train / valid / test.

Expected layout under ``root`` (the Zenodo archives, extracted)::

    root/FSD50K.ground_truth/dev.csv         header: fname,labels,mids,split  (split: train | val)
    root/FSD50K.ground_truth/eval.csv        header: fname,labels,mids
    root/FSD50K.ground_truth/vocabulary.csv  no header: index,name,mid (200 rows)
    root/FSD50K.dev_audio/<fname>.wav
    root/FSD50K.eval_audio/<fname>.wav
"""

from __future__ import annotations

import csv
import os

import numpy as np

from matpac_jax.evaluate.datasets.common import AudioIndex, Task, expand, field, finish, multi_hot, need, read_csv

__all__ = ["fsd50k"]


_FSD50K_LAYOUT = (
    "the FSD50K Zenodo layout: FSD50K.ground_truth/{dev,eval,vocabulary}.csv, FSD50K.dev_audio/*.wav and "
    "FSD50K.eval_audio/*.wav"
)


def _fsd50k_vocabulary(path: str, dataset: str) -> list[str]:
    entries: list[tuple[int, str]] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not any(cell.strip() for cell in row):
                continue
            try:
                idx = int(row[0])
            except ValueError:
                if line_no == 1:  # tolerate a header line although the official file has none
                    continue
                raise ValueError(f"{dataset}: {path} line {line_no}: expected 'index,name,mid', got {row}") from None
            if len(row) < 2:
                raise ValueError(f"{dataset}: {path} line {line_no}: expected 'index,name,mid', got {row}")
            entries.append((idx, row[1].strip()))
    entries.sort()
    if [i for i, _ in entries] != list(range(len(entries))) or not entries:
        raise ValueError(f"{dataset}: {path}: indices must be 0..N-1, each once")
    names = [name for _, name in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"{dataset}: {path}: class names are not unique")
    return names


def fsd50k(root: str) -> Task:
    """FSD50K (Fonseca et al. 2022), 200-class multi-label, mAP.

    Layout (the Zenodo archives, extracted)::

        root/FSD50K.ground_truth/dev.csv         header: fname,labels,mids,split  (split: train | val)
        root/FSD50K.ground_truth/eval.csv        header: fname,labels,mids
        root/FSD50K.ground_truth/vocabulary.csv  no header: index,name,mid (200 rows)
        root/FSD50K.dev_audio/<fname>.wav
        root/FSD50K.eval_audio/<fname>.wav

    ``labels`` is a quoted, comma-separated list of vocabulary names. Clips: dev.csv order, then eval.csv order.
    Class index = vocabulary index. ``split``: dev ``train`` -> ``"train"``, dev ``val`` -> ``"valid"``,
    eval -> ``"test"``.
    """
    root, dataset = expand(root), "FSD50K"
    gt = os.path.join(root, "FSD50K.ground_truth")
    dev_csv = need(os.path.join(gt, "dev.csv"), dataset, _FSD50K_LAYOUT)
    eval_csv = need(os.path.join(gt, "eval.csv"), dataset, _FSD50K_LAYOUT)
    vocab_csv = need(os.path.join(gt, "vocabulary.csv"), dataset, _FSD50K_LAYOUT)
    class_names = _fsd50k_vocabulary(vocab_csv, dataset)
    class_index = {name: i for i, name in enumerate(class_names)}

    paths: list[str] = []
    label_ids: list[list[int]] = []
    splits: list[str] = []

    def add(row: dict, line_no: int, path: str, audio_dir: str, split: str) -> None:
        ids = []
        for name in field(row, "labels").split(","):
            name = name.strip()
            if not name:
                continue
            if name not in class_index:
                raise ValueError(f"{dataset}: {path} row {line_no}: label {name!r} is not in vocabulary.csv")
            ids.append(class_index[name])
        paths.append(os.path.join(audio_dir, f"{field(row, 'fname')}.wav"))
        label_ids.append(ids)
        splits.append(split)

    _, dev_rows = read_csv(dev_csv, dataset, ("fname", "labels", "split"))
    for line_no, row in enumerate(dev_rows, start=2):
        split = {"train": "train", "val": "valid"}.get(field(row, "split"))
        if split is None:
            raise ValueError(f"{dataset}: {dev_csv} row {line_no}: split must be 'train' or 'val'")
        add(row, line_no, dev_csv, os.path.join(root, "FSD50K.dev_audio"), split)
    _, eval_rows = read_csv(eval_csv, dataset, ("fname", "labels"))
    for line_no, row in enumerate(eval_rows, start=2):
        add(row, line_no, eval_csv, os.path.join(root, "FSD50K.eval_audio"), "test")

    return finish(
        "fsd50k",
        dataset,
        root,
        os.path.join(root, "FSD50K.{dev,eval}_audio"),
        paths,
        AudioIndex().present(paths),
        multi_hot(label_ids, len(class_names)),
        class_names,
        multilabel=True,
        split=np.asarray(splits, dtype=str),
    )
