"""OpenMIC-2018 adapter (``openmic``): 20 instruments, mAP with a known-label mask, train / test.

Expected layout under ``root`` (the official ``openmic-2018-v1.0.0`` archive, extracted)::

    root/openmic-2018-aggregated-labels.csv  header: sample_key,instrument,relevance,num_responses
    root/class-map.json                      {instrument: index}, 20 instruments
    root/partitions/split01_train.csv        one sample_key per line, no header
    root/partitions/split01_test.csv
    root/audio/<sample_key[:3]>/<sample_key>.ogg
"""

from __future__ import annotations

import json
import os

import numpy as np

from matpac_jax.evaluate.datasets.common import AudioIndex, Task, expand, field, finish, need, read_csv

__all__ = ["openmic"]


_OPENMIC_LAYOUT = (
    "the OpenMIC-2018 archive layout: openmic-2018-aggregated-labels.csv, class-map.json, "
    "partitions/split01_train.csv, partitions/split01_test.csv and audio/<key[:3]>/<key>.ogg"
)


def _read_keys(path: str) -> list[str]:
    keys: list[str] = []
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            key = line.strip().split(",")[0].strip()
            if key and key != "sample_key":
                keys.append(key)
    return list(dict.fromkeys(keys))


def openmic(root: str) -> Task:
    """OpenMIC-2018 instrument recognition (Humphrey et al. 2018), multi-label with partial labels, mAP.

    Layout (the official ``openmic-2018-v1.0.0`` archive, extracted)::

        root/openmic-2018-aggregated-labels.csv  header: sample_key,instrument,relevance,num_responses
        root/class-map.json                      {instrument: index}, 20 instruments
        root/partitions/split01_train.csv        one sample_key per line, no header
        root/partitions/split01_test.csv
        root/audio/<sample_key[:3]>/<sample_key>.ogg

    Clips: the train partition in file order, then the test partition (clips listed in neither are ignored).
    Class index = ``class-map.json`` value. ``labels[i, c]`` = 1 if ``relevance >= 0.5`` else 0, and
    ``mask[i, c]`` = 1 only for (clip, instrument) pairs present in the labels CSV; all other pairs are unknown
    (mask 0, label 0) and must be excluded from the loss and the metric. The dataset defines no validation split:
    ``split`` holds only ``"train"`` / ``"test"`` and the harness draws validation clips from train.
    """
    root, dataset = expand(root), "OpenMIC-2018"
    labels_csv = need(os.path.join(root, "openmic-2018-aggregated-labels.csv"), dataset, _OPENMIC_LAYOUT)
    class_map_path = need(os.path.join(root, "class-map.json"), dataset, _OPENMIC_LAYOUT)
    partitions = [
        (split, need(os.path.join(root, "partitions", f"split01_{split}.csv"), dataset, _OPENMIC_LAYOUT))
        for split in ("train", "test")
    ]
    with open(class_map_path, encoding="utf-8") as f:
        class_map = json.load(f)
    if not isinstance(class_map, dict) or not class_map:
        raise ValueError(f"{dataset}: {class_map_path} must hold a JSON object instrument -> index")
    class_names = [name for name, _ in sorted(class_map.items(), key=lambda item: int(item[1]))]
    if sorted(int(v) for v in class_map.values()) != list(range(len(class_map))):
        raise ValueError(f"{dataset}: {class_map_path}: indices must be 0..{len(class_map) - 1}, each once")
    class_index = {name: int(i) for name, i in class_map.items()}

    _, rows = read_csv(labels_csv, dataset, ("sample_key", "instrument", "relevance"))
    known: dict[str, list[tuple[int, float]]] = {}
    for line_no, row in enumerate(rows, start=2):
        instrument = field(row, "instrument")
        if instrument not in class_index:
            raise ValueError(f"{dataset}: {labels_csv} row {line_no}: instrument {instrument!r} not in class-map.json")
        try:
            relevance = float(field(row, "relevance"))
        except ValueError:
            raise ValueError(f"{dataset}: {labels_csv} row {line_no}: relevance must be a number") from None
        known.setdefault(field(row, "sample_key"), []).append((class_index[instrument], relevance))

    keys: list[str] = []
    splits: list[str] = []
    seen: dict[str, str] = {}
    for split, path in partitions:
        for key in _read_keys(path):
            if key in seen:
                raise ValueError(f"{dataset}: sample_key {key!r} is in both the {seen[key]} and {split} partitions")
            seen[key] = split
            keys.append(key)
            splits.append(split)
    if not keys:
        raise ValueError(f"{dataset}: the partition files under {os.path.join(root, 'partitions')} list no clips")

    num_classes = len(class_names)
    labels = np.zeros((len(keys), num_classes), dtype=np.float32)
    mask = np.zeros((len(keys), num_classes), dtype=np.float32)
    for i, key in enumerate(keys):
        for cls, relevance in known.get(key, ()):
            labels[i, cls] = 1.0 if relevance >= 0.5 else 0.0
            mask[i, cls] = 1.0
    paths = [os.path.join(root, "audio", key[:3], f"{key}.ogg") for key in keys]
    return finish(
        "openmic",
        dataset,
        root,
        os.path.join(root, "audio", "<key[:3]>"),
        paths,
        AudioIndex().present(paths),
        labels,
        class_names,
        multilabel=True,
        split=np.asarray(splits, dtype=str),
        mask=mask,
    )
