"""
A real S3 HTTP endpoint for tests: moto's server on 127.0.0.1 (a free port), with an empty bucket "wmtp".

    from s3server import moto_s3, s3_server   # fixtures; s3_server yields the endpoint URL

The code under test reaches it over HTTP through MLFLOW_S3_ENDPOINT_URL, exactly as it reaches MinIO or AWS:
nothing is patched. moto_s3.stop() / .start() make a real outage on the same port (connections refused), and a
restart comes back empty, as a restarted moto_server process does.
"""
import logging
import urllib.request

import boto3
import pytest
from moto.server import ThreadedMotoServer

BUCKET = "wmtp"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class MotoS3:
    """moto's S3 server in this process. start() binds the same port again after stop()."""

    def __init__(self):
        self.port, self.url, self._server, self.running = 0, None, None, False

    def start(self):
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.running = True
        self.port = self._server.get_host_and_port()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # the in-process server keeps its state in moto's module globals, not in the server: reset it so every
        # start is an empty S3, like a fresh moto_server process
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST"), timeout=10)
        self.client().create_bucket(Bucket=BUCKET)
        return self

    def stop(self):
        self._server.stop()
        # ThreadedMotoServer.stop() leaves the listening socket open: clients would hang in the backlog instead of
        # being refused, and the port could not be bound again
        self._server._server.server_close()
        self.running = False

    def client(self):
        return boto3.session.Session().client(
            "s3", endpoint_url=self.url, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture
def moto_s3(monkeypatch):
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one INFO line per request otherwise
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    server = MotoS3().start()
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", server.url)
    yield server
    if server.running:
        server.stop()


@pytest.fixture
def s3_server(moto_s3):
    """The endpoint URL of a fresh moto S3 server with bucket "wmtp"; env points boto3 and mlflow at it."""
    yield moto_s3.url
