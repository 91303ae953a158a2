"""``cxrfair weights fetch MODEL``: download a model's released weights to where its loader looks.

Every file goes to ``~/.cache/cxrfair/<model>/`` (``--to DIR`` elsewhere; then hand DIR over with
``--weights DIR`` or the model's ``CXRFAIR_*_WEIGHTS`` variable), the first place each loader in
``extract/models`` searches. Where each file comes from is read from those modules' own
constants (their URLs and hub repos), so the loader's error message, ``cxrfair models list`` and
this command name the same source.

Three kinds of source:

- a direct URL (MedCLIP, CXR-CLIP, Bio_ClinicalBERT's vocab.txt): plain HTTP, resumable (the
  bytes so far are kept in ``FILE.part`` and a rerun asks for the rest with a ``Range`` header),
  checked against a SHA-256 where one is listed here and against the MD5 a server publishes in
  ``x-goog-hash`` (Google Cloud Storage does), renamed into place only once complete and checked;
- a Hugging Face hub repo: ``huggingface_hub.hf_hub_download`` (resumable, its own progress bar;
  gated repos need ``huggingface-cli login``);
- a page only a browser can download from (GLoRIA's Box link, CheXzero's Google Drive folder):
  printed, with where to put the file, never attempted.

Offline (``HF_HUB_OFFLINE=1``, or the host cannot be reached) nothing is attempted or left
half-done silently: the command prints every file's source and destination.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cxrfair.errors import CxrfairError
from cxrfair.extract.models import biovil, chexzero, cxrclip, gloria, medclip, medsiglip, openclip, raddino, xrayclip
from cxrfair.extract.models.common import BERT_VOCAB_URL, HUB_URL, cache_dir
from cxrfair.extract.registry import get_spec


@dataclass(frozen=True)
class WeightFile:
    """One file a model's loader needs, and where it comes from."""

    name: str  # the file's name in the model's folder (DIR/<subdir>/<name>)
    url: str = ""  # a direct URL; with manual, the page to download it from by hand
    repo: str = ""  # else the Hugging Face hub repo holding ``name`` (or one of ``alternatives``)
    alternatives: tuple[str, ...] = ()  # hub: names tried in order when ``name`` is not in the repo
    subdir: str = ""  # folder below DIR (BiomedCLIP's text tower: "text")
    manual: bool = False  # only a browser can download it: printed, never attempted
    sha256: str = ""  # the expected SHA-256 (hex), where the source publishes one
    note: str = ""  # what to pick on a manual page

    @property
    def source(self) -> str:
        """Where it comes from, as one clickable address."""
        return self.url or HUB_URL.format(repo=self.repo, file=self.name)


_VOCAB = WeightFile("vocab.txt", url=BERT_VOCAB_URL)  # Bio_ClinicalBERT's, looked for beside the weights


def _hub(repo: str, *names: str, subdir: str = "") -> tuple[WeightFile, ...]:
    return tuple(WeightFile(n, repo=repo, subdir=subdir) for n in names)


def _url(url: str) -> WeightFile:
    return WeightFile(url.rsplit("/", 1)[-1], url=url)


SOURCES: dict[str, tuple[WeightFile, ...]] = {
    "clip-vit-b16": _hub(openclip.CLIP_HUB_ID, openclip.CLIP_FILES[0]),
    "biomedclip": (_hub(openclip.BIOMEDCLIP_HUB_ID, openclip.BIOMEDCLIP_FILE)
                   + _hub(openclip.BIOMEDBERT_HUB_ID, *openclip.BIOMEDBERT_FILES, "tokenizer_config.json", subdir="text")),
    "medclip-vit": (_url(medclip.MEDCLIP_URLS["swin"]), _VOCAB),
    "medclip-rn50": (_url(medclip.MEDCLIP_URLS["resnet"]), _VOCAB),
    "gloria-rn50": (WeightFile(gloria.WEIGHTS_NAME, url=gloria.GLORIA_URL, manual=True,
                               note="the GLoRIA README's pretrained CheXpert ResNet-50 checkpoint"), _VOCAB),
    "chexzero": (WeightFile(chexzero.WEIGHTS_NAME, url=chexzero.CHEXZERO_URL, manual=True,
                            note="any one .pt file of the CheXzero README's checkpoint folder"),),
    "biovil": tuple(WeightFile(n, repo=biovil.VARIANTS["biovil"].hub_id, alternatives=a) for n, a in (
        (biovil.VARIANTS["biovil"].image_file, ()), ("config.json", ()), ("vocab.txt", ()),
        (biovil.TEXT_FILES[0], biovil.TEXT_FILES[1:]))),
    "biovil-t": tuple(WeightFile(n, repo=biovil.VARIANTS["biovil-t"].hub_id, alternatives=a) for n, a in (
        (biovil.VARIANTS["biovil-t"].image_file, ()), ("config.json", ()), ("vocab.txt", ()),
        (biovil.TEXT_FILES[0], biovil.TEXT_FILES[1:]))),
    "cxr-clip-r50": (_url(cxrclip.URLS["resnet"]), _VOCAB),
    "cxr-clip-swint": (_url(cxrclip.URLS["swin"]), _VOCAB),
    "medsiglip": _hub(medsiglip.HUB_ID, *medsiglip.FILES, *medsiglip.OPTIONAL),
    "rad-dino": _hub(raddino.HUB_ID, *raddino.FILES),
    "xrayclip": (WeightFile(xrayclip.CONFIG_NAME, repo=xrayclip.HUB_ID),
                 WeightFile(xrayclip.WEIGHT_NAMES[0], repo=xrayclip.HUB_ID, alternatives=xrayclip.WEIGHT_NAMES[1:])),
}


@dataclass(frozen=True)
class Planned:
    """A file of the plan: what, from where, to where."""

    file: WeightFile
    dest: Path

    @property
    def part(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part")

    @property
    def found(self) -> Path | None:
        """The file (or one of its alternative names) if already in place, else None."""
        return next((self.dest.parent / n for n in (self.file.name, *self.file.alternatives)
                     if (self.dest.parent / n).is_file()), None)


def plan(model: str, to: Path | None = None) -> list[Planned]:
    """The files ``model`` needs and where each goes (``to`` or ``~/.cache/cxrfair/<model>``).

    Raises:
        CxrfairError: an unknown model, a tiny one (random weights) or one with no listed source.
    """
    spec = get_spec(model)
    if spec.tiny:
        raise CxrfairError(f"model {model}: a tiny test model with random weights; nothing to fetch")
    if model not in SOURCES:
        raise CxrfairError(f"model {model}: no download source is listed (weights: {spec.weights_source}); "
                           f"fetchable: {', '.join(SOURCES)}")
    folder = Path(to).expanduser() if to is not None else cache_dir(model)
    return [Planned(f, folder / f.subdir / f.name) for f in SOURCES[model]]


def instructions(model: str, to: Path | None = None, only: list[Planned] | None = None) -> str:
    """What to download by hand and where to put it: a few lines per file, then how to hand it over."""
    spec = get_spec(model)
    files = only if only is not None else plan(model, to)
    lines = [f"model {model}: download by hand and place each file as shown:"]
    for p in files:
        what = f" ({p.file.note})" if p.file.note else ""
        alt = f" (or {', '.join(p.file.alternatives)} if the repo has no {p.file.name})" if p.file.alternatives else ""
        lines += [f"  {p.file.source}{what}{alt}", f"    -> {p.dest}"]
    root = Path(to).expanduser() if to is not None else cache_dir(model)
    # Hub models' loaders take the folder; the others the weights file (vocab.txt is found beside it).
    first = SOURCES[model][0]
    given = root if first.repo else root / first.subdir / first.name
    env = f" or set {spec.weights_env}={given}" if spec.weights_env else ""
    if root == cache_dir(model):
        what = "their folder" if first.repo else f"the {first.name} file (vocab.txt beside it)"
        lines.append(f"cxrfair looks there first; kept elsewhere, pass --weights PATH"
                     f"{env.replace(str(given), 'PATH')}, PATH being {what}")
    else:
        lines.append(f"then pass --weights {given}{env}")
    if any(p.file.repo for p in files):
        lines.append("hub files can also be fetched with `huggingface-cli download REPO FILE --local-dir DIR`")
    return "\n".join(lines)


def offline() -> bool:
    """Whether the environment says not to use the network (Hugging Face's own switch)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class Unreachable(CxrfairError):
    """The source could not be reached; the message is the whole by-hand instructions."""


Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)


def fetch(model: str, to: Path | None = None, progress: Progress | None = None,
          say: Callable[[str], None] = print) -> list[Path]:
    """Download every file of ``model`` not yet in place; returns the files' paths.

    Files already at their destination are left alone. Manual files are printed (``say``) and
    make the call end with an Unreachable error after the others are fetched.

    Raises:
        Unreachable: offline, a host that cannot be reached, or files only a browser can get; the
            message says what to download and where to put it.
        CxrfairError: a checksum mismatch (the download is deleted) or an incomplete transfer
            (the ``.part`` file is kept for the rerun).
    """
    files = plan(model, to)
    todo = [p for p in files if p.found is None]
    for p in files:
        if p.found is not None:
            say(f"{p.found}: already there")
    if not todo:
        return [p.found for p in files]
    if offline():
        raise Unreachable(f"offline (HF_HUB_OFFLINE is set); nothing downloaded.\n{instructions(model, to, todo)}")
    manual = [p for p in todo if p.file.manual]
    for p in todo:
        if p.file.manual:
            continue
        try:
            if p.file.repo:
                _hub_download(p)
            else:
                download_url(p.file.url, p.dest, sha256=p.file.sha256, progress=progress)
        except Unreachable as e:
            raise Unreachable(f"{e}\n{instructions(model, to, [q for q in todo if q.found is None])}") from None
        say(f"{p.dest}: fetched")
    if manual:
        raise Unreachable(instructions(model, to, manual))
    return [p.found or p.dest for p in files]


def _hub_download(p: Planned) -> None:
    """``p``'s file (or its first alternative the repo has) from the hub into ``p.dest``'s folder."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise CxrfairError(f"huggingface_hub is not installed ({e}); pip install huggingface_hub") from None
    for name in (p.file.name, *p.file.alternatives):
        try:
            hf_hub_download(p.file.repo, name, local_dir=p.dest.parent)  # an alternative keeps its own name
            return
        except EntryNotFoundError:
            continue
        except GatedRepoError:  # (a RepositoryNotFoundError: test it first)
            raise CxrfairError(f"hub repo {p.file.repo} is gated: accept its terms on huggingface.co, run "
                               "`huggingface-cli login`, and rerun") from None
        except RepositoryNotFoundError:
            raise CxrfairError(f"hub repo {p.file.repo}: not found (renamed or private?); download "
                               f"{p.file.name} by hand as `cxrfair weights fetch` prints offline") from None
        except OSError as e:  # requests' connection errors are OSErrors
            raise Unreachable(f"could not reach the Hugging Face hub for {p.file.repo}/{name} ({e})") from None
    raise CxrfairError(f"hub repo {p.file.repo} has none of {', '.join((p.file.name, *p.file.alternatives))}")


def download_url(url: str, dest: Path, sha256: str = "", progress: Progress | None = None, timeout: float = 60.0,
                 chunk: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` if an earlier try left one.

    The server's answer to ``Range: bytes=N-`` decides: 206 appends, 200 starts over. The file
    becomes ``dest`` only when it has every byte (Content-Length / Content-Range) and matches
    ``sha256`` (if given) and the MD5 of a ``x-goog-hash`` header (if sent); a mismatch deletes it.

    Raises:
        Unreachable: the host cannot be reached (the ``.part`` is kept).
        CxrfairError: the transfer stopped early (``.part`` kept: rerun resumes) or a checksum mismatch.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part is whole (checked below)
            return _finish(part, dest, sha256, None, url)
        raise CxrfairError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise Unreachable(f"could not reach {urllib.parse.urlsplit(url).netloc} ({reason}); "
                          + (f"{have} bytes kept in {part}, rerun to resume" if have else "nothing downloaded")) from None
    with response:
        if response.status == 206:
            total = _content_range_total(response.headers.get("Content-Range"))
        else:  # 200: the whole file (a server that ignores Range starts over)
            have = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        md5 = _goog_md5(response.headers.get("x-goog-hash"))
        with open(part, "ab" if have else "wb") as out:
            try:
                while True:
                    block = response.read(chunk)
                    if not block:
                        break
                    out.write(block)
                    have += len(block)
                    if progress:
                        progress(have, total)
            except (OSError, http.client.HTTPException) as e:  # a dropped connection, a short read
                raise CxrfairError(f"{url}: the transfer stopped at {have} bytes ({e}); kept in {part}, rerun to "
                                   "resume") from None
    if total is not None and have != total:
        raise CxrfairError(f"{url}: the transfer stopped at {have} of {total} bytes; kept in {part}, rerun to resume")
    return _finish(part, dest, sha256, md5, url)


def _finish(part: Path, dest: Path, sha256: str, md5: str | None, url: str) -> Path:
    """Check the whole ``part`` against the checksums and rename it to ``dest``; delete it on a mismatch."""
    digests = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    with open(part, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            for h in digests.values():
                h.update(block)
    for kind, want in (("sha256", sha256.lower()), ("md5", md5)):
        got = digests[kind].hexdigest()
        if want and got != want:
            part.unlink()
            raise CxrfairError(f"{url}: {kind} {got} does not match the published {want}; the download was deleted. "
                               "Rerun; if it happens again the source has changed: download by hand and check it")
    os.replace(part, dest)
    return dest


def _content_range_total(value: str | None) -> int | None:
    """The total of ``bytes 100-199/1000`` (None for ``*`` or no header)."""
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _goog_md5(value: str | None) -> str | None:
    """The hex MD5 in a ``x-goog-hash: crc32c=...,md5=<base64>`` header, or None."""
    for item in (value or "").split(","):
        key, _, b64 = item.strip().partition("=")
        if key == "md5" and b64:
            try:
                return base64.b64decode(b64 + "=" * (-len(b64) % 4)).hex()
            except ValueError:
                return None
    return None


__all__ = ["Planned", "SOURCES", "Unreachable", "WeightFile", "download_url", "fetch", "instructions", "offline", "plan"]
