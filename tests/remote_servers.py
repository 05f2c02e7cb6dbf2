"""Remote storage for tests, served on 127.0.0.1 only: a range-capable HTTP server that logs every
request, and moto's S3 server (a real S3 wire protocol endpoint, read through s3fs).

The S3 endpoint is reachable only with the options :attr:`MotoS3.storage_options` carries
(endpoint_url and non-default credentials): :func:`isolate_aws_env` removes every other way
botocore could find credentials or an endpoint (environment, ~/.aws, instance metadata), so a read
that forgets ``storage_options`` fails instead of silently working.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    server: RangeHTTPServer

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        srv = self.server
        rel = unquote(self.path.split("?", 1)[0].lstrip("/"))
        srv.log.append((self.command, rel, self.headers.get("Range")))
        fails = srv.fail_next.get(rel, 0)
        if fails and not head:
            srv.fail_next[rel] = fails - 1
            self.send_error(503, "try again")
            return
        path = srv.root / rel
        if not path.is_file():
            self.send_error(404, "not found")
            return
        data = path.read_bytes()
        start, end = 0, len(data)
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, b = rng[6:].split("-")
            start = int(a) if a else 0
            end = min(len(data), int(b) + 1) if b else len(data)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if head:
            return
        body = data[start:end]
        step = srv.chunk
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for i in range(0, len(body), step):
                self.wfile.write(body[i : i + step])
                if srv.delay:
                    self.wfile.flush()
                    time.sleep(srv.delay)


class RangeHTTPServer(ThreadingHTTPServer):
    """Serves files under ``root`` with Range support, no directory listings (like most object
    stores' HTTP front ends); ``log`` records (method, path, Range); ``fail_next[path] = n`` answers
    the next n GETs with 503; ``delay``/``chunk`` slow the body down."""

    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.log: list = []
        self.fail_next: dict[str, int] = {}
        self.delay = 0.0
        self.chunk = 1 << 16

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def serve_http(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    srv = RangeHTTPServer(root)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


# --------------------------------------------------------------------------- S3 (moto)

AWS_ISOLATION = {
    "AWS_EC2_METADATA_DISABLED": "true",  # no probe of the instance-metadata address
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_DEFAULT_REGION": "us-east-1",
}


def isolate_aws_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's ``os.environ``, changed in place) without any AWS credential
    or endpoint, so only ``storage_options`` can reach the test endpoint."""
    env = os.environ if env is None else env
    for name in [k for k in env if k.startswith("AWS_")]:
        del env[name]
    env.update(AWS_ISOLATION)
    return env


class MotoS3:
    """moto's S3 server on 127.0.0.1 (a free port) with one bucket."""

    KEY, SECRET = "ptft-test-key", "ptft-test-secret"

    def __init__(self, bucket: str = "ptft-bucket"):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.bucket = bucket
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)

    def __enter__(self) -> MotoS3:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()

    @property
    def storage_options(self) -> dict:
        """What a reader needs: the endpoint and the credentials (s3fs options)."""
        return {"endpoint_url": self.endpoint, "key": self.KEY, "secret": self.SECRET}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.KEY,
                            aws_secret_access_key=self.SECRET, region_name="us-east-1")

    def upload(self, local: Path, prefix: str) -> str:
        """Every file under ``local`` to ``s3://bucket/prefix/...``; returns that URL."""
        client = self.client()
        for p in sorted(Path(local).rglob("*")):
            if p.is_file():
                client.put_object(Bucket=self.bucket, Key=f"{prefix}/{p.relative_to(local).as_posix()}",
                                  Body=p.read_bytes())
        return f"s3://{self.bucket}/{prefix}"

