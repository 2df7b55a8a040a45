"""Writing the shards of ``data.prepare``: one shard per task (decode, encode, ``write_shard``, then its sidecar
``<shard>.json`` with its clip count, seconds, skipped files and a fingerprint of its clip list and settings), tasks run
in ``spawn`` worker processes at most ``workers`` at a time, a dying worker failing only its own shard.

A shard whose file is a readable ArrayRecord file with the record count of its matching sidecar is "already done"
(``load_sidecar``), so an interrupted job resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import traceback
from collections.abc import Iterable

from matpac_jax.audio.io import AudioError, load_audio
from matpac_jax.data.records import ClipRecord, check_shard, encode_record, write_shard
from matpac_jax.data.sources import Clip, PrepareError, _shown
from matpac_jax.fileio import atomic_write_json

KILL_SHARD_ENV = "MATPAC_JAX_PREPARE_KILL_SHARD"  # fault injection for tests: the worker of this shard SIGKILLs itself
_IN_WORKER = False  # True in a worker process of ``run_parallel`` (where KILL_SHARD_ENV applies)


def json_safe(obj):
    """``obj`` with every string made valid UTF-8 (``_shown``), for the sidecars and the manifest."""
    if isinstance(obj, str):
        return _shown(obj)
    if isinstance(obj, dict):
        return {json_safe(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def clip_fingerprint(clips: list[Clip], settings: dict) -> str:
    blob = json.dumps([settings, clips], sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return hashlib.sha256(blob).hexdigest()


def load_sidecar(path: str, fingerprint: str) -> dict | None:
    """The sidecar of a finished shard, or None if the shard must be (re)built: missing, unreadable (truncated, not
    an ArrayRecord file), or not holding the sidecar's record count, or a sidecar of other clips or settings."""
    if not os.path.isfile(path) or not os.path.isfile(path + ".json"):
        return None
    try:
        with open(path + ".json", encoding="utf-8") as f:
            side = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(side, dict) or side.get("fingerprint") != fingerprint:
        return None
    try:
        return side if check_shard(path) == side.get("clips") else None
    except (OSError, ValueError):
        return None


def build_shard(task: tuple[int, str, list[Clip], dict, str]) -> dict:
    """Decode, encode and write one shard and its sidecar; returns the sidecar.

    A clip that cannot be used, for whatever reason (``AudioError``, a bad record, ``MemoryError``...), is skipped
    and reported; PrepareError naming the shard when the shard itself cannot be written.
    """
    index, path, clips, settings, fingerprint = task
    sr, skipped, num_samples = settings["sample_rate"], [], 0
    min_samples = math.ceil(settings["min_seconds"] * sr - 1e-9)

    def records() -> Iterable[bytes]:
        nonlocal num_samples
        if _IN_WORKER and os.environ.get(KILL_SHARD_ENV) == str(index):  # the shard's temporary file now exists
            os.kill(os.getpid(), signal.SIGKILL)
        for clip in clips:
            shown = _shown(clip["path"])
            try:
                wave = load_audio(clip["path"], sr, min_samples=min_samples, max_seconds=settings["max_seconds"])
                record = encode_record(ClipRecord(clip["key"], wave, sr, clip["labels"], shown), settings["codec"])
            except (AudioError, ValueError) as e:
                skipped.append({"key": clip["key"], "path": shown, "reason": getattr(e, "reason", str(e))})
                continue
            except Exception as e:  # MemoryError, a library's own error type...: skip the file, not the run
                skipped.append({"key": clip["key"], "path": shown, "reason": f"{type(e).__name__}: {e}"})
                continue
            num_samples += wave.shape[0]
            del wave
            yield record

    try:
        count = write_shard(path, records(), settings["compression"])
        side = {"index": index, "shard": os.path.basename(path), "clips": count, "seconds": num_samples / sr}
        side.update(skipped=skipped, fingerprint=fingerprint)
        side = json_safe(side)
        atomic_write_json(path + ".json", side)
    except OSError as e:
        raise PrepareError(f"cannot write shard {_shown(path)}: {e}") from None
    return side


def _shard_process(task: tuple, conn: multiprocessing.connection.Connection) -> None:
    """Body of a worker process: build one shard and send ("ok", sidecar), ("error", message) or ("bug", traceback)."""
    global _IN_WORKER
    _IN_WORKER = True
    try:
        message = ("ok", build_shard(task))
    except PrepareError as e:
        message = ("error", str(e))
    except Exception:
        message = ("bug", traceback.format_exc())
    conn.send(message)
    conn.close()


def _death(exitcode: int | None) -> str:
    """How a worker process ended, in words."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = "; the out-of-memory killer? lower --workers or --max-seconds" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {exitcode} without a result"


def run_parallel(tasks: list[tuple], workers: int, done) -> list[str]:
    """Build ``tasks`` in ``spawn`` processes, at most ``workers`` at a time, calling ``done(sidecar)`` for each
    finished shard; returns one message per shard that failed (its worker died or could not write it). A dying
    worker never blocks the others: every shard is attempted. Workers still running on any exception are stopped.
    """
    ctx = multiprocessing.get_context("spawn")
    pending, running, failures = list(reversed(tasks)), {}, []
    try:
        while pending or running:
            while pending and len(running) < workers:
                task = pending.pop()
                receiver, sender = ctx.Pipe(duplex=False)
                process = ctx.Process(target=_shard_process, args=(task, sender), daemon=True)
                process.start()
                sender.close()  # the worker holds the only writer: its death is an EOF here
                running[receiver] = (process, task)
            for receiver in multiprocessing.connection.wait(list(running)):
                process, task = running.pop(receiver)
                try:
                    status, payload = receiver.recv()
                except (EOFError, OSError):
                    status, payload = "died", None
                receiver.close()
                process.join()
                shard = _shown(os.path.basename(task[1]))
                if status == "ok":
                    done(payload)
                elif status == "error":
                    failures.append(payload)
                elif status == "bug":
                    raise RuntimeError(f"building shard {shard} failed in its worker process:\n{payload}")
                else:
                    failures.append(f"{shard}: the worker process building it {_death(process.exitcode)}")
    finally:
        for process, _ in running.values():
            process.terminate()
        for process, _ in running.values():
            process.join()
    return failures
