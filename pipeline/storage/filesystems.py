"""One way to open every storage location of the study (``ray.storage_path``, ``ray.data_path``): a local
folder or mount, or a ``pyarrow.fs`` URI (``s3://bucket/prefix``, ``gs://...``).

For S3 the endpoint and credentials come from where every AWS tool looks, never from params:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or a profile, or the node's instance role),
``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for a store that is not AWS
(MinIO, Ceph, R2, a test endpoint). A URI with its own query (``?endpoint_override=...``) is used as
written.

An S3 request that fails for a network reason is retried for about 100 s (:data:`RETRY_ATTEMPTS`):
a store that is away for seconds (a restart, a failover) costs a checkpoint a delay, not the run.
:func:`check_reachable` is the opposite, for a stage's start: one line within seconds when the
location cannot be reached at all.
"""
from __future__ import annotations

import os
from typing import Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs

from ctxseg.errors import UserError

# AWS SDK's standard strategy, exponential back-off: 12 attempts ride out a ~1-minute outage and give
# up after ~100 s (measured against the test endpoint taken down: a write 10 s into a 10 s outage
# finished after 13 s; with the SDK's default 3 attempts it failed after 6 s).
RETRY_ATTEMPTS = 12
PROBE_ATTEMPTS = 2


class StorageUnreachableError(UserError):
    """A storage location of the params cannot be reached or does not exist."""


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with ``attempts`` tries per request, *also after pickling*: Ray ships
    the filesystem of ``RunConfig`` to its controller and workers, and pyarrow's own pickle drops the
    retry strategy (the copy then gives up after ~2 s; checked with pyarrow 25)."""

    def __init__(self, attempts: int = RETRY_ATTEMPTS, **options):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **options)
        self.attempts, self.options = attempts, options

    def __reduce__(self):
        return _rebuild_s3, (self.attempts, self.options)


def _rebuild_s3(attempts: int, options: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(attempts, **options)


def is_uri(location: str) -> bool:
    return "://" in location


def s3_endpoint() -> Optional[str]:
    """The S3 endpoint URL of the environment (AWS's own variables), or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(location: str, attempts: int = RETRY_ATTEMPTS):
    """``(pyarrow filesystem, path on it)`` of a folder or URI; S3 with ``attempts`` retries and the
    environment's endpoint."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), location
    fs, path = pafs.FileSystem.from_uri(location)
    if isinstance(fs, pafs.S3FileSystem) and "?" not in location:
        options = {"region": fs.region}
        endpoint = s3_endpoint()
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
        fs = RetryingS3FileSystem(attempts, **options)
    return fs, path


def ray_storage(location: str) -> tuple[str, Optional[object]]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig`` / ``Tuner.restore``: a URI goes
    with its retrying filesystem (Ray then wants the path without the scheme)."""
    if not is_uri(location):
        return location, None
    fs, path = filesystem(location)
    return path, fs


def check_reachable(location: str, key: str) -> None:
    """Raise :class:`StorageUnreachableError` within seconds if ``location`` (params key ``key``) is a
    URI whose store does not answer, refuses the credentials, or whose bucket does not exist."""
    if not is_uri(location):
        return
    where = f"{key} = {location}" + (f" (endpoint {s3_endpoint()})" if location.startswith("s3://") and s3_endpoint() else "")
    try:
        fs, path = filesystem(location, attempts=PROBE_ATTEMPTS)
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageUnreachableError(f"{where}: the bucket {bucket!r} does not exist; create it or fix {key}")
        fs.get_file_info(path)
    except StorageUnreachableError:
        raise
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:200]
        raise StorageUnreachableError(
            f"{where} cannot be reached: {reason}; check that the store answers, the endpoint "
            f"(AWS_ENDPOINT_URL) and the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile)") from None


def check_ray_storage(ray_settings) -> None:
    """:func:`check_reachable` for both storage locations of the ``ray`` params (a stage's first step)."""
    for key, location in (("ray.storage_path", ray_settings.storage_path), ("ray.data_path", ray_settings.data_path)):
        if location:
            check_reachable(location, key)
