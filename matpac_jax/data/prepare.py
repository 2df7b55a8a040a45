"""Prepare a corpus of audio files as ArrayRecord shards of clip records (``records.py``) plus a manifest.

    python -m matpac_jax.data.prepare --input=<folder | csv> --output=<dir> --num-shards=N --workers=M \\
        [--codec=pcm16|flac] [--compression=none|zstd] [--labels=class_labels_indices.csv] [--audio-root=DIR] \\
        [--min-seconds=0] [--max-seconds=3600] [--sample-rate=16000] [--replace]

Inputs: a folder (walked recursively for audio files; key = path relative to the folder without extension, '/'
separated, no labels); an AudioSet segment CSV (``#`` comments, rows ``YTID, start, end, "mid,mid"``; ``--labels``
maps each mid to its head unit, its position in ``class_labels_indices.csv`` sorted by mid, the published head's order:
``audioset_classes``); the file of a YTID is found under ``--audio-root`` (default: the CSV's folder) by its stem:
``{YTID}_{start_ms}``, else ``{YTID}``, else the first ``{YTID}_*``; key = ``audioset_key``); or a generic CSV whose
header has ``path`` and optionally ``labels`` (ints, space or comma separated) and ``key`` (default: the path as
written, without extension; relative paths are resolved against ``--audio-root`` or the CSV's folder). CSVs are
UTF-8 text. A file name that is not valid UTF-8 is read as the bytes it names; its key and recorded path show the
undecodable bytes as ``\\xNN`` escapes.

Sharding: clips are sorted by key and shard ``i`` gets ``clips[i::num_shards]`` (round robin), so a re-run with the
same input and ``num_shards`` produces the same shards byte for byte, whatever ``workers``. Each shard is one task
(with ``workers > 1``, each task runs in its own ``spawn`` process, at most ``workers`` at a time): decode, encode,
``write_shard`` (atomic), then a sidecar ``<shard>.json`` (atomic) with its clip count, seconds, skipped files and a
fingerprint of its clip list and settings. A shard whose file is a readable ArrayRecord file with the record count of
its matching sidecar is "already done" and not rebuilt, so an interrupted job resumes.

Reading the shards: give the trainer the output folder or its ``manifest.json`` (``--config.data.train=<output>``):
that resolves to exactly the manifest's shards. A glob over the folder (``<output>/*.arrayrecord``) reads every
shard file in it, so an output folder only ever holds the shards of one plan: shards of another ``num_shards`` (or
any other ``*.arrayrecord`` file) there make ``prepare`` refuse, unless ``--replace`` is given, which deletes them
(and their sidecars) after the new shards and manifest are written.

Failures: a file that cannot be used (undecodable, truncated, empty, too short, too long, a sample rate outside
1 kHz..768 kHz, non-finite samples, or an unexpected error decoding it, such as running out of memory) is skipped
and reported by name; it never stops the run. A worker process that dies (e.g. killed by the out-of-memory killer)
fails only its shard: the others are finished, then ``prepare`` raises ``PrepareError`` naming the failed shards and
writes no manifest; the same command resumes. Temporary files left by a killed writer (``*.tmp-<pid>-*`` of a process
that no longer runs) are removed when ``prepare`` starts. Unusable inputs and settings raise ``PrepareError`` (the CLI
prints one line and exits 2).

The manifest ``<output>/manifest.json`` holds ``schema_version``, ``parameters``, ``label_order`` (what the records'
label ids mean: ``LABEL_ORDERS``), ``shards`` (file, clips, seconds), ``total_clips``, ``total_hours``, ``skipped``
({key, path, reason}: undecodable, too short, missing, duplicate key, unknown label, bad CSV row) and ``duplicates``
({key, path, first}); ``run`` holds what varies between runs (time, counts built, temporaries and foreign shards
removed). A manifest without ``label_order`` was written before it was
recorded: its AudioSet labels are the ``index`` column of ``class_labels_indices.csv`` (ontology order), which
fine-tuning refuses (``label_order``); running ``prepare`` again with the same flags rebuilds those shards (a shard's
fingerprint covers its clips' labels).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from tqdm import tqdm

from matpac_jax.audio.io import MAX_RATE, MIN_RATE
from matpac_jax.data.audioset_classes import LABEL_ORDER
from matpac_jax.data.records import CODECS, COMPRESSIONS, shard_name
from matpac_jax.data.shard_writer import (
    build_shard,
    clip_fingerprint,
    json_safe,
    load_sidecar,
    run_parallel,
)
from matpac_jax.data.sources import PrepareError, _collect, _shown
from matpac_jax.fileio import TMP_MARK, atomic_write_json, unwritable_reason

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
MAX_SHARDS = 99999  # shard names hold 5 digits
DEFAULT_MAX_SECONDS = 3600.0
# input format -> what its records' label ids mean: AudioSet head units (mid-sorted), a CSV's ids as written, none
LABEL_ORDERS = {"audioset_csv": LABEL_ORDER, "csv": "as_written", "folder": "none"}


def _progress(total: int):
    """A tqdm bar over shards on stderr."""
    return tqdm(total=total, unit="shard", file=sys.stderr, desc="prepare")


def _remove_stale_temporaries(output: str) -> list[str]:
    """Remove the temporary files (``name.tmp-<pid>-...``) in ``output`` whose writing process no longer runs: what
    a killed run left. A live writer's (another ``prepare`` on this output) are kept. Returns the removed names."""
    removed = []
    for name in sorted(os.listdir(output)):
        pid_text = name.rpartition(TMP_MARK)[2].split("-")[0] if TMP_MARK in name else ""
        full = os.path.join(output, name)
        if not pid_text.isdigit() or not os.path.isfile(full):
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # a live process of another user
        try:
            os.remove(full)
            removed.append(_shown(name))
        except FileNotFoundError:
            pass
    return removed


def _foreign_shards(output: str, planned: list[str]) -> list[str]:
    """The ``*.arrayrecord`` files in ``output`` that are not shards of this plan (sorted names)."""
    if not os.path.isdir(output):
        return []
    keep = {os.path.basename(p) for p in planned}
    return sorted(
        n
        for n in os.listdir(output)
        if n.endswith(".arrayrecord") and n not in keep and os.path.isfile(os.path.join(output, n))
    )


def _check_settings(num_shards, workers, codec, compression, min_seconds, max_seconds, sample_rate) -> None:
    """PrepareError naming every unusable setting (non-finite or out-of-range numbers, unknown names)."""
    problems = []
    if not isinstance(num_shards, int) or not 1 <= num_shards <= MAX_SHARDS:
        problems.append(f"--num-shards={num_shards} (expected 1 to {MAX_SHARDS})")
    if not isinstance(workers, int):
        problems.append(f"--workers={workers!r} (expected an integer)")
    if codec not in CODECS:
        problems.append(f"--codec={codec!r} (expected one of {', '.join(CODECS)})")
    if compression not in COMPRESSIONS:
        problems.append(f"--compression={compression!r} (expected one of {', '.join(COMPRESSIONS)})")
    if not isinstance(sample_rate, int) or not MIN_RATE <= sample_rate <= MAX_RATE:
        problems.append(f"--sample-rate={sample_rate} (expected an integer from {MIN_RATE} to {MAX_RATE})")
    if not (isinstance(min_seconds, int | float) and math.isfinite(min_seconds) and min_seconds >= 0):
        problems.append(f"--min-seconds={min_seconds} (expected a finite number >= 0)")
    if not (isinstance(max_seconds, int | float) and math.isfinite(max_seconds) and max_seconds > 0):
        problems.append(f"--max-seconds={max_seconds} (expected a finite number > 0)")
    elif not problems and min_seconds > max_seconds:
        problems.append(f"--min-seconds={min_seconds} > --max-seconds={max_seconds} (every clip would be skipped)")
    if problems:
        raise PrepareError("bad settings: " + "; ".join(problems))


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
    max_seconds: float = DEFAULT_MAX_SECONDS,
    replace: bool = False,
) -> dict:
    """Build (or resume) the shards of ``input`` under ``output`` and write ``manifest.json``; returns the manifest.

    ``replace``: delete the ``*.arrayrecord`` files in ``output`` that are not shards of this plan (with their
    sidecars) once the new manifest is written; without it their presence is a PrepareError, before anything is
    built. PrepareError for an unusable input or setting, or when shards could not be built (the others are kept).
    """
    started = time.time()
    _check_settings(num_shards, workers, codec, compression, min_seconds, max_seconds, sample_rate)
    input, output = os.path.abspath(input), os.path.abspath(output)
    problem = unwritable_reason(output, directory=True)
    if problem:
        raise PrepareError(f"--output={_shown(output)}: {_shown(problem)}: give a new or empty folder")
    clips, skipped, fmt = _collect(input, labels_csv, audio_root)
    if not clips:
        first_skip = f"; the first: {skipped[0]['key']!r}: {skipped[0]['reason']}" if skipped else ""
        raise PrepareError(_shown(f"no usable audio in {input} ({len(skipped)} rows skipped{first_skip})"))
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
    settings.update(min_seconds=float(min_seconds), max_seconds=float(max_seconds))
    planned = [shard_name(output, i, num_shards) for i in range(num_shards)]
    foreign = _foreign_shards(output, planned)
    if foreign and not replace:
        raise PrepareError(
            f"--output={_shown(output)} holds {len(foreign)} .arrayrecord files that are not among this run's "
            f"{num_shards} shards ({_shown(', '.join(foreign[:3]))}{', ...' if len(foreign) > 3 else ''}; another "
            "--num-shards?): a glob over the folder would read both. Give a new or empty --output, or pass --replace "
            "to delete them once the new shards are built"
        )
    os.makedirs(output, exist_ok=True)
    removed = _remove_stale_temporaries(output)
    sidecars: dict[int, dict] = {}
    tasks = []
    for i, path in enumerate(planned):
        shard_clips = unique[i::num_shards]
        fingerprint = clip_fingerprint(shard_clips, settings)
        side = load_sidecar(path, fingerprint)
        if side is None:
            tasks.append((i, path, shard_clips, settings, fingerprint))
        else:
            sidecars[i] = side
    already_done = len(sidecars)
    bar = _progress(len(tasks))

    def done(side: dict) -> None:
        sidecars[side["index"]] = side
        bar.update(1) if bar else print(f"prepare: {side['shard']} done", file=sys.stderr)

    try:
        if workers > 1 and len(tasks) > 1:
            failures = run_parallel(tasks, workers, done)
        else:
            failures = []
            for task in tasks:
                done(build_shard(task))
    finally:
        if bar:
            bar.close()
    if failures:
        raise PrepareError(
            f"{len(failures)} of {num_shards} shards could not be built ({failures[0]}"
            f"{f'; and {len(failures) - 1} more' if len(failures) > 1 else ''}); the {len(sidecars)} finished shards "
            "are kept: run the same command again to build the rest"
        )
    shards = [{k: sidecars[i][k] for k in ("shard", "clips", "seconds")} for i in range(num_shards)]
    skipped += [s for i in range(num_shards) for s in sidecars[i]["skipped"]]
    skipped = json_safe(skipped)
    manifest = {
        "schema_version": MANIFEST_VERSION,
        "parameters": {"input": input, "format": fmt, "num_shards": num_shards, **settings, **sources},
        "label_order": LABEL_ORDERS[fmt],
        "shards": shards,
        "total_clips": sum(s["clips"] for s in shards),
        "total_hours": sum(s["seconds"] for s in shards) / 3600.0,
        "skipped": sorted(skipped, key=lambda s: (s["key"], s["path"], s["reason"])),
        "duplicates": duplicates,
        "run": {"started": started, "elapsed_seconds": time.time() - started, "built": len(tasks)},
    }
    manifest["run"].update(already_done=already_done, removed_temporaries=removed, replaced=foreign)
    manifest = json_safe(manifest)
    atomic_write_json(os.path.join(output, MANIFEST), manifest)
    for name in foreign:  # only now: until the new manifest is in place, the old shards are still a whole corpus
        for path in (os.path.join(output, name), os.path.join(output, name + ".json")):
            if os.path.isfile(path):
                os.remove(path)
    return manifest


def read_manifest(path: str) -> tuple[str, dict]:
    """(path of the ``manifest.json``, its content) after checking it is a shard manifest of this version. ``path``:
    the manifest or the folder holding it. ValueError naming the problem (no manifest in the folder, not a manifest
    of this version)."""
    manifest_path = os.path.join(path, MANIFEST) if os.path.isdir(path) else path
    if not os.path.isfile(manifest_path):
        raise ValueError(
            f"{path} is a folder without a {MANIFEST}: give the output folder of python -m matpac_jax.data.prepare, "
            "its manifest.json, or a glob of shard files"
        )
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{manifest_path}: not a readable JSON manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != MANIFEST_VERSION:
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise ValueError(
            f"{manifest_path}: not a shard manifest of version {MANIFEST_VERSION} (schema_version={version!r}): "
            "give the manifest.json written by python -m matpac_jax.data.prepare"
        )
    return manifest_path, manifest


def manifest_shards(path: str) -> list[tuple[str, int]]:
    """(shard path, record count) of each shard a manifest lists, in shard order. ``path``: a ``manifest.json``
    written by ``prepare`` or the folder holding it. ValueError naming the problem (``read_manifest``'s, or a
    malformed entry); the shards themselves are not opened here."""
    manifest_path, manifest = read_manifest(path)
    shards, folder = manifest.get("shards"), os.path.dirname(os.path.abspath(manifest_path))
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"{manifest_path}: 'shards' should be a non-empty list")
    out = []
    for i, entry in enumerate(shards):
        name = entry.get("shard") if isinstance(entry, dict) else None
        clips = entry.get("clips") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
            raise ValueError(f"{manifest_path}: shard {i} should name a file in the manifest's folder, got {entry!r}")
        if not isinstance(clips, int) or isinstance(clips, bool) or clips < 0:
            raise ValueError(f"{manifest_path}: shard {i} ({name}) has no valid 'clips' count: {entry!r}")
        out.append((os.path.join(folder, name), clips))
    return out


def label_order(path: str) -> str:
    """What the label ids of a manifest's records mean (``LABEL_ORDERS``): its ``label_order``, or, for a manifest
    written before that was recorded, ``'index'`` when its input was an AudioSet CSV (the ontology-ordered ``index``
    column of class_labels_indices.csv, not the head's order) and its format's order otherwise (unchanged since)."""
    _, manifest = read_manifest(path)
    if "label_order" in manifest:
        return str(manifest["label_order"])
    fmt = manifest.get("parameters", {}).get("format")
    return "index" if fmt == "audioset_csv" else LABEL_ORDERS.get(fmt, "unknown")


def summary(manifest: dict, output: str) -> str:
    """The one-line summary the CLI prints."""
    run = manifest["run"]
    return (
        f"prepared {manifest['total_clips']} clips ({manifest['total_hours']:.3f} h) in {len(manifest['shards'])} "
        f"shards ({run['built']} built, {run['already_done']} already done) -> {os.path.join(output, MANIFEST)}"
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
    parser.add_argument(
        "--max-seconds", type=float, default=DEFAULT_MAX_SECONDS, help="skip files longer than this (decode bound)"
    )
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument(
        "--replace", action="store_true", help="delete .arrayrecord files in --output that are not this run's shards"
    )
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
            max_seconds=args.max_seconds,
            replace=args.replace,
        )
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest, os.path.abspath(args.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
