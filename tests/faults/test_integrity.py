"""Integrity (issue 14): a total deadline per LLM request, files that honour the umask, no torch
with CVE-2025-32434."""
import os
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from packaging.requirements import Requirement

from hclafter.checkpoint import atomic_write_text, save_checkpoint
from hclafter.describe import ChatClient, ChatError

from ..conftest import ROOT


# 10. describe: --timeout bounds the whole request


@pytest.fixture
def trickling_server():
    """Answers every request with a status line, then one header byte every 0.1 s for 6 s."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(60):
                try:
                    self.wfile.write(b"X")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_describe_timeout_is_a_total_deadline_per_request(trickling_server):
    client = ChatClient(trickling_server, "m", timeout=1.0, retries=0)
    start = time.monotonic()
    with pytest.raises(ChatError, match=r"no complete response within 1 s \(--timeout\)"):
        client.complete("describe awe")
    assert 0.9 <= time.monotonic() - start < 2.5


# 12. files honour the umask


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_honour_the_umask(umask, tmp_path):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.yaml", "seed: 0\n")
        save_checkpoint(tmp_path / "model.safetensors", {"w": torch.zeros(2)})
    finally:
        os.umask(previous)
    for name in ("config.yaml", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


# 13. torch without CVE-2025-32434


def test_dependencies_exclude_torch_before_2_6():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    assert "2.5.1" not in requirements["torch"] and "2.6.0" in requirements["torch"]
    assert "0.20.1" not in requirements["torchvision"] and "0.21.0" in requirements["torchvision"]
