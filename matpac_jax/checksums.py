"""Checksum manifests of checkpoint directories: ``<step>/checksums.json`` holds the step, and the size and sha256 of
every file of the checkpoint but orbax's two commit markers (``_CHECKPOINT_METADATA`` and ``commit_success.txt``,
rewritten when orbax commits). ``Checkpointer`` writes it before the commit and verifies a checkpoint against it on
resume; ``trained_state`` verifies what it reads the same way."""

from __future__ import annotations

import json
import os

from matpac_jax import fileio

MANIFEST = "checksums.json"
MANIFEST_FORMAT = "matpac_jax checkpoint checksums"
UNHASHED = ("_CHECKPOINT_METADATA", "commit_success.txt")  # top-level files orbax rewrites when it commits


def _hashed_files(step_dir: str) -> list[str]:
    """Relative paths of the files a manifest covers, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(step_dir):
        dirnames.sort()
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), step_dir)
            if rel not in (MANIFEST, *UNHASHED) and fileio.TMP_MARK not in name:
                out.append(rel)
    return sorted(out)


def write_manifest(step_dir: str, step: int) -> None:
    """``step_dir/checksums.json``: the step, and the size and sha256 of every file of the checkpoint."""
    files = {}
    for rel in _hashed_files(step_dir):
        full = os.path.join(step_dir, rel)
        files[rel] = {"bytes": os.path.getsize(full), "sha256": fileio.sha256_file(full)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    fileio.atomic_write_json(os.path.join(step_dir, MANIFEST), manifest)


def verify(step_dir: str) -> tuple[int | None, str | None]:
    """(the step the manifest names, None) when every file matches ``checksums.json``; (step or None, the first
    problem) otherwise: no or unreadable manifest, a missing file, another size, other contents."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        if not os.path.isdir(step_dir):
            return None, "the directory is missing"
        return None, f"it has no {MANIFEST} (unverifiable: written by an older version, or the file was removed)"
    try:
        with open(path) as f:
            manifest = json.load(f)
        step, files = int(manifest["step"]), dict(manifest["files"])
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError("unknown format")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"its {MANIFEST} is unreadable ({e})"
    for rel, expected in sorted(files.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return step, f"{rel} is missing"
        size = os.path.getsize(full)
        if size != expected["bytes"]:
            return step, f"{rel} has {size} bytes, {expected['bytes']} were written"
        if fileio.sha256_file(full) != expected["sha256"]:
            return step, f"{rel} differs from what was written (sha256 mismatch)"
    metadata = os.path.join(step_dir, "_CHECKPOINT_METADATA")
    try:
        with open(metadata) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return step, f"_CHECKPOINT_METADATA is unreadable ({e.__class__.__name__})"
    return step, None
