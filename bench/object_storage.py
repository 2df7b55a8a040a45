r"""Reads/s of raw objects from an S3-compatible server, against the same bytes on local disk.

  python bench/object_storage.py                                  # moto's S3 server, started here on 127.0.0.1
  python bench/object_storage.py --endpoint=http://HOST:9000 --bucket=B   # another server (MinIO, S3 itself, ...)
  python bench/object_storage.py --sizes=65536,4194304 --objects=256,32 --threads=1,8,32

Writes ``--objects`` objects of each ``--size`` under ``bench-object-storage/`` of the bucket (and the same files in a
temporary directory), then reads each set ``--repeats`` times and prints reads/s and MiB/s for: boto3 ``get_object``
from a thread pool of each ``--threads`` size; tensorstore's ``s3`` kvstore (all reads issued at once, as orbax and
tensorstore issue them); local files (page cache warm: the ceiling). Needs boto3 (and moto[server] without
``--endpoint``; tensorstore is installed with orbax). Against moto the server is a Python process on the same cores:
the figures bound what this machine serves, not what a cloud store does (latency ~10-100 ms per GET there, throughput
per prefix in the thousands of GET/s).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REGION = "us-east-1"
PREFIX = "bench-object-storage"


def start_moto() -> str:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access-log line per request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    return f"http://127.0.0.1:{port}"


def timed(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def row(name: str, n: int, size: int, seconds: float) -> str:
    return f"{name:<28} {size:>10} {n:>6} {n / seconds:>10.1f} {n * size / seconds / 2**20:>10.1f}"


def measure(client, kv, bucket: str, local: str, names: list[str], size: int, threads: list[int], repeats: int):
    """Print one row per reader for the objects ``names`` (each ``size`` bytes)."""
    n = len(names)

    def get(name: str) -> int:
        return len(client.get_object(Bucket=bucket, Key=f"{PREFIX}/{name}")["Body"].read())

    for t in threads:
        with ThreadPoolExecutor(t) as pool:
            seconds = timed(lambda pool=pool: sum(pool.map(get, names)), repeats)
        print(row(f"boto3 get_object x{t} threads", n, size, seconds))

    def ts_all() -> int:
        return sum(len(f.result().value) for f in [kv.read(name) for name in names])

    print(row("tensorstore s3 kvstore", n, size, timed(ts_all, repeats)))

    def local_all() -> int:
        total = 0
        for name in names:
            with open(os.path.join(local, name), "rb") as f:
                total += len(f.read())
        return total

    print(row("local file (page cache)", n, size, timed(local_all, repeats)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default="", help="S3 endpoint URL; empty: start moto on 127.0.0.1")
    parser.add_argument("--bucket", default="matpac-bench")
    parser.add_argument("--sizes", default="65536,4194304", help="object sizes in bytes")
    parser.add_argument("--objects", default="256,32", help="objects of each size")
    parser.add_argument("--threads", default="1,8,32", help="boto3 thread-pool sizes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import boto3
    import tensorstore as ts

    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": REGION}.items():
        os.environ.setdefault(k, v)
    endpoint = args.endpoint or start_moto()
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    if not args.endpoint:
        client.create_bucket(Bucket=args.bucket)
    kv = ts.KvStore.open(  # the endpoint in the spec: tensorstore ignores AWS_ENDPOINT_URL
        {"driver": "s3", "bucket": args.bucket, "path": PREFIX + "/", "endpoint": endpoint, "aws_region": REGION}
    ).result()
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(s) for s in args.objects.split(",")]
    threads = [int(s) for s in args.threads.split(",")]
    rng = np.random.default_rng(0)
    print(f"endpoint {endpoint}{' (moto, started here)' if not args.endpoint else ''}, best of {args.repeats}")
    print(f"{'reader':<28} {'bytes':>10} {'objs':>6} {'reads/s':>10} {'MiB/s':>10}")
    with tempfile.TemporaryDirectory() as local:
        for size, n in zip(sizes, counts, strict=True):
            names = [f"{size}/{i:05d}" for i in range(n)]
            for name in names:
                data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
                client.put_object(Bucket=args.bucket, Key=f"{PREFIX}/{name}", Body=data)
                os.makedirs(os.path.join(local, str(size)), exist_ok=True)
                with open(os.path.join(local, name), "wb") as f:
                    f.write(data)

            measure(client, kv, args.bucket, local, names, size, threads, args.repeats)


if __name__ == "__main__":
    main()
