"""A real S3-compatible server for the tests: moto's standalone server as its own process on a free
loopback port, with throwaway credentials, and a fresh bucket per test."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    # nothing from this machine's AWS configuration, and no instance-metadata look-ups
    "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(timeout: float = 30.0, env: dict[str, str] | None = None):
    """`python -m moto.server` on loopback; yields its endpoint URL. env: set for its process."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"moto's server exited with {proc.returncode}"
            try:
                httpx.get(url + "/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "moto's server did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                        region_name="us-east-1")


@pytest.fixture
def aws_credentials(monkeypatch):
    """The throwaway credentials in os.environ, for tests that need no server of the session's."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def s3_endpoint():
    """The endpoint URL of one moto server for the session; its credentials are in os.environ meanwhile."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CREDENTIALS.items():
            mp.setenv(key, value)
        with moto_server() as url:
            yield url


@pytest.fixture
def bucket(s3_endpoint) -> str:
    """A new, empty bucket."""
    name = f"adapters-{uuid.uuid4().hex[:12]}"
    client(s3_endpoint).create_bucket(Bucket=name)
    return name
