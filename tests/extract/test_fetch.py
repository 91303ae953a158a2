"""`cxrfair weights fetch`: resumable, checksummed downloads against a local HTTP server, and the
offline instructions. Nothing here touches the network: the server listens on 127.0.0.1 only,
for the test's duration."""

from __future__ import annotations

import base64
import hashlib
import http.server
import threading

import pytest
from click.testing import CliRunner

from cxrfair.cli import main
from cxrfair.errors import CxrfairError
from cxrfair.extract import fetch
from cxrfair.extract.models import medclip
from cxrfair.extract.registry import list_specs

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, not periodic at the chunk size used below
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """A file server for one payload that honours ``Range`` (or not), can cut a response short and
    can publish an MD5 in ``x-goog-hash`` (as Google Cloud Storage does). Records every request's Range."""

    def __init__(self) -> None:
        self.ranges: list[str | None] = []
        self.cut_at: int | None = None  # the next response stops after this many body bytes
        self.honour_range = True
        self.md5: bytes | None = None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if rng and server.honour_range else 0
                body = PAYLOAD[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                if server.md5 is not None:
                    self.send_header("x-goog-hash", f"crc32c=AAAAAA==,md5={base64.b64encode(server.md5).decode()}")
                self.end_headers()
                if server.cut_at is not None:
                    body, server.cut_at = body[: server.cut_at], None
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights.bin"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = Server()
    try:
        yield s
    finally:
        s.stop()


def test_an_interrupted_download_resumes_from_its_part_file(server, tmp_path):
    dest = tmp_path / "w" / "weights.bin"
    server.cut_at = 300_000
    with pytest.raises(CxrfairError, match="stopped at 300000 of 1048576 bytes.*rerun to resume"):
        fetch.download_url(server.url, dest, sha256=SHA, timeout=5, chunk=65536)
    part = dest.with_name("weights.bin.part")
    assert not dest.exists() and part.stat().st_size == 300_000
    seen = []
    assert fetch.download_url(server.url, dest, sha256=SHA, timeout=5, progress=lambda n, t: seen.append((n, t))) == dest
    assert server.ranges == [None, "bytes=300000-"]  # the second request asked only for the rest
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD)) and seen[0][0] > 300_000  # progress counts the resumed bytes


def test_a_server_that_ignores_range_restarts_the_file(server, tmp_path):
    dest = tmp_path / "weights.bin"
    dest.with_name("weights.bin.part").write_bytes(b"stale bytes from another file")
    server.honour_range = False
    fetch.download_url(server.url, dest, sha256=SHA, timeout=5)
    assert server.ranges == ["bytes=29-"] and dest.read_bytes() == PAYLOAD


def test_a_checksum_mismatch_is_refused_and_the_download_deleted(server, tmp_path):
    dest = tmp_path / "weights.bin"
    with pytest.raises(CxrfairError, match=f"sha256 {SHA} does not match the published {'0' * 64}"):
        fetch.download_url(server.url, dest, sha256="0" * 64, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_a_published_md5_is_checked(server, tmp_path):
    server.md5 = hashlib.md5(b"another file").digest()
    with pytest.raises(CxrfairError, match="md5 .* does not match the published"):
        fetch.download_url(server.url, tmp_path / "weights.bin", timeout=5)
    assert list(tmp_path.iterdir()) == []
    server.md5 = hashlib.md5(PAYLOAD).digest()
    assert fetch.download_url(server.url, tmp_path / "weights.bin", timeout=5).read_bytes() == PAYLOAD


def test_weights_fetch_command_downloads_then_leaves_the_files_alone(server, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(fetch.SOURCES, "medclip-vit", (fetch.WeightFile("medclip-vit-pretrained.zip", url=server.url,
                                                                        sha256=SHA),))
    result = CliRunner().invoke(main, ["weights", "fetch", "medclip-vit", "--to", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "medclip-vit-pretrained.zip").read_bytes() == PAYLOAD and "fetched" in result.output
    again = CliRunner().invoke(main, ["weights", "fetch", "medclip-vit", "--to", str(tmp_path)])
    assert again.exit_code == 0 and "already there" in again.output and len(server.ranges) == 1


def test_offline_it_prints_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["weights", "fetch", "medclip-vit", "--to", str(tmp_path / "w")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("offline") and lines[-1].startswith("Error: model medclip-vit")
    assert f"  {medclip.MEDCLIP_URLS['swin']}" in lines
    assert f"    -> {tmp_path / 'w' / 'medclip-vit-pretrained.zip'}" in lines
    assert f"    -> {tmp_path / 'w' / 'vocab.txt'}" in lines
    assert f"--weights {tmp_path / 'w' / 'medclip-vit-pretrained.zip'}" in result.output
    assert "CXRFAIR_MEDCLIP_VIT_WEIGHTS" in result.output
    assert not (tmp_path / "w").exists()  # nothing created


def test_an_unreachable_host_keeps_the_part_and_prints_the_instructions(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/medclip-vit-pretrained.zip"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(fetch.SOURCES, "medclip-vit", (fetch.WeightFile("medclip-vit-pretrained.zip", url=url),))
    result = CliRunner().invoke(main, ["weights", "fetch", "medclip-vit", "--to", str(tmp_path)])
    assert result.exit_code == 1 and "could not reach 127.0.0.1" in result.output
    assert f"  {url}" in result.output.splitlines() and "Error: " in result.output.splitlines()[-1]


def test_manual_sources_are_printed_never_attempted(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(fetch, "download_url", lambda *a, **k: pytest.fail("a manual file was downloaded"))
    result = CliRunner().invoke(main, ["weights", "fetch", "chexzero", "--to", str(tmp_path)])
    assert result.exit_code == 1 and "drive.google.com" in result.output and "any one .pt file" in result.output


def test_every_real_model_has_a_source_and_it_is_the_one_the_registry_names():
    for spec in list_specs():
        if spec.tiny:
            with pytest.raises(CxrfairError, match="random weights; nothing to fetch"):
                fetch.plan(spec.name)
            continue
        first = fetch.SOURCES[spec.name][0]
        assert (first.url or first.repo) in spec.weights_source, spec.name
        assert spec.weights_env, spec.name  # each real model can be pointed at by a variable
    with pytest.raises(CxrfairError, match="unknown model"):
        fetch.plan("no-such-model")


def test_hub_files_come_through_hf_hub_download_with_the_alternative_name(tmp_path, monkeypatch):
    """The hub path with hf_hub_download stood in for (no network): primary name first, then the alternative."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    calls = []

    def fake(repo, name, local_dir):
        calls.append((repo, name))
        if name == "model.safetensors":
            raise EntryNotFoundError(f"{name} not in {repo}")
        (local_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (local_dir / name).write_text(name)
        return str(local_dir / name)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    fetch.fetch("biovil", tmp_path, say=lambda text: None)
    repo = fetch.SOURCES["biovil"][0].repo
    assert calls[-2:] == [(repo, "model.safetensors"), (repo, "pytorch_model.bin")]
    assert {p.name for p in tmp_path.iterdir()} == {"biovil_image_resnet50_proj_size_128.pt", "config.json",
                                                    "vocab.txt", "pytorch_model.bin"}
    seen = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything in place: nothing to download, offline or not
    fetch.fetch("biovil", tmp_path, say=seen.append)
    assert len(seen) == 4 and all(s.endswith("already there") for s in seen) and str(tmp_path / "pytorch_model.bin") in seen[-1]
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def down(repo, name, local_dir):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", down)
    with pytest.raises(fetch.Unreachable, match="could not reach the Hugging Face hub") as info:
        fetch.fetch("rad-dino", tmp_path / "r", say=lambda text: None)
    assert str(tmp_path / "r" / "model.safetensors") in str(info.value)
