"""Prepare a corpus of audio files as ArrayRecord shards of clip records (``records.py``) plus a manifest.

    python -m matpac_jax.data.prepare --input=<folder | csv> --output=<dir> --num-shards=N --workers=M \\
        [--codec=pcm16|flac] [--compression=none|zstd] [--labels=class_labels_indices.csv] [--audio-root=DIR] \\
        [--min-seconds=0] [--sample-rate=16000]

Inputs: a folder (walked recursively for audio files; key = path relative to the folder without extension, '/'
separated, no labels); an AudioSet segment CSV (``#`` comments, rows ``YTID, start, end, "mid,mid"``; ``--labels``
maps mids to indices; the file of a YTID is found under ``--audio-root`` (default: the CSV's folder) by its stem:
``{YTID}_{start_ms}``, else ``{YTID}``, else the first ``{YTID}_*``; key = ``audioset_key``); or a generic CSV whose
header has ``path`` and optionally ``labels`` (ints, space or comma separated) and ``key`` (default: the path as
written, without extension; relative paths are resolved against ``--audio-root`` or the CSV's folder).

Sharding: clips are sorted by key and shard ``i`` gets ``clips[i::num_shards]`` (round robin), so a re-run with the
same input and ``num_shards`` produces the same shards byte for byte, whatever ``workers``. Each shard is one task
(in a ``spawn`` process pool when ``workers > 1``): decode, encode, ``write_shard`` (atomic), then a sidecar
``<shard>.json`` (atomic) with its clip count, seconds, skipped files and a fingerprint of its clip list and settings.
A shard whose file and matching sidecar exist is "already done" and not rebuilt, so an interrupted job resumes.

The manifest ``<output>/manifest.json`` holds ``schema_version``, ``parameters``, ``shards`` (file, clips, seconds),
``total_clips``, ``total_hours``, ``skipped`` ({key, path, reason}: undecodable, too short, missing, duplicate key,
unknown label) and ``duplicates`` ({key, path, first}); ``run`` holds what varies between runs (time, counts built).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable

from matpac_jax.audio.io import AudioError, load_audio
from matpac_jax.data.records import (
    CODECS,
    COMPRESSIONS,
    ClipRecord,
    audioset_key,
    encode_record,
    shard_name,
    write_shard,
)

MANIFEST_VERSION = 1
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64", ".caf")

Clip = dict  # {"key": str, "path": str, "labels": list[int]}


class PrepareError(ValueError):
    """An unusable input (missing, no audio, no labels CSV for AudioSet); the CLI prints it and exits 2."""


def _write_json(path: str, obj: object) -> None:
    """Write JSON to ``path`` atomically (temp file + rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _audio_files(root: str) -> list[str]:
    """Every audio file under ``root`` (recursive), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found += [os.path.join(dirpath, n) for n in filenames if n.lower().endswith(AUDIO_EXTENSIONS)]
    return sorted(found)


def _folder_clips(root: str) -> list[Clip]:
    return [
        {"key": os.path.splitext(os.path.relpath(p, root))[0].replace(os.sep, "/"), "path": p, "labels": []}
        for p in _audio_files(root)
    ]


def _parse_labels(text: str) -> list[int]:
    return [int(t) for t in text.replace(",", " ").split()]


def _read_rows(csv_path: str) -> list[list[str]]:
    """CSV rows without '#' comment lines and blank rows, fields stripped."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        lines = [line for line in f if not line.lstrip().startswith("#")]
    return [[c.strip() for c in row] for row in csv.reader(lines, skipinitialspace=True) if any(row)]


def _audioset_clips(rows: list[list[str]], labels_csv: str | None, audio_root: str) -> tuple[list[Clip], list[dict]]:
    if not labels_csv or not os.path.isfile(labels_csv):
        raise PrepareError(f"AudioSet CSV needs --labels=class_labels_indices.csv (got {labels_csv!r})")
    with open(labels_csv, newline="", encoding="utf-8") as f:
        mid_index = {row["mid"].strip(): int(row["index"]) for row in csv.DictReader(f, skipinitialspace=True)}
    by_stem: dict[str, list[str]] = {}
    for p in _audio_files(audio_root):
        by_stem.setdefault(os.path.splitext(os.path.basename(p))[0], []).append(p)
    clips, skipped = [], []
    for row in rows:
        if row[0] == "YTID" or len(row) < 4:
            continue
        ytid, start, mids = row[0], row[1], row[3]
        key = audioset_key(ytid, start)
        paths = by_stem.get(key) or by_stem.get(ytid) or []
        if not paths:
            paths = [by_stem[s][0] for s in sorted(by_stem) if s.startswith(ytid + "_")][:1]
        unknown = [m for m in mids.split(",") if m.strip() and m.strip() not in mid_index]
        if not paths:
            skipped.append({"key": key, "path": "", "reason": "file not found"})
        elif unknown:
            skipped.append({"key": key, "path": paths[0], "reason": f"unknown label mid {unknown[0]}"})
        else:
            labels = [mid_index[m.strip()] for m in mids.split(",") if m.strip()]
            clips.append({"key": key, "path": paths[0], "labels": labels})
    return clips, skipped


def _collect(input_path: str, labels_csv: str | None, audio_root: str | None) -> tuple[list[Clip], list[dict], str]:
    """(clips in input order, pre-decode skips, input format) of a folder or CSV."""
    if not os.path.exists(input_path):
        raise PrepareError(f"input does not exist: {input_path}")
    if os.path.isdir(input_path):
        return _folder_clips(input_path), [], "folder"
    rows = _read_rows(input_path)
    root = audio_root or os.path.dirname(os.path.abspath(input_path))
    header = [c.lower() for c in rows[0]] if rows else []
    if "path" not in header:
        return (*_audioset_clips(rows, labels_csv, root), "audioset_csv")
    clips, skipped = [], []
    for row in rows[1:]:
        fields = dict(zip(header, row, strict=False))
        path = os.path.join(root, fields.get("path", ""))
        key = fields.get("key") or os.path.splitext(fields.get("path", ""))[0]
        try:
            labels = _parse_labels(fields.get("labels", ""))
        except ValueError:
            skipped.append({"key": key, "path": path, "reason": f"bad labels {fields.get('labels')!r}"})
            continue
        if not os.path.isfile(path):
            skipped.append({"key": key, "path": path, "reason": "file not found"})
        else:
            clips.append({"key": key, "path": path, "labels": labels})
    return clips, skipped, "csv"


def _fingerprint(clips: list[Clip], settings: dict) -> str:
    blob = json.dumps([settings, clips], sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _load_sidecar(path: str, fingerprint: str) -> dict | None:
    """The sidecar of a finished shard, or None if the shard must be (re)built."""
    if not os.path.isfile(path) or not os.path.isfile(path + ".json"):
        return None
    try:
        with open(path + ".json", encoding="utf-8") as f:
            side = json.load(f)
    except (OSError, ValueError):
        return None
    return side if side.get("fingerprint") == fingerprint else None


def _build_shard(task: tuple[int, str, list[Clip], dict, str]) -> dict:
    """Decode, encode and write one shard and its sidecar; returns the sidecar."""
    index, path, clips, settings, fingerprint = task
    sr, skipped, num_samples = settings["sample_rate"], [], 0
    min_samples = math.ceil(settings["min_seconds"] * sr - 1e-9)

    def records() -> Iterable[bytes]:
        nonlocal num_samples
        for clip in clips:
            try:
                wave = load_audio(clip["path"], sample_rate=sr, min_samples=min_samples)
                record = encode_record(
                    ClipRecord(clip["key"], wave, sr, clip["labels"], clip["path"]), settings["codec"]
                )
            except (AudioError, ValueError) as e:
                skipped.append({"key": clip["key"], "path": clip["path"], "reason": getattr(e, "reason", str(e))})
                continue
            num_samples += wave.shape[0]
            yield record

    count = write_shard(path, records(), settings["compression"])
    side = {"index": index, "shard": os.path.basename(path), "clips": count, "seconds": num_samples / sr}
    side.update(skipped=skipped, fingerprint=fingerprint)
    _write_json(path + ".json", side)
    return side


def _progress(total: int):
    """A tqdm bar over shards on stderr, or None when tqdm is missing."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="shard", file=sys.stderr, desc="prepare")


def prepare(
    input: str,
    output: str,
    num_shards: int,
    workers: int = 1,
    codec: str = "pcm16",
    compression: str = "none",
    labels_csv: str | None = None,
    audio_root: str | None = None,
    min_seconds: float = 0.0,
    sample_rate: int = 16000,
) -> dict:
    """Build (or resume) the shards of ``input`` under ``output`` and write ``manifest.json``; returns the manifest."""
    started = time.time()
    if num_shards < 1 or codec not in CODECS or compression not in COMPRESSIONS or sample_rate <= 0 or min_seconds < 0:
        raise PrepareError(
            f"bad settings: num_shards={num_shards}, codec={codec!r}, compression={compression!r}, "
            f"sample_rate={sample_rate}, min_seconds={min_seconds}"
        )
    input, output = os.path.abspath(input), os.path.abspath(output)
    clips, skipped, fmt = _collect(input, labels_csv, audio_root)
    if not clips:
        raise PrepareError(f"no usable audio in {input} ({len(skipped)} rows skipped)")
    first: dict[str, str] = {}
    unique, duplicates = [], []
    for clip in clips:  # input order: the first occurrence of a key wins
        if clip["key"] in first:
            duplicates.append({"key": clip["key"], "path": clip["path"], "first": first[clip["key"]]})
            skipped.append(
                {"key": clip["key"], "path": clip["path"], "reason": f"duplicate key of {first[clip['key']]}"}
            )
        else:
            first[clip["key"]] = clip["path"]
            unique.append(clip)
    unique.sort(key=lambda c: c["key"])
    sources = {k: v and os.path.abspath(v) for k, v in (("labels_csv", labels_csv), ("audio_root", audio_root))}
    settings = {"codec": codec, "compression": compression, "sample_rate": int(sample_rate)}
    settings["min_seconds"] = float(min_seconds)
    sidecars: dict[int, dict] = {}
    tasks = []
    for i in range(num_shards):
        path, shard_clips = shard_name(output, i, num_shards), unique[i::num_shards]
        fingerprint = _fingerprint(shard_clips, settings)
        side = _load_sidecar(path, fingerprint)
        if side is None:
            tasks.append((i, path, shard_clips, settings, fingerprint))
        else:
            sidecars[i] = side
    already_done = len(sidecars)
    os.makedirs(output, exist_ok=True)
    bar = _progress(len(tasks))
    pool = (
        multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) if workers > 1 and len(tasks) > 1 else None
    )
    try:
        for side in pool.imap_unordered(_build_shard, tasks) if pool else map(_build_shard, tasks):
            sidecars[side["index"]] = side
            bar.update(1) if bar else print(f"prepare: {side['shard']} done", file=sys.stderr)
    finally:
        if pool:  # all results are in (or the job failed): stop the workers
            pool.terminate()
            pool.join()
        if bar:
            bar.close()
    shards = [{k: sidecars[i][k] for k in ("shard", "clips", "seconds")} for i in range(num_shards)]
    skipped += [s for i in range(num_shards) for s in sidecars[i]["skipped"]]
    manifest = {
        "schema_version": MANIFEST_VERSION,
        "parameters": {"input": input, "format": fmt, "num_shards": num_shards, **settings, **sources},
        "shards": shards,
        "total_clips": sum(s["clips"] for s in shards),
        "total_hours": sum(s["seconds"] for s in shards) / 3600.0,
        "skipped": sorted(skipped, key=lambda s: (s["key"], s["path"], s["reason"])),
        "duplicates": duplicates,
        "run": {"started": started, "elapsed_seconds": time.time() - started, "built": len(tasks)},
    }
    manifest["run"]["already_done"] = already_done
    _write_json(os.path.join(output, "manifest.json"), manifest)
    return manifest


def summary(manifest: dict, output: str) -> str:
    """The one-line summary the CLI prints."""
    run = manifest["run"]
    return (
        f"prepared {manifest['total_clips']} clips ({manifest['total_hours']:.3f} h) in {len(manifest['shards'])} "
        f"shards ({run['built']} built, {run['already_done']} already done) -> {os.path.join(output, 'manifest.json')}"
        f"; skipped {len(manifest['skipped'])} files ({len(manifest['duplicates'])} duplicate keys)"
    )


def main(argv: list[str] | None = None) -> int:
    """The CLI: parse flags, run ``prepare``, print the summary; 2 with a message for an unusable input."""
    parser = argparse.ArgumentParser(prog="python -m matpac_jax.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="folder of audio files, AudioSet segment CSV or path CSV")
    parser.add_argument("--output", required=True, help="output folder for shards and manifest.json")
    parser.add_argument("--num-shards", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="decoding processes (0 or 1: in-process)")
    parser.add_argument("--codec", choices=CODECS, default="pcm16")
    parser.add_argument("--compression", choices=tuple(COMPRESSIONS), default="none", help="ArrayRecord compression")
    parser.add_argument("--labels", default=None, help="AudioSet class_labels_indices.csv")
    parser.add_argument("--audio-root", default=None, help="where CSV files are found (default: the CSV's folder)")
    parser.add_argument("--min-seconds", type=float, default=0.0, help="skip clips shorter than this")
    parser.add_argument("--sample-rate", type=int, default=16000)
    args = parser.parse_args(argv)
    try:
        manifest = prepare(
            args.input,
            args.output,
            args.num_shards,
            workers=args.workers,
            codec=args.codec,
            compression=args.compression,
            labels_csv=args.labels,
            audio_root=args.audio_root,
            min_seconds=args.min_seconds,
            sample_rate=args.sample_rate,
        )
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest, os.path.abspath(args.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
