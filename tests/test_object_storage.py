"""Workdirs on object storage, against a local S3-compatible server (moto in server mode on 127.0.0.1): what works
with the installed orbax-checkpoint / tensorstore / etils, and the blockers launch/OBJECT_STORAGE.md names, pinned so
that the document is revisited when a dependency lifts one.

Works: orbax's CheckpointManager on ``s3://`` for JSON items with ``CommitFileTemporaryPath`` (the commit marker
that orbax uses for ``gs://``: no rename); tensorstore's ``s3`` kvstore (zarr over ocdbt, what orbax writes arrays
with) when the endpoint is in the spec; a conditional-put lease (``If-None-Match: *`` / ``If-Match``) in place of the
flock; a checkpoint and a model directory written locally, synced to the bucket and back, then resumed, verified
(checksums) and loaded. Blocked: orbax array saves to ``s3://`` (only ``gs://`` gets a tensorstore network driver),
orbax's default rename commit on ``s3://``, array_record / grain reading ``s3://`` shards.

Needs moto[server], boto3 and s3fs (etils.epath's s3 backend); skipped with the reason when one is missing."""

from __future__ import annotations

import logging
import os
import socket
import types

import numpy as np
import pytest

moto_server = pytest.importorskip("moto.server", reason="moto is not installed (pip install 'moto[server]')")
boto3 = pytest.importorskip("boto3", reason="boto3 is not installed")
pytest.importorskip("s3fs", reason="s3fs is not installed (etils.epath reads s3:// through fsspec's s3fs)")

import botocore.exceptions  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from helpers import load_config  # noqa: E402
from orbax.checkpoint._src.path import atomicity  # noqa: E402

BUCKET = "matpac-workdirs"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint():
    """moto's S3 server on 127.0.0.1 with one bucket; the AWS variables point botocore, s3fs and etils.epath at it
    (tensorstore ignores AWS_ENDPOINT_URL: its specs name the endpoint)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access-log line per request
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": url,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client().create_bucket(Bucket=BUCKET)
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def client():
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=REGION)


def keys(prefix: str) -> list[str]:
    pages = client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))


# --- Sync of a local directory (the staging design of OBJECT_STORAGE.md): markers last up, so a reader of the
# --- bucket never sees a commit marker before the files it commits.

MARKERS = ("checksums.json", "_CHECKPOINT_METADATA", "commit_success.txt")


def upload_tree(local: str, prefix: str) -> None:
    files = [os.path.relpath(os.path.join(d, n), local) for d, _, names in os.walk(local) for n in names]
    last = lambda rel: (os.path.dirname(rel) == "", MARKERS.index(rel) if rel in MARKERS else -1)  # noqa: E731
    for rel in sorted(files, key=last):
        client().upload_file(os.path.join(local, rel), BUCKET, f"{prefix}/{rel}")


def download_tree(prefix: str, local: str) -> None:
    for key in keys(prefix + "/"):
        target = os.path.join(local, os.path.relpath(key, prefix))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        client().download_file(BUCKET, key, target)


# --- orbax on s3:// directly.


def json_manager(directory: str, temporary_path_class=None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, temporary_path_class=temporary_path_class)
    return ocp.CheckpointManager(directory, options=options, item_handlers={"config": ocp.JsonCheckpointHandler()})


def test_orbax_commits_json_items_on_s3_with_the_commit_file(endpoint):
    """No rename: each step is written in place and committed by ``commit_success.txt``; max_to_keep deletes; a new
    manager (a resumed run) lists the committed steps and restores the latest; a step without its marker is not
    listed."""
    directory = f"s3://{BUCKET}/json-commit-file"
    manager = json_manager(directory, atomicity.CommitFileTemporaryPath)
    for step in (1, 2, 3):
        manager.save(step, args=ocp.args.Composite(config=ocp.args.JsonSave({"step": step})))
        manager.wait_until_finished()
    manager.close()
    assert f"json-commit-file/3/{atomicity.COMMIT_SUCCESS_FILE}" in keys("json-commit-file/")
    client().put_object(Bucket=BUCKET, Key="json-commit-file/4/config/metadata", Body=b'{"step": 4}')  # a torn save
    resumed = json_manager(directory, atomicity.CommitFileTemporaryPath)
    assert resumed.all_steps() == [2, 3]
    assert resumed.latest_step() == 3
    assert resumed.restore(3, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config == {"step": 3}
    resumed.close()


def test_blocker_orbax_default_rename_commit_fails_on_s3(endpoint):
    """The default for a non-gs:// path is AtomicRenameTemporaryPath: s3fs renames the step's prefix key by key
    (CopyObject of a key that does not exist): the save fails, its temporary prefix stays, no step is listed."""
    directory = f"s3://{BUCKET}/json-rename"
    manager = json_manager(directory)
    with pytest.raises(FileNotFoundError):
        manager.save(1, args=ocp.args.Composite(config=ocp.args.JsonSave({"step": 1})))
        manager.wait_until_finished()
    assert manager.all_steps() == []
    assert any(".orbax-checkpoint-tmp" in k for k in keys("json-rename/"))
    manager.close()


def test_blocker_orbax_array_save_to_s3_is_refused(endpoint):
    """orbax builds tensorstore's kvstore for gs:// only (tensorstore_utils._use_gcs_driver); any other URL is taken
    as a local path for the 'file' driver and refused. When this stops raising, orbax writes arrays to s3://."""
    checkpointer = ocp.StandardCheckpointer()
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    with pytest.raises(ValueError, match="Checkpoint path should be absolute"):
        checkpointer.save(f"s3://{BUCKET}/arrays/1", tree)
        checkpointer.wait_until_finished()
    checkpointer.close()


def test_tensorstore_writes_arrays_to_s3_through_ocdbt(endpoint):
    """The layer orbax would need: zarr over ocdbt over tensorstore's s3 driver, endpoint in the spec."""
    import tensorstore as ts

    base = {"driver": "s3", "bucket": BUCKET, "path": "ocdbt/", "endpoint": endpoint, "aws_region": REGION}
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base, "path": "w/"}}
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    ts.open(spec, create=True, dtype=ts.float32, shape=value.shape).result().write(value).result()
    np.testing.assert_array_equal(ts.open(spec).result().read().result(), value)
    assert any(k.startswith("ocdbt/d/") for k in keys("ocdbt/"))  # ocdbt's data files, in the bucket


# --- The lock: a lease object written with a conditional put (S3 has no flock).


def acquire(key: str, holder: bytes) -> str:
    """The lease's ETag; PreconditionFailed when the key exists (another holder)."""
    return client().put_object(Bucket=BUCKET, Key=key, Body=holder, IfNoneMatch="*")["ETag"]


def precondition_failed(error: botocore.exceptions.ClientError) -> bool:
    return error.response["Error"]["Code"] == "PreconditionFailed"


def test_conditional_put_lease_replaces_the_flock(endpoint):
    key = "run/.lock.process-0"
    etag = acquire(key, b'{"pid": 1, "host": "a"}')
    with pytest.raises(botocore.exceptions.ClientError) as busy:
        acquire(key, b'{"pid": 2, "host": "b"}')
    assert precondition_failed(busy.value)
    assert b'"host": "a"' in client().get_object(Bucket=BUCKET, Key=key)["Body"].read()  # the holder, named

    # Renewal (a heartbeat) and takeover of a stale lease are If-Match puts: of two contenders holding the same
    # ETag, one wins.
    renewed = client().put_object(Bucket=BUCKET, Key=key, Body=b'{"pid": 1, "host": "a", "beat": 2}', IfMatch=etag)
    client().put_object(Bucket=BUCKET, Key=key, Body=b'{"pid": 3, "host": "c"}', IfMatch=renewed["ETag"])
    with pytest.raises(botocore.exceptions.ClientError) as lost:
        client().put_object(Bucket=BUCKET, Key=key, Body=b'{"pid": 4, "host": "d"}', IfMatch=renewed["ETag"])
    assert precondition_failed(lost.value)

    # Release deletes only one's own lease.
    with pytest.raises(botocore.exceptions.ClientError) as other:
        client().delete_object(Bucket=BUCKET, Key=key, IfMatch=etag)
    assert precondition_failed(other.value)
    holder = client().head_object(Bucket=BUCKET, Key=key)["ETag"]
    client().delete_object(Bucket=BUCKET, Key=key, IfMatch=holder)
    acquire(key, b'{"pid": 5, "host": "e"}')


# --- The package's own checkpoints, model directories and inputs through a local staging directory.


def test_checkpoint_synced_to_s3_resumes_and_verifies_from_a_fresh_host(endpoint, tmp_path):
    """Checkpointer writes locally (atomic rename, checksums.json before the commit); the step is uploaded markers
    last; another host downloads it into a fresh workdir, verifies it against its manifest and restores it. A file
    changed in the bucket is caught by the manifest and the checkpoint moved aside."""
    import jax
    import ml_collections

    from matpac_jax.checkpoint import Checkpointer, CheckpointError

    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    config = ml_collections.ConfigDict({"seed": 0})
    writer = Checkpointer(str(tmp_path / "host-a"), async_save=False)
    writer.save(5, state, config)
    writer.close()
    upload_tree(str(tmp_path / "host-a" / "checkpoints" / "5"), "sync/checkpoints/5")

    download_tree("sync/checkpoints/5", str(tmp_path / "host-b" / "checkpoints" / "5"))
    reader = Checkpointer(str(tmp_path / "host-b"))
    assert reader.resume_step() == 5
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    restored = reader.restore(abstract, 5)
    reader.close()
    jax.tree.map(np.testing.assert_array_equal, restored, state)

    member = next(k for k in keys("sync/checkpoints/5/state/") if "/d/" in k)  # an ocdbt data file
    data = bytearray(client().get_object(Bucket=BUCKET, Key=member)["Body"].read())
    data[len(data) // 2] ^= 1
    client().put_object(Bucket=BUCKET, Key=member, Body=bytes(data))
    download_tree("sync/checkpoints/5", str(tmp_path / "host-c" / "checkpoints" / "5"))
    corrupt = Checkpointer(str(tmp_path / "host-c"))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        corrupt.resume_step()
    corrupt.close()


def test_model_directory_synced_to_s3_loads_and_urls_are_refused(endpoint, tmp_path):
    """A saved student uploaded (weights first, model.json last: one PUT per file is atomic) and downloaded loads with
    its digest checked; load_model of the s3:// URL itself is refused (model directories are local paths)."""
    from matpac_jax.load import load_model
    from matpac_jax.models.student import Student, save_student

    config = load_config("ssondo.py", "smoke")
    spec = types.SimpleNamespace(student=config.student, audio=config.audio)
    variables = Student.initial_variables(spec, seed=3)
    state = types.SimpleNamespace(
        step=7, params={"backbone": variables["params"]}, batch_stats={"backbone": variables["batch_stats"]}
    )
    local = save_student(str(tmp_path / "student"), config, state)
    for name in ("weights.npz", "model.json"):
        client().upload_file(os.path.join(local, name), BUCKET, f"models/student/{name}")

    download_tree("models/student", str(tmp_path / "copy"))
    loaded = load_model(str(tmp_path / "copy"))
    assert loaded.weights_digest() == load_model(local).weights_digest()
    with pytest.raises(FileNotFoundError, match="neither a model directory"):
        load_model(f"s3://{BUCKET}/models/student")


def test_blocker_array_record_shards_are_read_from_local_paths_only(endpoint, tmp_path):
    """array_record opens files through its own C++ file layer: an s3:// shard is not opened (the reader reports
    not ok, grain's source raises), the same shard downloaded reads."""
    import grain
    from array_record.python import array_record_module

    local = str(tmp_path / "shard.array_record")
    writer = array_record_module.ArrayRecordWriter(local, "group_size:1")
    for i in range(4):
        writer.write(b"record-%d" % i)
    writer.close()
    client().upload_file(local, BUCKET, "shards/shard.array_record")
    url = f"s3://{BUCKET}/shards/shard.array_record"

    assert not array_record_module.ArrayRecordReader(url).ok()
    with pytest.raises(RuntimeError, match="open\\(\\) failed"):
        grain.sources.ArrayRecordDataSource([url])
    copy = str(tmp_path / "copy.array_record")
    client().download_file(BUCKET, "shards/shard.array_record", copy)
    assert grain.sources.ArrayRecordDataSource([copy])[3] == b"record-3"
