"""A real S3 API on loopback for tests: moto's server mode (as s3fs's own test-suite uses).

``S3Server`` starts moto's WSGI server in a daemon thread on ``127.0.0.1`` and an OS-chosen free
port, and stops it again. Every wait is bounded: a server that does not come up (or go down) in
``timeout`` seconds raises instead of hanging the test session.

Clients reach it through the standard AWS environment only (``AWS_ENDPOINT_URL`` and friends, see
``conftest.s3_env``): nothing in raytrainer is told about the test server.
"""
from __future__ import annotations

import socket
import time
import uuid

SECRET_ACCESS_KEY = "s3cr3t-DO-NOT-LEAK-1234"
ACCESS_KEY_ID = "testing-key-id"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, timeout: float = 30.0):
        self.timeout = timeout
        self._server = None
        self.port: int | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> "S3Server":
        """Serve on ``port`` (a restart after ``stop()``: clients keep their endpoint), or on a
        free port. Buckets and objects live in moto's in-process backend, not in the server, so
        they survive a stop and a start in the same process."""
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request in test logs

        last_error: Exception | None = None
        wanted = port
        for _ in range(3):  # the free port can be taken between probing and binding: retry
            port = wanted or free_port()
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            # ThreadedMotoServer.start() waits for readiness without a timeout (and forever if the
            # bind fails): start its thread ourselves and wait a bounded time.
            from threading import Thread
            server._thread = Thread(target=server._server_entry, daemon=True, name=f"moto-s3-{port}")
            server._thread.start()
            if server._server_ready_event.wait(self.timeout) and self._wait_listening(port):
                self._server, self.port = server, port
                return self
            last_error = RuntimeError(f"moto S3 server did not start on 127.0.0.1:{port} "
                                      f"within {self.timeout}s")
        raise last_error  # type: ignore[misc]

    def _wait_listening(self, port: int) -> bool:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        if server._server is not None:
            # shutdown() blocks until serve_forever notices (it polls every 0.5 s): bounded.
            t = _run_bounded(server._server.shutdown, self.timeout)
            server._server.server_close()
            if t.is_alive():
                raise RuntimeError("moto S3 server did not shut down in time")
        if server._thread is not None:
            server._thread.join(self.timeout)

    def create_bucket(self, name: str | None = None) -> str:
        """A fresh bucket (unique name unless given); returns its name."""
        name = name or f"bucket-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY,
                            config=Config(connect_timeout=10, read_timeout=30, retries={"max_attempts": 2}))

    def all_objects(self, bucket: str) -> dict[str, bytes]:
        """Every object in ``bucket``: key -> bytes."""
        client = self.client()
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        return out


def _run_bounded(fn, timeout: float):
    from threading import Thread

    t = Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout)
    return t
