"""The S3 client of the adapter store, and S3's failures as typed errors whose message says what to check.

boto3 rather than minio: boto3 reads the standard AWS variables itself, AWS_ENDPOINT_URL included (minio's
client takes the endpoint as an argument and does not read it), as well as credentials files, instance
roles and web identities on Kubernetes; botocore's Config bounds timeouts and retries; and it is the client
LoRAX's S3 adapter source uses. Nothing here imports torch: start-up checks the bucket before the model loads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from prefixserve.adapters.errors import StoreError
from prefixserve.adapters.locations import S3Location

log = logging.getLogger("prefixserve.adapters.store")
# botocore logs at INFO where it found credentials and the endpoint, for every client: noise in the server's
# log, and a start-up refusal must stay one line. Its warnings and errors still show.
logging.getLogger("botocore").setLevel(logging.WARNING)

# Bounded so that an unreachable or hung endpoint fails a request with a 503 in seconds, not minutes:
# 3 attempts (botocore's "standard" retries: throttling, 5xx and connection errors, with jittered backoff),
# each with these socket timeouts. AWS_MAX_ATTEMPTS and AWS_RETRY_MODE, when set, win.
CONNECT_TIMEOUT_SECONDS = 3.0
READ_TIMEOUT_SECONDS = 15.0
MAX_ATTEMPTS = 3
MAX_POOL_CONNECTIONS = 32  # requests run on several threads at once (HTTP workers, listing's header reads)

NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
NO_BUCKET_CODES = {"NoSuchBucket"}
DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
}
CREDENTIALS_HINT = (
    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the pod's role) and the bucket's policy"
)
ENDPOINT_HINT = "check AWS_ENDPOINT_URL (and AWS_REGION) and that the S3 service is up and reachable"


def make_client() -> Any:
    """An S3 client configured by the standard AWS variables: AWS_ENDPOINT_URL (an S3-compatible server;
    unset: AWS), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or any other source of boto3's credential
    chain), AWS_REGION (botocore itself reads only AWS_DEFAULT_REGION)."""
    import boto3
    from botocore.config import Config

    retries: dict[str, Any] = {}
    if "AWS_RETRY_MODE" not in os.environ:
        retries["mode"] = "standard"
    if "AWS_MAX_ATTEMPTS" not in os.environ:
        retries["total_max_attempts"] = MAX_ATTEMPTS
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        retries=retries,
        max_pool_connections=MAX_POOL_CONNECTIONS,
    )
    session = boto3.session.Session()  # its own session: boto3's default one is not thread-safe to create
    return session.client("s3", region_name=os.environ.get("AWS_REGION") or None, config=config)


def error_code(exc: ClientError) -> tuple[str, int]:
    """S3's error code (a HEAD's error has none: its HTTP status then) and the HTTP status."""
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return str(exc.response.get("Error", {}).get("Code") or status), status


def is_not_found(exc: ClientError) -> bool:
    code, status = error_code(exc)
    return code in NOT_FOUND_CODES or (status == 404 and code not in NO_BUCKET_CODES)


def store_problem(
    exc: Exception, bucket: str = "the adapter store's bucket", service: str = "the S3 service"
) -> str:
    """What is wrong with the store, and what to check, in words for a client or an operator. Never
    credentials; the endpoint and the bucket's name only where an operator reads them (start-up, the log)."""
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        if code in NO_BUCKET_CODES:
            return f"{bucket} does not exist: create it, or correct --adapter-dir"
        if code in DENIED_CODES or status == 403:
            return f"{service} denies access to {bucket} ({code}): {CREDENTIALS_HINT}"
        return f"{service} failed ({code}, HTTP {status}); retry later"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return f"no S3 credentials were found: {CREDENTIALS_HINT}"
    return f"{service} cannot be reached ({type(exc).__name__}): {ENDPOINT_HINT}"


@contextmanager
def s3_faults(adapter_id: str, action: str, where: str) -> Iterator[None]:
    """S3 failures as StoreError (503) with a message for the client; `where` (an s3:// URL) only in the log.
    Callers catch what they expect first (a missing key, a failed precondition)."""
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        log.error("adapter store: cannot %s %r at %s: %s", action, adapter_id, where, exc)
        raise StoreError(f"cannot {action} adapter '{adapter_id}': {store_problem(exc)}") from None


def check_bucket(client: Any, location: S3Location) -> None:
    """StoreError unless the bucket exists and these credentials may use it (one HEAD); the message names
    the setting, the bucket and the endpoint, for the one line that start-up prints."""
    endpoint = client.meta.endpoint_url
    bucket = f"the bucket {location.bucket!r}"
    try:
        client.head_bucket(Bucket=location.bucket)
    except (ClientError, BotoCoreError) as exc:
        if isinstance(exc, ClientError) and error_code(exc)[1] == 404:  # HEAD's 404 carries no code
            problem = (
                f"{bucket} does not exist at {endpoint}: create it (e.g. aws s3 mb s3://{location.bucket}), "
                "or correct --adapter-dir"
            )
        else:
            problem = store_problem(exc, bucket, service=f"the S3 endpoint {endpoint}")
        raise StoreError(f"--adapter-dir {location}: {problem}") from None
