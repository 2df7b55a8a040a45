r"""Linear-probe evaluation of any trained model (``load_model``: an encoder, a fine-tuned encoder, a distilled
student) on a downstream dataset (SPEC §7), with 95 % confidence intervals.

    python -m matpac_jax.probe --checkpoint=models/pp --dataset=esc50 --root=/data/ESC-50 --output=results/pp
    python -m matpac_jax.probe --checkpoint=runs/pp --dataset=folder --root=my_set/ --seeds=5
    python -m matpac_jax.probe --checkpoint=runs/ssondo/student --dataset=folder --root=my_set/

Computes the clip embeddings of every file of the dataset (cached in ``<output>/<dataset>.embeddings.npz``, reused only
when the weights' content, the settings and the files match: otherwise, or when the cache is unreadable, they are
recomputed with a one-line notice), then runs ``evaluate.harness.evaluate_task``: standardisation with
training statistics, one linear layer, Adam, early stopping on validation, accuracy (single-label) or mAP
(multi-label), every fold for k-fold datasets, ``--seeds`` seeds. Prints a markdown table and writes
``<output>/<dataset>.json``. Datasets: see ``matpac_jax.evaluate.datasets`` (esc50, us8k, gtzan, nsynth, openmic,
fsd50k, mtt, folder). ``python -m matpac_jax.results results/*/`` collects such files into one table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zipfile

import numpy as np
from tqdm import tqdm

from matpac_jax.audio.io import AudioError, load_audio
from matpac_jax.evaluate.datasets import load_task
from matpac_jax.evaluate.harness import evaluate_task
from matpac_jax.fileio import atomic_save_npz, atomic_write_text, sha256_bytes
from matpac_jax.load import load_model

EMBEDDING_VERSION = 2  # bumped when the clip embedding of a file changes: caches from before are recomputed


def embed_task(model, task, progress: bool = True, group: int = 64) -> np.ndarray:
    """Clip embeddings [N, D] of ``task.files`` by any loaded model (decoded like the training data; a file that
    fails is an error), ``group`` files at a time embedded together (``embed_clips``: for ViT encoders a few compiled
    programs whatever the lengths)."""
    bar = tqdm(total=len(task.files), unit="file", file=sys.stderr, desc=f"embed {task.name}") if progress else None
    rate, need = model.sample_rate, model.min_samples
    out = []
    for start in range(0, len(task.files), group):
        paths = task.files[start : start + group]
        waves = [load_audio(path, rate, min_samples=need) for path in paths]
        out += [r["clip"] for r in model.embed_clips(waves, rate)]
        if bar:
            bar.update(len(paths))
    if bar:
        bar.close()
    return np.stack(out)


def _file_state(path: str) -> list:
    """[path, size, mtime_ns] (None, None when it cannot be stat'ed): a rewritten file changes it."""
    try:
        st = os.stat(path)
    except OSError:
        return [path, None, None]
    return [path, st.st_size, st.st_mtime_ns]


def cache_key(model, task) -> dict[str, str]:
    """What the embeddings of ``task`` depend on, as digests: the model's weights (their content, not the path they
    came from), the settings (the model's shape and front-end, embedding version) and the files (paths, sizes,
    mtimes)."""
    settings = {"version": EMBEDDING_VERSION, "spec": model.describe()}
    return {
        "weights": model.weights_digest(),
        "settings": sha256_bytes(json.dumps(settings, sort_keys=True).encode()),
        "files": sha256_bytes(json.dumps([_file_state(p) for p in task.files]).encode()),
    }


def _read_cache(cache: str, key: dict[str, str], count: int, log) -> np.ndarray | None:
    """The cached embeddings when ``cache`` holds ``count`` finite rows under ``key``; otherwise None, after one line
    saying why (an unreadable or truncated file is treated as absent, never an error)."""
    if not os.path.exists(cache):
        return None
    try:
        with np.load(cache, allow_pickle=False) as data:
            stored = {k: str(data[f"key_{k}"]) for k in key if f"key_{k}" in data.files}
            clip = data["clip"] if "clip" in data.files else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        log(f"probe: embedding cache {cache} is unreadable ({type(e).__name__}: {e}): recomputing it")
        return None
    if not stored:
        log(f"probe: embedding cache {cache} has no content key (an older version wrote it): recomputing it")
        return None
    if differ := [k for k in key if stored.get(k) != key[k]]:
        log(f"probe: embedding cache {cache} was computed with other {' and '.join(differ)}: recomputing it")
        return None
    if clip is None or clip.ndim != 2 or len(clip) != count or not np.isfinite(clip).all():
        log(f"probe: embedding cache {cache} holds no valid [{count}, D] embeddings: recomputing it")
        return None
    return clip


def cached_embeddings(encoder, task, checkpoint: str, cache: str | None, log=None) -> np.ndarray:
    """Embeddings from ``cache`` when it was computed from the same weights, settings and files (``cache_key``),
    else computed and written (atomically) to it. ``checkpoint`` is recorded for information only."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    key = cache_key(encoder, task) if cache else {}
    if cache and (x := _read_cache(cache, key, len(task.files), log)) is not None:
        return x
    x = embed_task(encoder, task)
    if cache:
        origin, stored_key = np.array(os.path.abspath(checkpoint)), {f"key_{k}": np.array(v) for k, v in key.items()}
        atomic_save_npz(cache, clip=x, files=np.array(task.files), checkpoint=origin, **stored_key)
    return x


def check_args(args) -> None:
    """ValueError naming the flag for a value the probe cannot use."""
    if args.seeds < 1:
        raise ValueError(f"--seeds={args.seeds}: the number of probe runs per split must be at least 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr={args.lr}: the learning rate must be a finite number > 0")
    if args.max_steps < 1:
        raise ValueError(f"--max-steps={args.max_steps}: must be at least 1")


def markdown(results: list[dict], title: str = "") -> str:
    head = f"| {title or 'task'} | metric | clips | runs | score (mean ± 95 % CI) |\n|---|---|---|---|---|\n"
    rows = [
        f"| {r['task']} | {r['metric']} | {r['num_clips']} | {len(r['runs'])} | "
        f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} |"
        for r in results
    ]
    return head + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m matpac_jax.probe", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="model directory, training workdir or checkpoint")
    ap.add_argument("--dataset", required=True, help="esc50, us8k, gtzan, nsynth, openmic, fsd50k, mtt or folder")
    ap.add_argument("--root", required=True, help="the dataset's folder, in its official layout")
    ap.add_argument("--output", default="probe_results", help="folder for the JSON result and the embedding cache")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-steps", type=int, default=1000)
    args = ap.parse_args(argv)

    try:
        check_args(args)
        task = load_task(args.dataset, args.root)
        encoder = load_model(args.checkpoint)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        x = cached_embeddings(encoder, task, args.checkpoint, os.path.join(args.output, f"{task.name}.embeddings.npz"))
        t1 = time.time()
        result = evaluate_task(task, x, seeds=tuple(range(args.seeds)), lr=args.lr, max_steps=args.max_steps)
    except (AudioError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result |= {
        "checkpoint": os.path.abspath(args.checkpoint),
        "embed_seconds": t1 - t0,
        "probe_seconds": time.time() - t1,
    }
    path = os.path.join(args.output, f"{task.name}.json")
    # atomically; a single run's interval is NaN, written as `matpac_jax.results` reads it
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    print(markdown([result], title=os.path.basename(os.path.abspath(args.checkpoint))))
    print(f"wrote {path} (probe {result['probe_seconds']:.1f} s, embeddings {result['embed_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
