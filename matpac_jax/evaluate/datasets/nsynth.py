"""NSynth adapter (``nsynth``): 11 instrument families, accuracy, train / valid / test.

Expected layout under ``root`` (the three official ``nsynth-*.jsonwav.tar.gz`` archives extracted side by side)::

    root/nsynth-{train,valid,test}/examples.json        {note_str: {"instrument_family": int,
                                                                    "instrument_family_str": str, ...}}
    root/nsynth-{train,valid,test}/audio/<note_str>.wav
"""

from __future__ import annotations

import json
import os

import numpy as np

from matpac_jax.evaluate.datasets.common import SPLITS, AudioIndex, Task, expand, finish, need

__all__ = ["NSYNTH_FAMILIES", "nsynth"]

#: NSynth instrument families, index = ``instrument_family``.
NSYNTH_FAMILIES = (
    "bass",
    "brass",
    "flute",
    "guitar",
    "keyboard",
    "mallet",
    "organ",
    "reed",
    "string",
    "synth_lead",
    "vocal",
)


_NSYNTH_LAYOUT = (
    "the NSynth json/wav layout: nsynth-train/, nsynth-valid/ and nsynth-test/, each with examples.json and audio/*.wav"
)


def nsynth(root: str) -> Task:
    """NSynth instrument-family classification (Engel et al. 2017), accuracy.

    Layout (the three official ``nsynth-*.jsonwav.tar.gz`` archives extracted side by side)::

        root/nsynth-{train,valid,test}/examples.json        {note_str: {"instrument_family": int,
                                                                        "instrument_family_str": str, ...}}
        root/nsynth-{train,valid,test}/audio/<note_str>.wav

    Clips: train, then valid, then test; within a part sorted by ``note_str``. Class index = ``instrument_family``
    with the fixed 11 names of :data:`NSYNTH_FAMILIES` (a conflicting ``instrument_family_str`` is an error).
    ``split`` = the part. Each JSON is read once and each audio folder listed once (no per-file ``stat``).
    """
    root, dataset = expand(root), "NSynth"
    metas = [
        (split, need(os.path.join(root, f"nsynth-{split}", "examples.json"), dataset, _NSYNTH_LAYOUT))
        for split in SPLITS
    ]
    index = AudioIndex()
    paths: list[str] = []
    families: list[int] = []
    splits: list[str] = []
    for split, meta in metas:
        with open(meta, encoding="utf-8") as f:
            examples = json.load(f)
        if not isinstance(examples, dict):
            raise ValueError(f"{dataset}: {meta} must hold a JSON object note_str -> example")
        audio_dir = os.path.join(root, f"nsynth-{split}", "audio")
        for note in sorted(examples):
            example = examples[note]
            try:
                family = int(example["instrument_family"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{dataset}: {meta}: example {note!r} has no integer 'instrument_family'") from None
            if not 0 <= family < len(NSYNTH_FAMILIES):
                raise ValueError(f"{dataset}: {meta}: example {note!r} has instrument_family {family} out of 0..10")
            family_str = example.get("instrument_family_str")
            if family_str is not None and family_str != NSYNTH_FAMILIES[family]:
                raise ValueError(
                    f"{dataset}: {meta}: example {note!r} has instrument_family {family} "
                    f"({NSYNTH_FAMILIES[family]!r}) but instrument_family_str {family_str!r}"
                )
            paths.append(os.path.join(audio_dir, f"{note}.wav"))
            families.append(family)
            splits.append(split)
    if not paths:
        raise ValueError(f"{dataset}: the examples.json files under {root} list no clips")
    return finish(
        "nsynth",
        dataset,
        root,
        os.path.join(root, "nsynth-<part>", "audio"),
        paths,
        index.present(paths),
        np.asarray(families, dtype=np.int64),
        NSYNTH_FAMILIES,
        multilabel=False,
        split=np.asarray(splits, dtype=str),
    )
