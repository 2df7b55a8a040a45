r"""Embed audio files with any trained model (``load_model``: an encoder, a fine-tuned encoder, a distilled student).

    python -m matpac_jax.embed --checkpoint=models/pp --input=clips/ --output=emb.npz [--frames]
    python -m matpac_jax.embed --checkpoint=runs/pp --input=list.csv --output=emb/      # one .npy per file

``--checkpoint``: a model directory (``python -m matpac_jax.convert``, a distillation's ``WORKDIR/student``), a training
workdir or a checkpoint. ``--frames`` needs a model with frame embeddings (ViT encoders; students pool the clip).
``--input``: an audio file, a folder (searched recursively for audio files) or a CSV with a ``path`` column (relative
paths are resolved against the CSV's folder). Files are decoded like the training data (any rate and channel count ->
16 kHz mono); a file that cannot be decoded is skipped, listed at the end and in ``<output>.skipped.json``.

AudioSet tagging (fine-tuned checkpoints with their 527-class head): ``--tag --labels=class_labels_indices.csv
[--top-k=5]`` prints each file's top-k labels and stores the probabilities (``tags`` [N, 527] in the ``.npz``). The
head's class ``i`` is the ``i``-th row of the label file sorted by ``mid``, as in the published model and as ``prepare``
stores AudioSet labels for fine-tuning (``data.audioset_classes``).

``--output`` ending in ``.npz``: arrays ``paths`` [N] (as given / relative to the folder) and ``clip`` [N, 3840], and
with ``--frames`` one ``frames/<i>`` [T_i, 3840] per file (row i of ``paths``). Otherwise a folder receiving
``<path>.clip.npy`` (and ``<path>.frames.npy``) per file, mirroring the input tree. Every output stays inside
``--output``: a CSV path's ``..`` and leading ``/`` are dropped from its output name (``../x.wav`` -> ``x.wav``), and
two inputs with the same output name (also when they differ only in case) get distinct ones (``x~2.wav``); each such
renaming is printed. A CSV row without a path is skipped and reported with its line number.

The outputs are checked before any audio is encoded (an output that cannot be written: exit 2, naming it); each file
is written atomically, and the count printed at the end is of the files actually written.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np
from tqdm import tqdm

from matpac_jax.audio.io import AudioError, load_audio
from matpac_jax.data.audioset_classes import read_audioset_classes
from matpac_jax.data.sources import AUDIO_EXTENSIONS
from matpac_jax.fileio import atomic_save_npz, atomic_write, atomic_write_json, unwritable_reason
from matpac_jax.load import load_model


def list_inputs(path: str, skipped: list | None = None) -> list[tuple[str, str]]:
    """[(name, file)]: name is the key written to the output (relative path for folders, as written in a CSV). A CSV
    row without a path is appended to ``skipped`` as {path, reason} naming its line (a ``ValueError`` without
    ``skipped``)."""
    if os.path.isdir(path):
        out = []
        for root, _, files in os.walk(path):
            for f in files:
                if f.lower().endswith(AUDIO_EXTENSIONS):
                    full = os.path.join(root, f)
                    out.append((os.path.relpath(full, path), full))
        return sorted(out)
    if path.lower().endswith(".csv"):
        return _csv_inputs(path, skipped)
    if os.path.isfile(path):
        return [(os.path.basename(path), path)]
    raise FileNotFoundError(f"--input={path}: no such file or folder")


def _csv_inputs(path: str, skipped: list | None) -> list[tuple[str, str]]:
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark is not a column
        reader = csv.DictReader(f)
        try:
            if "path" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: expected a CSV with a 'path' column (header: {reader.fieldnames})")
            for row in reader:
                name = row.get("path") or ""
                if not name.strip() or "\0" in name:
                    what = "a NUL character in its path" if name.strip() else "no path"
                    reason = f"line {reader.line_num} has {what}"
                    if skipped is None:
                        raise ValueError(f"{path}: {reason}")
                    skipped.append({"path": f"{path}:{reader.line_num}", "reason": reason})
                    continue
                out.append((name, name if os.path.isabs(name) else os.path.join(base, name)))
        except csv.Error as e:  # e.g. a NUL character, an unterminated quote
            raise ValueError(f"{path}: line {reader.line_num}: not readable as CSV ({e})") from None
    return out


def output_key(name: str) -> str:
    """A relative path under the output folder for an input ``name``: normalised, ``..`` and leading ``/`` dropped
    (``../a/x.wav`` -> ``a/x.wav``, ``/data/x.wav`` -> ``data/x.wav``); never empty, never leaves the folder."""
    path = os.path.normpath(os.path.splitdrive(name)[1])
    parts = [p for p in path.replace(os.sep, "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "_"


def output_keys(names: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(one distinct output key per name, [(name, key)] for each name whose key is not the name itself). Keys are
    distinct even ignoring case (case-insensitive file systems); a repeated key gets ``~2``, ``~3``... before its
    extension."""
    keys, renamed, seen = [], [], set()
    for name in names:
        key = base = output_key(name)
        stem, ext = os.path.splitext(base)
        k = 1
        while key.casefold() in seen:
            k += 1
            key = f"{stem}~{k}{ext}"
        seen.add(key.casefold())
        keys.append(key)
        if key != name:
            renamed.append((name, key))
    return keys, renamed


def embed_files(encoder, files: list[tuple[str, str]], frames: bool, skipped: list, progress: bool = True, tag=False):
    """Yields (name, clip [D], frames [T, D] or None, tags [C] or None) per decodable file, in the order of ``files``
    (``name`` is passed through as given); appends {path, reason} to ``skipped``."""
    bar = tqdm(total=len(files), unit="file", file=sys.stderr, desc="embed") if progress else None
    for name, path in files:
        rate = encoder.sample_rate
        try:
            wave = load_audio(path, rate, min_samples=encoder.min_samples)
        except AudioError as e:
            skipped.append({"path": path, "reason": e.reason})
        else:
            out = encoder.embed(wave, rate)
            tags = encoder.tag(wave, rate)[0] if tag else None
            yield name, out["clip"][0], (out["frames"][0] if frames else None), tags
        if bar:
            bar.update(1)
    if bar:
        bar.close()


def _outputs(args, keys: list[str]) -> list[str]:
    """Every file the run may write (the report last); raises ``ValueError`` naming the first one that cannot be."""
    if args.output.endswith(".npz"):
        paths = [args.output]
    else:
        suffixes = (".clip.npy", ".frames.npy") if args.frames else (".clip.npy",)
        why = unwritable_reason(args.output, directory=True)
        if why:
            raise ValueError(f"--output={args.output}: {why}")
        paths = [os.path.join(args.output, key + suffix) for key in keys for suffix in suffixes]
    paths.append(args.output.rstrip("/") + ".skipped.json")
    for path in paths:
        why = unwritable_reason(path)
        if why:
            raise ValueError(f"cannot write {path}: {why}; choose another --output")
    return paths


def _save_npy(path: str, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _report_renamed(output: str, renamed: list[tuple[str, str]]) -> None:
    """One stderr line per input whose output name was made distinct, one line for those only made relative."""
    moved = [(name, key) for name, key in renamed if key == output_key(name)]
    for name, key in renamed:
        if key != output_key(name):
            renamed_to = f"{os.path.join(output, key)}.clip.npy"
            print(f"renamed: {name} -> {renamed_to} (same output name as another input)", file=sys.stderr)
    if moved:
        name, key = moved[0]
        note = f"note: {len(moved)} output names had '..' or a leading '/' removed to stay inside {output}"
        print(f"{note} (e.g. {name} -> {os.path.join(output, key)}.clip.npy)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The CLI. Bad arguments or unwritable outputs: one ``error:`` line and exit 2 before any audio is encoded. Exit 1
    when an output file could not be written during the run (listed in the report with the skipped files)."""
    ap = argparse.ArgumentParser(prog="python -m matpac_jax.embed", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--input", required=True, help="audio file, folder or CSV with a 'path' column")
    ap.add_argument("--output", required=True, help="FILE.npz or a folder")
    ap.add_argument("--frames", action="store_true", help="also write frame embeddings (one every 160 ms)")
    ap.add_argument("--chunk-batch", type=int, default=16, help="608-frame chunks encoded per device call")
    ap.add_argument("--tag", action="store_true", help="AudioSet class probabilities (fine-tuned head needed)")
    ap.add_argument("--labels", default=None, help="class_labels_indices.csv, to print labels with --tag")
    ap.add_argument("--top-k", type=int, default=5)
    args = ap.parse_args(argv)
    skipped = []
    try:
        files = list_inputs(args.input, skipped)
        keys, renamed = output_keys([name for name, _ in files])
        report = _outputs(args, keys)[-1]
        encoder = load_model(args.checkpoint, chunk_batch=args.chunk_batch)
        if args.frames and encoder.frame_rate is None:
            raise ValueError(f"--frames: {args.checkpoint} holds a model without frame embeddings (it pools the clip)")
        labels = read_audioset_classes(args.labels).names if args.labels else None
        if args.tag and "head" not in getattr(encoder, "params", {}):
            raise ValueError(
                f"--tag: {args.checkpoint} has no AudioSet head (convert a fine-tuned checkpoint with head.*)"
            )
        classes = np.shape(encoder.params["head"]["bias"])[0] if args.tag else None
        if args.tag and labels is not None and len(labels) != classes:
            raise ValueError(f"--labels={args.labels}: {len(labels)} labels for a head of {classes} classes")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not files:
        rows = f" ({len(skipped)} rows without a path)" if skipped else ""
        print(f"error: no audio files in {args.input}{rows}", file=sys.stderr)
        return 2
    to_npz = args.output.endswith(".npz")
    if not to_npz:
        _report_renamed(args.output, renamed)
    names, clips, frames, tags, failed = [], [], [], [], 0
    keyed = [((name, key), path) for (name, path), key in zip(files, keys, strict=True)]
    for (name, key), clip, frame, tag in embed_files(encoder, keyed, args.frames, skipped, tag=args.tag):
        if tag is not None:
            top = np.argsort(-tag)[: args.top_k]
            print(f"{name}: " + ", ".join(f"{labels[i] if labels else i} ({tag[i]:.2f})" for i in top))
            tags.append(tag)
        if to_npz:
            names.append(name)
            clips.append(clip)
            frames.append(frame)
            continue
        stem = os.path.join(args.output, key)
        try:
            _save_npy(stem + ".clip.npy", clip)
            if frame is not None:
                _save_npy(stem + ".frames.npy", frame)
        except OSError as e:
            skipped.append({"path": name, "reason": f"cannot write its output {stem}.clip.npy: {e}"})
            failed += 1
            continue
        names.append(name)
    if to_npz:
        arrays = {"paths": np.array(names), "clip": np.stack(clips) if clips else np.zeros((0, 0), np.float32)}
        if args.frames:
            arrays |= {f"frames/{i}": f for i, f in enumerate(frames)}
        if tags:
            arrays["tags"] = np.stack(tags)
        try:
            atomic_save_npz(args.output, **arrays)
        except OSError as e:
            print(f"error: cannot write {args.output}: {e}", file=sys.stderr)
            names, failed = [], len(names)
    try:
        atomic_write_json(report, skipped)
    except OSError as e:
        print(f"error: cannot write {report}: {e}", file=sys.stderr)
        failed += 1
    for s in skipped:
        print(f"skipped: {s['path']}: {s['reason']}", file=sys.stderr)
    print(f"embedded {len(names)} files -> {args.output}; skipped {len(skipped)} (listed in {report})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
