"""What ``prepare`` reads: the clips of a folder of audio files, a generic CSV (``path[,labels]``) or an AudioSet
segment CSV with its labels index, each clip {"key", "path", "labels"}; unreadable CSVs and bad rows are named.
AudioSet labels are head units: the mid's position in ``class_labels_indices.csv`` sorted by mid (``audioset_classes``),
not the file's ``index`` column."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable

from matpac_jax.data.audioset_classes import read_audioset_classes
from matpac_jax.data.records import audioset_key

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64", ".caf")

Clip = dict  # {"key": str, "path": str, "labels": list[int]}; "path" may hold surrogate escapes (undecodable bytes)


class PrepareError(ValueError):
    """An unusable input or setting, or shards that could not be built; the CLI prints it and exits 2."""


def _shown(text: str) -> str:
    """``text`` as valid UTF-8: the undecodable bytes of a file name (surrogate escapes) become ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _audio_files(root: str) -> list[str]:
    """Every audio file under ``root`` (recursive), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found += [os.path.join(dirpath, n) for n in filenames if n.lower().endswith(AUDIO_EXTENSIONS)]
    return sorted(found)


def _folder_clips(root: str) -> list[Clip]:
    return [
        {"key": _shown(os.path.splitext(os.path.relpath(p, root))[0].replace(os.sep, "/")), "path": p, "labels": []}
        for p in _audio_files(root)
    ]


def _parse_labels(text: str) -> list[int]:
    """Class indices, space or comma separated; ValueError for anything but non-negative integers."""
    labels = [int(t) for t in text.replace(",", " ").split()]
    if any(label < 0 for label in labels):
        raise ValueError(f"negative label in {text!r}")
    return labels


def _read_rows(csv_path: str, what: str = "--input") -> list[tuple[int, list[str]]]:
    """(line number, fields) of the CSV rows, without '#' comment lines and blank rows, fields stripped.

    PrepareError naming the file (and line) for a file that is not UTF-8 text or not parseable as CSV.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            numbered = [(n, line) for n, line in enumerate(f, 1) if not line.lstrip().startswith("#")]
    except UnicodeDecodeError as e:
        raise PrepareError(
            f"{what}={_shown(csv_path)} is not UTF-8 text ({e.reason} at byte {e.start}): give a folder of audio "
            "files, an AudioSet segment CSV or a CSV with a 'path' column, saved as UTF-8"
        ) from None
    except OSError as e:
        raise PrepareError(f"{what}={_shown(csv_path)}: cannot read it ({e.strerror})") from None
    line = 0

    def lines() -> Iterable[str]:
        nonlocal line
        for line, text in numbered:  # noqa: B007 (``line``: the last line the reader consumed)
            yield text

    rows = []
    try:
        for row in csv.reader(lines(), skipinitialspace=True):
            if any(row):
                rows.append((line, [c.strip() for c in row]))
    except csv.Error as e:
        raise PrepareError(f"{what}={_shown(csv_path)}, line {line}: not a readable CSV row ({e})") from None
    return rows


def _label_units(labels_csv: str) -> dict[str, int]:
    """mid -> head unit of AudioSet's ``class_labels_indices.csv`` (mid-sorted, ``audioset_classes``); PrepareError
    naming the line of a bad row."""
    try:
        return read_audioset_classes(labels_csv).unit
    except OSError as e:
        raise PrepareError(f"--labels={_shown(labels_csv)}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise PrepareError(_shown(str(e))) from None


def _audioset_clips(
    rows: list[tuple[int, list[str]]], csv_path: str, labels_csv: str | None, audio_root: str
) -> tuple[list[Clip], list[dict]]:
    if not labels_csv or not os.path.isfile(labels_csv):
        raise PrepareError(f"AudioSet CSV needs --labels=class_labels_indices.csv (got {labels_csv!r})")
    mid_unit = _label_units(labels_csv)
    by_stem: dict[str, list[str]] = {}
    for p in _audio_files(audio_root):
        by_stem.setdefault(os.path.splitext(os.path.basename(p))[0], []).append(p)
    name = _shown(os.path.basename(csv_path))
    clips, skipped = [], []
    for line, row in rows:
        if row[0] == "YTID":
            continue
        if len(row) < 4:
            reason = f"{name} line {line}: expected YTID, start_seconds, end_seconds, positive_labels; got {row}"
            skipped.append({"key": row[0], "path": "", "reason": reason})
            continue
        ytid, start, mids = row[0], row[1], row[3]
        try:
            key = audioset_key(ytid, start)
        except ValueError as e:
            skipped.append({"key": ytid, "path": "", "reason": f"{name} line {line}: {e}"})
            continue
        paths = by_stem.get(key) or by_stem.get(ytid) or []
        if not paths:
            paths = [by_stem[s][0] for s in sorted(by_stem) if s.startswith(ytid + "_")][:1]
        unknown = [m for m in mids.split(",") if m.strip() and m.strip() not in mid_unit]
        if not paths:
            skipped.append({"key": key, "path": "", "reason": "file not found"})
        elif unknown:
            skipped.append({"key": key, "path": paths[0], "reason": f"unknown label mid {unknown[0]}"})
        else:
            labels = [mid_unit[m.strip()] for m in mids.split(",") if m.strip()]
            clips.append({"key": key, "path": paths[0], "labels": labels})
    return clips, skipped


def _collect(input_path: str, labels_csv: str | None, audio_root: str | None) -> tuple[list[Clip], list[dict], str]:
    """(clips in input order, pre-decode skips, input format) of a folder or CSV."""
    if not os.path.exists(input_path):
        raise PrepareError(f"input does not exist: {_shown(input_path)}")
    if os.path.isdir(input_path):
        return _folder_clips(input_path), [], "folder"
    if input_path.lower().endswith(AUDIO_EXTENSIONS):
        raise PrepareError(
            f"--input={_shown(input_path)} is an audio file: give the folder holding the audio files, or a CSV "
            "with a 'path' column listing them"
        )
    rows = _read_rows(input_path)
    root = audio_root or os.path.dirname(os.path.abspath(input_path))
    header = [c.lower() for c in rows[0][1]] if rows else []
    if "path" not in header:
        return (*_audioset_clips(rows, input_path, labels_csv, root), "audioset_csv")
    clips, skipped = [], []
    for line, row in rows[1:]:
        fields = dict(zip(header, row, strict=False))
        path = os.path.join(root, fields.get("path", ""))
        key = fields.get("key") or os.path.splitext(fields.get("path", ""))[0]
        try:
            labels = _parse_labels(fields.get("labels", ""))
        except ValueError:
            skipped.append({"key": key, "path": path, "reason": f"line {line}: bad labels {fields.get('labels')!r}"})
            continue
        if not key:
            skipped.append({"key": "", "path": path, "reason": f"line {line}: no path and no key"})
        elif not os.path.isfile(path):
            skipped.append({"key": key, "path": path, "reason": "file not found"})
        else:
            clips.append({"key": key, "path": path, "labels": labels})
    return clips, skipped, "csv"
