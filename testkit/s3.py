"""A real S3 server for tests and benchmarks: moto's server mode (`moto[server]`) in its own process on
a free loopback port, and `FaultyProxy`, a loopback proxy in front of it that answers some requests
itself (503 SlowDown, 500, 403 AccessDenied) to show retries and refusals."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from producer.run import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "koala-test",
    "AWS_SECRET_ACCESS_KEY": "koala-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    """`python -m moto.server` on 127.0.0.1 (everything in memory), its log in `log`."""

    def __init__(self, log: Path, port: int | None = None):
        self.port = port or free_port()
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """What a client needs: the standard AWS variables (test credentials, this endpoint)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint or self.endpoint}

    def start(self) -> S3Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **CREDENTIALS},
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{self.endpoint}/moto-api/", timeout=1)
                return self
            except requests.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.log.read_text()[-2000:]
                    raise RuntimeError(f"moto server did not start:\n{log}") from None
                time.sleep(0.1)

    def reset(self) -> None:
        """Forget every bucket and object."""
        requests.post(f"{self.endpoint}/moto-api/reset", timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self, endpoint: str | None = None) -> Any:
        """A boto3 S3 client of this server (through `endpoint`: a proxy, say)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every committed object under a prefix (names relative to it) with its bytes."""
        s3 = self.client()
        out = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                out[item["Key"][len(prefix) :]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return out

    def incomplete_uploads(self, bucket: str, prefix: str = "") -> list[str]:
        """Keys of the multipart uploads begun and neither completed nor aborted."""
        uploads = self.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
        return [u["Key"] for u in uploads]


class FaultyProxy:
    """A loopback HTTP proxy to `target` that answers matching requests itself: `rules` is a list of
    (method or '*', status, S3 error code, how many times) consumed in order of arrival; `seen`
    counts the requests, `faults` the answers it made up."""

    def __init__(self, target: str):
        self.target = target.removeprefix("http://")
        self.rules: list[list[Any]] = []
        self.seen = 0
        self.faults = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._fault(self.command)
                if fault:
                    status, code = fault
                    xml = f"<Error><Code>{code}</Code><Message>{code} (test proxy)</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                conn = http.client.HTTPConnection(proxy.target, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, method: str, status: int, code: str, times: int) -> None:
        """Answer the next `times` requests of `method` ('*': any) with `status` and error `code`."""
        with self._lock:
            self.rules.append([method, status, code, times])

    def _fault(self, method: str) -> tuple[int, str] | None:
        with self._lock:
            self.seen += 1
            for rule in self.rules:
                if rule[3] > 0 and rule[0] in ("*", method):
                    rule[3] -= 1
                    self.faults += 1
                    return rule[1], rule[2]
        return None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
