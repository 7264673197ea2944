"""`hclafter serve` end to end: the real server on 127.0.0.1, called through gradio_client and
opened in headless Chromium (Debian's ``chromium``; .ci/run installs it)."""
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib

import pytest

import hclafter

from .tiny_runs import train_tiny

gradio_client = pytest.importorskip("gradio_client", reason="needs hclafter[serve]")
pytest.importorskip("gradio", reason="needs hclafter[serve]")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_header(path, width, height):
    """A PNG that declares ``width`` × ``height`` pixels in a few bytes (an upload that would
    decode to gigabytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
                     chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    return train_tiny(tmp_path_factory.mktemp("serve") / "run", cache_dir)


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio"))}
    proc = subprocess.Popen([sys.executable, "-m", "hclafter", "serve", str(run_dir), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                assert response.status == 200
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail(f"hclafter serve did not start: {log.read()[-3000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def image(run_dir):
    return (run_dir / "splits" / "test.csv").read_text().splitlines()[1].split(",")[0]


def test_prediction_through_the_api_matches_the_run(server, run_dir, image):
    client = gradio_client.Client(server, verbose=False)
    top, wheel, stages, shown = client.predict(gradio_client.handle_file(image), api_name="/predict")
    run = hclafter.load_run(run_dir)
    expected = run.predict([image])
    assert top["label"] == expected.labels[0]
    dist = dict(zip(expected.classes, expected.distributions[0]))
    assert len(top["confidences"]) == 3
    for item in top["confidences"]:
        assert item["confidence"] == pytest.approx(dist[item["label"]], abs=1e-5)
    assert [c["label"] for c in top["confidences"]] == sorted(dist, key=dist.get, reverse=True)[:3]
    assert wheel["type"] == "matplotlib" and wheel["plot"].startswith("data:image/")
    rows = stages["data"]
    assert [r[0] for r in rows] == ["stage 1", "stage 2", "stage 3", "fused"]
    assert [r[1] for r in rows[:3]] == ["5, 6, 7", "8, 9", "10, 11, 12"]
    assert [r[2] for r in rows[:3]] == pytest.approx(run.model.fusion_weights(), abs=1e-4)
    assert rows[3][3] == expected.labels[0] and rows[3][4] == pytest.approx(max(dist.values()), abs=1e-4)
    assert os.path.isfile(shown)


def test_bad_uploads_get_a_message_and_the_server_keeps_serving(server, image, tmp_path):
    client = gradio_client.Client(server, verbose=False)
    fake = tmp_path / "notes.png"
    fake.write_text("not an image at all")
    cases = [(fake, "notes.png is not an image this demo can read"),
             (_png_header(tmp_path / "wide.png", 10_000, 6_000), r"10000×6000 = 60 megapixels; upload one under 50"),
             (_png_header(tmp_path / "bomb.png", 40_000, 40_000), "too large to decode safely"),
             (tmp_path / "notes.txt", "Invalid file type")]
    (tmp_path / "notes.txt").write_text("hello")
    for path, message in cases:
        with pytest.raises(gradio_client.exceptions.AppError, match=message):
            client.predict(gradio_client.handle_file(str(path)), api_name="/predict")
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (26 * 1024 * 1024))
    with pytest.raises(ValueError, match="exceeds the maximum file size of 26214400 bytes"):
        client.predict(gradio_client.handle_file(str(big)), api_name="/predict")
    top = client.predict(gradio_client.handle_file(image), api_name="/predict")[0]
    assert top["label"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_renders_upload_and_results_in_chromium(server, run_dir, image, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (hclafter[test])")
    run = hclafter.load_run(run_dir)
    expected = run.predict([image]).labels[0]
    expected_first = run.wheel.classes[0]  # the first example shows one image of the first class
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server)
        upload = page.locator("input[type=file]").first
        upload.wait_for(state="attached", timeout=30_000)
        # The labels render after the file input is attached: wait for them rather than poll once.
        page.get_by_text("Upload an image").first.wait_for(state="visible", timeout=30_000)
        page.get_by_text("Test-split examples").first.wait_for(state="visible", timeout=30_000)
        upload.set_input_files(image)
        page.get_by_text("fused", exact=True).first.wait_for(timeout=30_000)
        page.locator("img[src^='data:image']").first.wait_for(timeout=30_000)  # the wheel plot
        page.get_by_text("stage 3", exact=True).first.wait_for(state="visible", timeout=30_000)
        page.get_by_text(expected, exact=True).first.wait_for(state="visible", timeout=30_000)  # top emotion
        page.screenshot(path=str(os.environ.get("HCLAFTER_SCREENSHOT", tmp_path / "serve.png")), full_page=True)
        page.get_by_label("Clear").first.click()  # as a person would, before the next upload
        page.get_by_text("fused", exact=True).first.wait_for(state="detached", timeout=30_000)
        page.locator("input[type=file]").first.set_input_files(str(bad))
        page.get_by_text("broken.png is not an image this demo can read").first.wait_for(timeout=30_000)
        page.get_by_label("Clear").first.click()
        page.get_by_text(f"{expected_first} (", exact=False).first.click()  # a test-split example
        page.get_by_text("fused", exact=True).first.wait_for(timeout=30_000)
        browser.close()
