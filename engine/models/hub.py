"""Models from the Hugging Face Hub: find GGUF repositories, and pull one file resumably.

These are the only calls in Bastion that connect out, and only when the user runs them
(``bastion models search`` / ``models pull``, or the Models page). Each opens the network
guard for its own duration and only to the hub's hosts (``hub_hosts``); nothing else in
the process may connect meanwhile, and nothing at all before or after.

Downloads go through huggingface-hub's own code (``get_hf_file_metadata`` for the file's
size, hash and location, ``http_get`` to stream it), into a partial file in the home's
``models/`` folder that survives a cancel, a dropped connection or a killed process: the
next pull of the same file at the same commit resumes where it stopped. The whole file
is then checked against the SHA-256 the hub publishes for it, and only a file that
matches takes its name and is registered. A file already in the local Hugging Face cache
at that commit, with the right hash, is copied from there instead of downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from engine.errors import (
    Cancelled,
    EnvironmentFault,
    InvalidInput,
    NotFound,
    OperationFailed,
)
from engine.jobs import JobContext
from engine.models.hardware import Hardware

log = logging.getLogger(__name__)

HF_TOKEN_SECRET = "hf-token"  # the name under which `bastion secrets set` keeps the token
PART_SUFFIX = ".part"
_HUB_HOSTS = ("huggingface.co", "hf.co")
# A split GGUF ("model-00001-of-00003.gguf") needs all its parts: not pulled yet.
_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
_QUANT = re.compile(
    r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32|FP16)(?=[.\-_]|$)", re.IGNORECASE
)
# Beyond the file itself, what a loaded model needs: the KV cache at a few thousand tokens
# and llama.cpp's buffers (a rough share of the file, plus a fixed part).
_RUNTIME_SHARE = 0.15
_RUNTIME_FIXED = 512 * 1024 * 1024
_PREFERRED_QUANTS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0", "Q8_0")
_HASH_BLOCK = 4 << 20


@dataclass(frozen=True)
class HubFile:
    """One GGUF file of a repository, and whether it would fit this machine."""

    name: str
    size: int | None
    sha256: str | None
    quant: str | None
    needs_bytes: int | None = None
    fits: str | None = None  # "gpu", "ram" or "no"; None when the size is unknown

    def to_public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HubRepo:
    """A GGUF repository on the hub."""

    repo: str
    license: str | None
    downloads: int | None
    likes: int | None
    files: list[HubFile] = field(default_factory=list)

    def to_public(self) -> dict[str, Any]:
        return {**asdict(self), "files": [f.to_public() for f in self.files]}


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def hub_hosts() -> set[str]:
    """The hosts a hub call may reach: the hub's own, the endpoint's (a mirror, or a test
    server), and the HTTPS proxy's, if one is set."""
    hosts = set(_HUB_HOSTS)
    for url in (hub_endpoint(), os.environ.get("HTTPS_PROXY"), os.environ.get("https_proxy")):
        if url and (host := urlparse(url if "//" in url else f"//{url}").hostname):
            hosts.add(host.lower())
    return hosts


@contextlib.contextmanager
def online(reason: str) -> Iterator[None]:
    """The network open to the hub's hosts only, and huggingface-hub out of offline mode,
    for the duration of one user-requested call."""
    from huggingface_hub import constants

    from engine.privacy import guard

    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        with guard.allow_network(reason, hosts=hub_hosts()):
            yield
    finally:
        constants.HF_HUB_OFFLINE = offline


def quant_of(filename: str) -> str | None:
    """``Q4_K_M`` of ``model.Q4_K_M.gguf``; None when the name does not say."""
    found = _QUANT.findall(Path(filename).stem)
    return found[-1].upper() if found else None


def estimate_fit(size: int | None, hw: Hardware) -> tuple[int | None, str | None]:
    """(bytes a loaded model needs, where it fits: "gpu", "ram" or "no") from its file size."""
    if size is None:
        return None, None
    needs = int(size * (1 + _RUNTIME_SHARE)) + _RUNTIME_FIXED
    if hw.gpu_offload_supported and any(g.free_bytes >= needs for g in hw.gpus):
        return needs, "gpu"
    return needs, "ram" if needs <= hw.ram_available_bytes else "no"


def _api(token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint(), token=token or False)


def _files_of(info: Any, hw: Hardware) -> list[HubFile]:
    files = []
    for sibling in info.siblings or []:
        name = sibling.rfilename
        if not name.lower().endswith(".gguf"):
            continue
        lfs = getattr(sibling, "lfs", None)
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        size = sibling.size if sibling.size is not None else getattr(lfs, "size", None)
        needs, fits = estimate_fit(size, hw)
        files.append(HubFile(name, size, sha, quant_of(name), needs, fits))
    return files


def _license_of(info: Any) -> str | None:
    card = getattr(info, "card_data", None) or getattr(info, "cardData", None)
    license_ = card.get("license") if card is not None and hasattr(card, "get") else None
    if license_:
        return str(license_)
    for tag in getattr(info, "tags", None) or []:
        if tag.startswith("license:"):
            return str(tag.split(":", 1)[1])
    return None


def _hub_error(exc: Exception, what: str) -> Exception:
    """A Bastion error for a hub or network failure, with the hub's own words."""
    import httpx
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from engine.errors import NetworkBlocked

    if isinstance(exc, GatedRepoError):
        return OperationFailed(
            f"{what} is gated: accept its licence on the hub first",
            hint="then store your token: bastion secrets set hf-token",
        )
    if isinstance(exc, RepositoryNotFoundError | RevisionNotFoundError):
        return NotFound(f"no repository {what} on the hub (or it is private)")
    if isinstance(exc, NetworkBlocked):
        return exc
    if isinstance(exc, HfHubHTTPError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return OperationFailed(f"the hub refused {what}: {first}")
    if isinstance(exc, httpx.HTTPError | OSError):
        return EnvironmentFault(
            f"cannot reach the hub at {hub_endpoint()}: {exc or type(exc).__name__}",
            hint="check the connection (or HF_ENDPOINT, for a mirror)",
        )
    return exc


def search(text: str, hw: Hardware, *, limit: int = 10, token: str | None = None) -> list[HubRepo]:
    """GGUF repositories matching ``text``, most downloaded first, with their files."""
    if not text.strip():
        raise InvalidInput("the search text is empty")
    if not 1 <= limit <= 50:
        raise InvalidInput("limit must be between 1 and 50")
    api = _api(token)
    repos = []
    with online(f"search the Hugging Face Hub for {text!r}"):
        try:
            found = list(api.list_models(search=text, filter="gguf", sort="downloads", limit=limit))
            for model in found:
                info = api.model_info(model.id, files_metadata=True)
                repos.append(
                    HubRepo(
                        model.id,
                        _license_of(info),
                        getattr(info, "downloads", None),
                        getattr(info, "likes", None),
                        _files_of(info, hw),
                    )
                )
        except Exception as exc:
            raise _hub_error(exc, repr(text)) from exc
    return repos


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``owner/name[:FILE|QUANT]`` -> (repo, file or quant or None)."""
    repo, _, pick = spec.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise InvalidInput(
            f"{spec!r} is not a hub repository", hint="use OWNER/NAME[:FILE.gguf|QUANT]"
        )
    return repo, pick or None


def choose_file(repo: str, files: list[HubFile], pick: str | None) -> HubFile:
    """The file named by ``pick`` (a file name or a quantization), or the one to prefer."""
    whole = [f for f in files if not _SPLIT.search(f.name)]
    names = ", ".join(f.name for f in files) or "none"
    if pick is not None:
        exact = [f for f in files if f.name == pick or Path(f.name).name == pick]
        by_quant = [f for f in whole if (f.quant or "").upper() == pick.upper()]
        chosen = exact or by_quant
        if not chosen:
            raise NotFound(f"{repo} has no GGUF file {pick!r}", hint=f"its files: {names}")
        if len(chosen) > 1:
            shown = ", ".join(f.name for f in chosen)
            raise InvalidInput(f"{repo} has several {pick} files", hint=f"name one: {shown}")
        if _SPLIT.search(chosen[0].name):
            raise InvalidInput(f"{chosen[0].name} is one part of a split GGUF; not supported yet")
        return chosen[0]
    if not whole:
        raise NotFound(f"{repo} has no single-file GGUF model", hint=f"its files: {names}")
    if len(whole) == 1:
        return whole[0]
    for quant in _PREFERRED_QUANTS:
        for f in whole:
            if f.quant == quant:
                return f
    raise InvalidInput(
        f"{repo} has {len(whole)} GGUF files; choose one",
        hint=f"bastion models pull {repo}:QUANT (files: {names})",
    )


class _Progress:
    """A tqdm stand-in for huggingface-hub's ``http_get``: reports bytes with rate and ETA
    to the job, and stops the download when the job is cancelled."""

    ctx: JobContext
    label: str
    start: int

    def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any):
        self.total = total
        self.n = initial
        self.started = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.ctx.check_cancelled()
        elapsed = max(time.monotonic() - self.started, 1e-6)
        got = self.n - self.start
        rate = got / elapsed
        eta = (self.total - self.n) / rate if self.total and rate > 0 else None
        self.ctx.report(
            self.n, self.total or self.n, f"{self.label} · {rate / 1e6:.1f} MB/s", eta=eta
        )

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        return None


def _progress_class(ctx: JobContext, label: str, start: int) -> type[_Progress]:
    return type("Progress", (_Progress,), {"ctx": ctx, "label": label, "start": start})


def _sha256_of(path: Path, ctx: JobContext, label: str) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    done = 0
    with path.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
            done += len(block)
            ctx.check_cancelled()
            ctx.report(done, size, f"checking {label}")
    return digest.hexdigest()


def _check_space(folder: Path, needed: int, name: str) -> None:
    from engine.units import human_size

    free = shutil.disk_usage(folder).free
    if free < needed:
        raise EnvironmentFault(
            f"not enough disk space for {name}: it needs {human_size(needed)} more, "
            f"{human_size(free)} is free in {folder}",
            hint="free some space, then pull again (the download resumes)",
        )


@dataclass(frozen=True)
class Pulled:
    """A file pulled from the hub into ``path`` (checked against ``sha256``)."""

    repo: str
    file: HubFile
    commit: str
    path: Path
    reused_cache: bool


def pull(
    spec: str, folder: Path, hw: Hardware, ctx: JobContext, *, token: str | None = None
) -> Pulled:
    """Download one GGUF file of a hub repository into ``folder``, resumably, checked.

    Raises:
        InvalidInput, NotFound: a bad spec, no such repository or file.
        EnvironmentFault: no connection, or not enough disk space.
        OperationFailed: the hub refused, or the file does not match the hub's SHA-256
            (the partial file is deleted: pull again).
        Cancelled: the user cancelled; the partial file is kept for the next pull.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    repo, pick = parse_spec(spec)
    folder.mkdir(parents=True, exist_ok=True)
    with online(f"pull {spec} from the Hugging Face Hub"):
        try:
            info = _api(token).model_info(repo, files_metadata=True)
            chosen = choose_file(repo, _files_of(info, hw), pick)
            commit = str(info.sha)
            target = folder / Path(chosen.name).name
            cached = try_to_load_from_cache(repo, chosen.name, revision=commit)
            if isinstance(cached, str) and _matches(Path(cached), chosen, ctx):
                _copy_cached(Path(cached), target, chosen, ctx)
                return Pulled(repo, chosen, commit, target, True)
            part = folder / f".{target.name}.{commit[:12]}{PART_SUFFIX}"
            done = part.stat().st_size if part.exists() else 0
            if chosen.size is not None:
                _check_space(folder, max(chosen.size - done, 0), chosen.name)
            url = hf_hub_url(repo, chosen.name, revision=commit, endpoint=hub_endpoint())
            headers = build_hf_headers(token=token or False)
            meta = get_hf_file_metadata(url, token=token or False, endpoint=hub_endpoint())
            location = meta.location or url
            if urlparse(location).hostname != urlparse(url).hostname:
                headers.pop("authorization", None)  # a signed CDN address: no token there
            expected = chosen.size if chosen.size is not None else meta.size
            if expected is not None and done > expected:
                part.unlink()
                done = 0
            with part.open("ab") as fh:
                http_get(
                    location,
                    fh,
                    resume_size=done,
                    headers=headers,
                    expected_size=expected,
                    displayed_filename=chosen.name,
                    tqdm_class=_progress_class(ctx, chosen.name, done),
                )
        except (Cancelled, InvalidInput, NotFound, EnvironmentFault, OperationFailed):
            raise
        except Exception as exc:
            raise _hub_error(exc, repo) from exc
    if not _matches(part, chosen, ctx):
        part.unlink(missing_ok=True)
        raise OperationFailed(
            f"the download of {chosen.name} does not match the hub's SHA-256 (corrupted in "
            "transit or on disk); it was deleted",
            hint=f"pull again: bastion models pull {spec}",
        )
    _take_name(part, target)
    return Pulled(repo, chosen, commit, target, False)


def _matches(path: Path, file: HubFile, ctx: JobContext) -> bool:
    """Whether ``path`` is ``file``: its size, and its SHA-256 where the hub gives one."""
    if file.size is not None and path.stat().st_size != file.size:
        return False
    if file.sha256 is None:
        log.warning("the hub gives no SHA-256 for %s: only its size is checked", file.name)
        return True
    return _sha256_of(path, ctx, file.name) == file.sha256.lower()


def _take_name(source: Path, target: Path) -> None:
    if target.exists():
        raise OperationFailed(
            f"{target} exists already",
            hint="remove it, or import it: bastion models import " + str(target),
        )
    os.replace(source, target)


def _copy_cached(source: Path, target: Path, file: HubFile, ctx: JobContext) -> None:
    """The file from the local Hugging Face cache, copied whole into ``target``."""
    _check_space(target.parent, file.size or source.stat().st_size, file.name)
    part = target.with_name(f".{target.name}.cache{PART_SUFFIX}")
    ctx.report(0, 1, f"{file.name} from the local Hugging Face cache")
    shutil.copyfile(source, part)
    _take_name(part, target)
