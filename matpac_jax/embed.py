r"""Embed audio files with a trained encoder.

    python -m matpac_jax.embed --checkpoint=models/pp --input=clips/ --output=emb.npz [--frames]
    python -m matpac_jax.embed --checkpoint=runs/pp --input=list.csv --output=emb/      # one .npy per file

``--checkpoint``: an encoder directory (``python -m matpac_jax.convert``), a training workdir or a checkpoint.
``--input``: an audio file, a folder (searched recursively for audio files) or a CSV with a ``path`` column (relative
paths are resolved against the CSV's folder). Files are decoded like the training data (any rate and channel count ->
16 kHz mono); a file that cannot be decoded is skipped, listed at the end and in ``<output>.skipped.json``.

AudioSet tagging (fine-tuned checkpoints with their 527-class head): ``--tag --labels=class_labels_indices.csv
[--top-k=5]`` prints each file's top-k labels and stores the probabilities (``tags`` [N, 527] in the ``.npz``). The
head's class ``i`` is the ``i``-th row of the label file sorted by ``mid``, as in the published model.

``--output`` ending in ``.npz``: arrays ``paths`` [N] (as given / relative to the folder) and ``clip`` [N, 3840], and
with ``--frames`` one ``frames/<i>`` [T_i, 3840] per file (row i of ``paths``). Otherwise a folder receiving
``<path>.clip.npy`` (and ``<path>.frames.npy``) per file, mirroring the input tree.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np

from matpac_jax.audio.io import AudioError, load_audio


def list_inputs(path: str) -> list[tuple[str, str]]:
    """[(name, file)]: name is the key written to the output (relative path for folders, as written in a CSV)."""
    from matpac_jax.data.prepare import AUDIO_EXTENSIONS

    if os.path.isdir(path):
        out = []
        for root, _, files in os.walk(path):
            for f in files:
                if f.lower().endswith(AUDIO_EXTENSIONS):
                    full = os.path.join(root, f)
                    out.append((os.path.relpath(full, path), full))
        return sorted(out)
    if path.lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or "path" not in rows[0]:
            raise ValueError(f"{path}: expected a CSV with a 'path' column")
        base = os.path.dirname(os.path.abspath(path))
        return [(r["path"], r["path"] if os.path.isabs(r["path"]) else os.path.join(base, r["path"])) for r in rows]
    if os.path.isfile(path):
        return [(os.path.basename(path), path)]
    raise FileNotFoundError(f"--input={path}: no such file or folder")


def audioset_labels(path: str) -> list[str]:
    """Display names in the published head's class order: ``class_labels_indices.csv`` rows sorted by ``mid``."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"mid", "display_name"} <= set(rows[0]):
        raise ValueError(f"{path}: expected AudioSet's class_labels_indices.csv (columns index, mid, display_name)")
    return [r["display_name"] for r in sorted(rows, key=lambda r: r["mid"])]


def embed_files(encoder, files: list[tuple[str, str]], frames: bool, skipped: list, progress: bool = True, tag=False):
    """Yields (name, clip [D], frames [T, D] or None, tags [C] or None) per decodable file; appends {path, reason}
    to ``skipped``."""
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(files), unit="file", file=sys.stderr, desc="embed")
        except ImportError:
            pass
    for name, path in files:
        try:
            wave = load_audio(path, encoder.spec.frontend.sample_rate, min_samples=encoder.spec.frontend.win_length)
        except AudioError as e:
            skipped.append({"path": path, "reason": e.reason})
        else:
            rate = encoder.spec.frontend.sample_rate
            out = encoder.embed(wave, rate)
            tags = encoder.tag(wave, rate)[0] if tag else None
            yield name, out["clip"][0], (out["frames"][0] if frames else None), tags
        if bar:
            bar.update(1)
    if bar:
        bar.close()


def main(argv: list[str] | None = None) -> int:
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
    from matpac_jax.inference import load_encoder

    try:
        files = list_inputs(args.input)
        encoder = load_encoder(args.checkpoint, chunk_batch=args.chunk_batch)
        labels = audioset_labels(args.labels) if args.labels else None
        if args.tag and "head" not in encoder.params:
            raise ValueError(
                f"--tag: {args.checkpoint} has no AudioSet head (convert a fine-tuned checkpoint with head.*)"
            )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not files:
        print(f"error: no audio files in {args.input}", file=sys.stderr)
        return 2
    names, clips, frames, tags, skipped = [], [], [], [], []
    to_npz = args.output.endswith(".npz")
    for name, clip, frame, tag in embed_files(encoder, files, args.frames, skipped, tag=args.tag):
        if tag is not None:
            top = np.argsort(-tag)[: args.top_k]
            print(f"{name}: " + ", ".join(f"{labels[i] if labels else i} ({tag[i]:.2f})" for i in top))
            tags.append(tag)
        if to_npz:
            names.append(name)
            clips.append(clip)
            frames.append(frame)
        else:
            stem = os.path.join(args.output, name)
            os.makedirs(os.path.dirname(stem), exist_ok=True)
            np.save(stem + ".clip.npy", clip)
            if frame is not None:
                np.save(stem + ".frames.npy", frame)
            names.append(name)
    if to_npz:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        arrays = {"paths": np.array(names), "clip": np.stack(clips) if clips else np.zeros((0, 0), np.float32)}
        if args.frames:
            arrays |= {f"frames/{i}": f for i, f in enumerate(frames)}
        if tags:
            arrays["tags"] = np.stack(tags)
        np.savez(args.output, **arrays)
    report = args.output.rstrip("/") + ".skipped.json"
    with open(report, "w") as f:
        json.dump(skipped, f, indent=1)
    for s in skipped:
        print(f"skipped: {s['path']}: {s['reason']}", file=sys.stderr)
    print(f"embedded {len(names)} files -> {args.output}; skipped {len(skipped)} (listed in {report})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
