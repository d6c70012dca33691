"""Tests for nanovlm/coco.py against a local HTTP server on 127.0.0.1 serving zips the tests make."""

import hashlib
import io
import json
import re
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from nanovlm import coco, data


class FileHandler(BaseHTTPRequestHandler):
    """GET with Range support; the server's attributes script failures (see `server` below)."""

    def do_GET(self):
        server = self.server
        server.ranges.append(self.headers["Range"])
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        match = re.fullmatch(r"bytes=(\d+)-", self.headers["Range"] or "")
        start = int(match[1]) if match and not server.ignore_range else 0
        if start >= len(body) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        rest = body[start:]
        if server.stall:
            time.sleep(server.stall)  # bounded: the client's timeout is shorter
        if server.cut_after:  # send only this many bytes, then close the connection (HTTP/1.0)
            rest = rest[: server.cut_after.pop(0)]
        try:
            self.wfile.write(rest)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A server on a free port; tests set .files {path: bytes}, .ignore_range, .cut_after, .stall."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FileHandler)
    httpd.daemon_threads = True
    httpd.files, httpd.ranges, httpd.cut_after, httpd.ignore_range, httpd.stall = {}, [], [], False, 0.0
    httpd.url = f"http://127.0.0.1:{httpd.server_port}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def payload(n: int = 300_000) -> bytes:
    return bytes((i * 7919 + i // 255) % 256 for i in range(n))


def test_download_whole_file_verified(server, tmp_path):
    body = payload()
    server.files["/a.zip"] = body
    dest = coco.download(
        f"{server.url}/a.zip", tmp_path / "a.zip", len(body), hashlib.sha256(body).hexdigest(), chunk_size=4096
    )
    assert dest.read_bytes() == body and not (tmp_path / "a.zip.part").exists()
    assert coco.download(f"{server.url}/a.zip", dest, len(body)) == dest  # present and right: no request
    assert server.ranges == [None]


def test_broken_connection_resumes_with_range_and_ends_identical(server, tmp_path, capsys):
    body = payload()
    server.files["/a.zip"] = body
    server.cut_after = [100_000]
    dest = coco.download(f"{server.url}/a.zip", tmp_path / "a.zip", len(body), chunk_size=4096)
    assert dest.read_bytes() == body
    assert server.ranges == [None, "bytes=100000-"]
    assert "resuming at byte 100000" in capsys.readouterr().err


def test_interrupted_call_keeps_the_part_and_the_next_call_resumes(server, tmp_path):
    body = payload()
    server.files["/a.zip"] = body
    server.cut_after = [123_456]
    with pytest.raises(ConnectionError, match="keeps 123456 bytes, re-run to resume"):
        coco.download(f"{server.url}/a.zip", tmp_path / "a.zip", len(body), retries=0)
    assert not (tmp_path / "a.zip").exists() and (tmp_path / "a.zip.part").stat().st_size == 123_456
    coco.download(f"{server.url}/a.zip", tmp_path / "a.zip", len(body), hashlib.sha256(body).hexdigest())
    assert (tmp_path / "a.zip").read_bytes() == body and server.ranges[-1] == "bytes=123456-"


def test_server_that_ignores_range_restarts_from_zero(server, tmp_path, capsys):
    body = payload()
    server.files["/a.zip"] = body
    server.ignore_range = True
    (tmp_path / "a.zip.part").write_bytes(b"x" * 5000)  # appending to this would corrupt the file
    coco.download(f"{server.url}/a.zip", tmp_path / "a.zip", len(body))
    assert (tmp_path / "a.zip").read_bytes() == body
    assert server.ranges == ["bytes=5000-"]
    assert "ignored the request to resume" in capsys.readouterr().err


def test_part_that_is_already_whole_is_just_renamed(server, tmp_path):
    body = payload(10_000)
    server.files["/a.zip"] = body
    (tmp_path / "a.zip.part").write_bytes(body)
    coco.download(f"{server.url}/a.zip", tmp_path / "a.zip")  # size unknown: the server's 416 tells
    assert (tmp_path / "a.zip").read_bytes() == body and server.ranges == ["bytes=10000-"]


def test_wrong_size_or_digest_raises_and_leaves_no_file(server, tmp_path):
    body = payload(10_000)
    server.files["/a.zip"] = body
    with pytest.raises(ValueError, match="is 10000 bytes on the server, expected 10001"):
        coco.download(f"{server.url}/a.zip", tmp_path / "a.zip", len(body) + 1)
    with pytest.raises(ValueError, match="has SHA-256 .*, expected 00+; deleted it"):
        coco.download(f"{server.url}/a.zip", tmp_path / "a.zip", len(body), "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_with_wrong_size_is_reported_not_replaced(tmp_path):
    (tmp_path / "a.zip").write_bytes(b"short")
    with pytest.raises(ValueError, match="has 5 bytes, expected 10; delete it"):
        coco.download("http://127.0.0.1:9/a.zip", tmp_path / "a.zip", 10)


def test_offline_gives_a_clear_message(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match=f"could not reach 127.0.0.1:{port}: .*download the zips by hand"):
        coco.download(f"http://127.0.0.1:{port}/val2017.zip", tmp_path / "val2017.zip", timeout=2)
    assert list(tmp_path.iterdir()) == []


def test_missing_file_and_stalled_server_are_errors(server, tmp_path):
    with pytest.raises(ConnectionError, match="HTTP 404"):
        coco.download(f"{server.url}/nope.zip", tmp_path / "nope.zip")
    server.files["/a.zip"] = payload(1000)
    server.stall = 0.5
    with pytest.raises(ConnectionError, match="timed out"):
        coco.download(f"{server.url}/a.zip", tmp_path / "a.zip", timeout=0.2, retries=0)


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return buffer.getvalue()


def jpeg(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buffer, "JPEG")
    return buffer.getvalue()


def coco_zips() -> dict[str, bytes]:
    """Miniature official archives: two val images and the captions of both splits."""
    names = ["000000000139.jpg", "000000000285.jpg"]
    images = [{"id": int(n[:-4]), "file_name": n, "width": 24, "height": 16} for n in names]
    annotations = [{"id": i, "image_id": im["id"], "caption": f"photo {i}"} for i, im in enumerate(images)]
    val = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    empty = {"info": {}, "licenses": [], "images": [], "annotations": []}
    return {
        "/zips/val2017.zip": zip_bytes({f"val2017/{n}": jpeg((i * 90, 40, 40)) for i, n in enumerate(names)}),
        "/annotations/annotations_trainval2017.zip": zip_bytes(
            {
                "annotations/captions_val2017.json": json.dumps(val).encode(),
                "annotations/captions_train2017.json": json.dumps(empty).encode(),
                "annotations/instances_val2017.json": b"{}",
            }
        ),
    }


def local_archives(server, zips: dict[str, bytes], with_digest: bool = True) -> dict[str, coco.Archive]:
    """The official part names and contents, served by the local server."""
    archives = {}
    for part, path in (("val2017", "/zips/val2017.zip"), ("annotations", "/annotations/annotations_trainval2017.zip")):
        if path not in zips:
            continue
        body = zips[path]
        digest = hashlib.sha256(body).hexdigest() if with_digest else None
        archives[part] = coco.Archive(server.url + path, len(body), digest, coco.ARCHIVES[part].contents)
    return archives


def test_fetch_unpacks_the_official_layout_that_data_reads(server, tmp_path):
    server.files = coco_zips()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "mine.json").write_text("{}")  # an existing folder is merged, not replaced
    root = coco.fetch(tmp_path, archives=local_archives(server, server.files))
    assert sorted(p.name for p in (root / "val2017").iterdir()) == ["000000000139.jpg", "000000000285.jpg"]
    assert (root / "annotations" / "mine.json").exists()
    assert not list(root.glob("*.zip")) and not list(root.glob(".*"))  # zips deleted, no temp folders
    images, captions = data.read_captions(root, "val2017")
    assert [im["id"] for im in images] == [139, 285] and captions[285] == ["photo 1"]
    requests = len(server.ranges)
    coco.fetch(tmp_path, archives=local_archives(server, server.files))
    assert len(server.ranges) == requests  # already unpacked: nothing downloaded


def test_damaged_zip_is_refused_and_nothing_unpacked(server, tmp_path):
    zips = coco_zips()
    body = bytearray(zips["/zips/val2017.zip"])
    body[200:260] = bytes(60)  # inside the first member's data: its CRC-32 no longer matches
    server.files = {"/zips/val2017.zip": bytes(body)}
    archives = local_archives(server, server.files, with_digest=False)
    with pytest.raises(ValueError, match=r"val2017\.zip is damaged .*delete it and re-run"):
        coco.fetch(tmp_path, parts=("val2017",), archives=archives)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val2017.zip"]


def test_unknown_part_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown COCO part\(s\) \['test2017'\]"):
        coco.fetch(tmp_path, parts=("test2017",))
