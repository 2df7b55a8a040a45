"""GTZAN adapter (``gtzan``), fault-filtered split: 10 genres, accuracy, train / valid / test.

Expected layout under ``root`` (split lists as distributed with ``jordipons/sklearn-audio-transfer-learning``,
next to the extracted ``genres`` folder of the original archive)::

    root/train_filtered.txt    one clip per line, e.g. blues/blues.00029.wav
    root/valid_filtered.txt
    root/test_filtered.txt
    root/genres/<genre>/<file> the listed name, or the same stem with .au (original archive) or .wav
"""

from __future__ import annotations

import os

import numpy as np

from matpac_jax.evaluate.datasets.common import AudioIndex, Task, expand, finish, need

__all__ = ["gtzan"]


_GTZAN_LAYOUT = (
    "the fault-filtered GTZAN split layout: train_filtered.txt, valid_filtered.txt, test_filtered.txt with lines "
    "like blues/blues.00029.wav, and the audio under genres/<genre>/ as .wav or the original .au"
)
_GTZAN_LISTS = (("train", "train_filtered.txt"), ("valid", "valid_filtered.txt"), ("test", "test_filtered.txt"))


def gtzan(root: str) -> Task:
    """GTZAN genre classification with the fault-filtered split (Kereliuk, Sturm & Larsen 2015), accuracy.

    Layout (split lists as distributed with ``jordipons/sklearn-audio-transfer-learning``, next to the
    extracted ``genres`` folder of the original archive)::

        root/train_filtered.txt    one clip per line, e.g. blues/blues.00029.wav
        root/valid_filtered.txt
        root/test_filtered.txt
        root/genres/<genre>/<file> the listed name, or the same stem with .au (original archive) or .wav

    Only the first whitespace-separated token of a line is used; the genre is the token's parent directory (or, for
    a bare file name, the part before the first dot). Clips are in list order: train, then valid, then test.
    Classes = the genres found in the lists, sorted alphabetically (blues, classical, country, disco, hiphop, jazz,
    metal, pop, reggae, rock). ``split`` = the list a clip comes from.
    """
    root, dataset = expand(root), "GTZAN"
    lists = [(split, need(os.path.join(root, fname), dataset, _GTZAN_LAYOUT)) for split, fname in _GTZAN_LISTS]
    entries: list[tuple[str, str, str]] = []  # (split, genre, file name)
    for split, path in lists:
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                tokens = line.split()
                if not tokens:
                    continue
                parts = [p for p in tokens[0].replace("\\", "/").split("/") if p]
                fname = parts[-1]
                genre = parts[-2] if len(parts) > 1 else fname.split(".")[0]
                entries.append((split, genre, fname))
    if not entries:
        raise ValueError(f"{dataset}: the split lists in {root} list no clips")
    class_names = sorted({genre for _, genre, _ in entries})
    class_index = {g: i for i, g in enumerate(class_names)}
    index = AudioIndex()
    paths, present = [], []
    for _, genre, fname in entries:
        directory = os.path.join(root, "genres", genre)
        stem = os.path.splitext(fname)[0]
        candidates = [os.path.join(directory, c) for c in dict.fromkeys((fname, stem + ".au", stem + ".wav"))]
        found = next((c for c in candidates if index.exists(c)), None)
        paths.append(found or candidates[0])
        present.append(found is not None)
    return finish(
        "gtzan",
        dataset,
        root,
        os.path.join(root, "genres", "<genre>"),
        paths,
        np.asarray(present, dtype=bool),
        np.asarray([class_index[g] for _, g, _ in entries], dtype=np.int64),
        class_names,
        multilabel=False,
        split=np.asarray([s for s, _, _ in entries], dtype=str),
    )
