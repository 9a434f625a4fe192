"""The Hugging Face Hub as a remote: ``hf://ORG/REPO[@REVISION]``.

Pushing commits the adapter directory (manifest, payload) and a generated model card with
``HfApi.create_commit``; pulling uses ``snapshot_download`` and its cache (so ``HF_HUB_OFFLINE=1``
works from the cache), and every digest is verified (FORMAT §7) before the adapter enters the
local store. Several adapters can live in one repo, one per subfolder. The token comes from the
usual places (``HF_TOKEN``, ``huggingface-cli login``); the endpoint from ``HF_ENDPOINT``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import RegistryError, S2RegError
from ..format import load, read_manifest
from ..format.manifest import MANIFEST_NAME
from ..results import Result, omitted_if_none
from .modelcard import model_card
from .names import parse_ref
from .store import Store

_REPO = re.compile(r"hf://([A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@([A-Za-z0-9._/-]+))?")


@dataclass(frozen=True)
class PushResult(Result):
    """A push to the Hub: the ``commit`` (and its ``url``) made on ``revision`` of ``repo``, in ``subfolder``
    (None: the repo's root), and the pushed adapter's manifest ``digest``."""

    repo: str
    revision: str
    subfolder: str | None
    commit: str
    digest: str
    url: str


@dataclass(frozen=True)
class PullResult(Result):
    """A pull from ``revision`` of the Hub ``repo``: the local ``ref`` it was stored as and its manifest
    ``digest``; ``output`` when ``s2reg pull -o`` also copied it to a directory."""

    repo: str
    revision: str
    ref: str
    digest: str
    output: str | None = omitted_if_none()


def parse_hub(url: str) -> tuple[str, str | None]:
    """``hf://ORG/REPO[@REVISION]`` -> (repo id, revision or None)."""
    match = _REPO.fullmatch(url)
    if not match or ".." in url:
        raise RegistryError(f"invalid Hub location {url!r} (expected hf://ORG/REPO[@REVISION])")
    return match.group(1), match.group(2)


def _check_subfolder(subfolder: str | None) -> str:
    if not subfolder:
        return ""
    parts = subfolder.strip("/").split("/")
    if any(p in ("", ".", "..") or not re.fullmatch(r"[A-Za-z0-9._-]+", p) for p in parts):
        raise RegistryError(f"invalid subfolder {subfolder!r}")
    return "/".join(parts) + "/"


def _hub_error(exc: Exception, what: str) -> RegistryError:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RegistryError(f"{what}: {message}")


def _endpoint(endpoint: str | None) -> str | None:
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def push_to_hub(store: Store, source: str, url: str, *, subfolder: str | None = None, private: bool = False,
                token: str | None = None, endpoint: str | None = None) -> PushResult:
    """Publish ``source`` (a stored ``NAME:TAG`` or an adapter directory) at ``url``; return the commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    repo_id, revision = parse_hub(url)
    prefix = _check_subfolder(subfolder)
    directory = Path(source) if Path(source).is_dir() else store.resolve(parse_ref(source))
    adapter = load(directory)
    manifest, text = read_manifest(directory)
    payload_file = manifest["payload"]["file"]
    operations = [
        CommitOperationAdd(prefix + MANIFEST_NAME, text),
        CommitOperationAdd(prefix + payload_file, (directory / payload_file).read_bytes()),
        CommitOperationAdd(prefix + "README.md", model_card(adapter, source).encode()),
    ]
    api = HfApi(endpoint=_endpoint(endpoint), token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(repo_id, operations, commit_message=f"s2reg push {source}", revision=revision)
    except S2RegError:
        raise
    except Exception as exc:  # noqa: BLE001 - network and Hub errors become one clear line
        raise _hub_error(exc, f"push to {url} failed") from None
    return PushResult(repo_id, revision or "main", prefix.rstrip("/") or None, commit.oid, adapter.stored.digest,
                      commit.commit_url)


def pull_from_hub(store: Store, url: str, ref: str | None = None, *, subfolder: str | None = None,
                  token: str | None = None, endpoint: str | None = None,
                  cache_dir: str | os.PathLike | None = None) -> PullResult:
    """Download the adapter at ``url`` (through the Hub cache), verify it, and store it as ``ref``."""
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_hub(url)
    prefix = _check_subfolder(subfolder)
    ref = ref or f"{repo_id.split('/')[1].lower()}{'/' + prefix.rstrip('/').lower() if prefix else ''}:{revision or 'latest'}"
    target = parse_ref(ref)
    try:
        # Only this adapter's files: other adapters in the same repo stay on the Hub.
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=[prefix + MANIFEST_NAME, prefix + "payload.*"],
                                     endpoint=_endpoint(endpoint), token=token,
                                     cache_dir=None if cache_dir is None else Path(cache_dir))
    except Exception as exc:  # noqa: BLE001 - network, offline and Hub errors become one clear line
        raise _hub_error(exc, f"pull from {url} failed") from None
    directory = Path(snapshot) / prefix if prefix else Path(snapshot)
    if not (directory / MANIFEST_NAME).is_file():
        raise RegistryError(f"{url}{' ' + prefix if prefix else ''}: no s2reg adapter there (no {MANIFEST_NAME})")
    digest = store.push(directory, target)  # FORMAT §7 checks every digest before the store changes
    return PullResult(repo_id, revision or "main", str(target), digest)
