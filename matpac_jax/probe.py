r"""Linear-probe evaluation of an encoder on a downstream dataset (SPEC §7), with 95 % confidence intervals.

    python -m matpac_jax.probe --checkpoint=models/pp --dataset=esc50 --root=/data/ESC-50 --output=results/pp
    python -m matpac_jax.probe --checkpoint=runs/pp --dataset=folder --root=my_set/ --seeds=5

Computes the clip embeddings of every file of the dataset (cached in ``<output>/<dataset>.embeddings.npz`` with the
checkpoint they came from, reused when they match), then runs ``evaluate.harness.evaluate_task``: standardisation with
training statistics, one linear layer, Adam, early stopping on validation, accuracy (single-label) or mAP
(multi-label), every fold for k-fold datasets, ``--seeds`` seeds. Prints a markdown table and writes
``<output>/<dataset>.json``. Datasets: see ``matpac_jax.evaluate.datasets`` (esc50, us8k, gtzan, nsynth, openmic,
fsd50k, mtt, folder). ``python -m matpac_jax.results results/*/`` collects such files into one table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def embed_task(encoder, task, progress: bool = True) -> np.ndarray:
    """Clip embeddings [N, D] of ``task.files`` (decoded like the training data; a file that fails is an error)."""
    from matpac_jax.audio.io import load_audio

    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(task.files), unit="file", file=sys.stderr, desc=f"embed {task.name}")
        except ImportError:
            pass
    rate = encoder.spec.frontend.sample_rate
    out = []
    for path in task.files:
        out.append(encoder.embed(load_audio(path, rate, min_samples=encoder.spec.frontend.win_length), rate)["clip"][0])
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return np.stack(out)


def cached_embeddings(encoder, task, checkpoint: str, cache: str | None) -> np.ndarray:
    """Embeddings from ``cache`` when it holds the same files from the same checkpoint, else computed and saved."""
    ident = os.path.abspath(checkpoint)
    if cache and os.path.exists(cache):
        with np.load(cache) as data:
            if str(data["checkpoint"]) == ident and list(data["files"]) == list(task.files):
                return data["clip"]
    x = embed_task(encoder, task)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        np.savez(cache, clip=x, files=np.array(task.files), checkpoint=np.array(ident))
    return x


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
    ap.add_argument("--checkpoint", required=True, help="encoder directory, training workdir or checkpoint")
    ap.add_argument("--dataset", required=True, help="esc50, us8k, gtzan, nsynth, openmic, fsd50k, mtt or folder")
    ap.add_argument("--root", required=True, help="the dataset's folder, in its official layout")
    ap.add_argument("--output", default="probe_results", help="folder for the JSON result and the embedding cache")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-steps", type=int, default=1000)
    args = ap.parse_args(argv)
    from matpac_jax.evaluate.datasets import load_task
    from matpac_jax.evaluate.harness import evaluate_task
    from matpac_jax.inference import load_encoder

    try:
        task = load_task(args.dataset, args.root)
        encoder = load_encoder(args.checkpoint)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    x = cached_embeddings(encoder, task, args.checkpoint, os.path.join(args.output, f"{task.name}.embeddings.npz"))
    t1 = time.time()
    result = evaluate_task(task, x, seeds=tuple(range(args.seeds)), lr=args.lr, max_steps=args.max_steps)
    result |= {
        "checkpoint": os.path.abspath(args.checkpoint),
        "embed_seconds": t1 - t0,
        "probe_seconds": time.time() - t1,
    }
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, f"{task.name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown([result], title=os.path.basename(os.path.abspath(args.checkpoint))))
    print(f"wrote {path} (probe {result['probe_seconds']:.1f} s, embeddings {result['embed_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
