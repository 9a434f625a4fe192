"""Push and pull through the real huggingface_hub client against a local Hub test double."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

import s2reg
from s2reg.errors import RegistryError
from s2reg.registry import Store
from s2reg.registry import hub as hub_remote
from s2reg.registry.hub import push_to_hub

from .helpers import adapter_dir, base_checkpoint, tree_digest
from .hub_server import HubDouble

ROOT = Path(__file__).resolve().parents[2]


def pull_from_hub(store, url, ref=None, **kwargs):
    """In-process pulls use a Hub cache of their own (the default one is read at import time)."""
    return hub_remote.pull_from_hub(store, url, ref, cache_dir=store.root.parent / "hf-cache", **kwargs)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return base_checkpoint(tmp_path_factory.mktemp("hub") / "base")


@pytest.fixture
def env(tmp_path, base):
    """A store holding one adapter, and a running Hub double."""
    store = Store(tmp_path / "home")
    store.push(adapter_dir(base, tmp_path / "a"), "math:v1")
    with HubDouble() as hub:
        yield store, hub, tmp_path


def test_push_then_pull_into_another_store(env):
    store, hub, tmp = env
    pushed = push_to_hub(store, "math:v1", "hf://org/math", endpoint=hub.endpoint, token="t")
    files = hub.repos["org/math"].files("main")
    assert {"s2reg.json", "payload.safetensors.zst", "README.md"} <= set(files)
    card = files["README.md"].decode()
    # "tiny" is no Hub id: the card names it in its text but links no base_model (test_export_portable.py)
    assert card.startswith("---\nlibrary_name: s2reg\ntags:\n") and "adapter for `tiny`" in card
    assert "| 0 | mlp.down_proj.weight | columns 3/128 |" in card
    other = Store(tmp / "other")
    pulled = pull_from_hub(other, "hf://org/math", "math:from-hub", endpoint=hub.endpoint, token="t")
    assert pulled.digest == pushed.digest == store.digest_of("math:v1")
    # typed results (issue 26) whose JSON keys are the ones --json always printed; pull's output only with -o
    assert pushed.as_json() == {"repo": "org/math", "revision": "main", "subfolder": None, "commit": pushed.commit,
                                "digest": pushed.digest, "url": pushed.url} and pushed.commit
    assert pulled.as_json() == {"repo": "org/math", "revision": "main", "ref": "math:from-hub", "digest": pulled.digest}
    with pytest.raises(dataclasses.FrozenInstanceError):
        pulled.ref = "x:v1"  # type: ignore[misc]
    assert other.load("math:from-hub").num_params == store.load("math:v1").num_params


def test_several_adapters_per_repo_and_branches(env, base):
    store, hub, tmp = env
    store.push(adapter_dir(base, tmp / "b", seed=4), "code:v1")
    push_to_hub(store, "math:v1", "hf://org/suite@dev", subfolder="math", endpoint=hub.endpoint)
    push_to_hub(store, "code:v1", "hf://org/suite@dev", subfolder="code", endpoint=hub.endpoint)
    assert "math/s2reg.json" in hub.repos["org/suite"].files("dev")
    assert "math/s2reg.json" not in hub.repos["org/suite"].files("main")
    other = Store(tmp / "other")
    got = pull_from_hub(other, "hf://org/suite@dev", subfolder="code", endpoint=hub.endpoint)
    assert got.ref == "suite/code:dev"
    assert other.digest_of("suite/code:dev") == store.digest_of("code:v1")
    with pytest.raises(RegistryError, match="no s2reg adapter there"):
        pull_from_hub(other, "hf://org/suite@dev", endpoint=hub.endpoint)


def test_tampered_payload_on_the_hub_never_lands(env):
    store, hub, tmp = env
    push_to_hub(store, "math:v1", "hf://org/math", endpoint=hub.endpoint)
    files = hub.repos["org/math"].files("main")
    data = bytearray(files["payload.safetensors.zst"])
    data[-5] ^= 0xFF
    files["payload.safetensors.zst"] = bytes(data)
    other = Store(tmp / "other")
    with pytest.raises(s2reg.IntegrityError, match="sha256 mismatch"):
        pull_from_hub(other, "hf://org/math", "x:v1", endpoint=hub.endpoint)
    assert other.refs() == []


def test_tampered_manifest_on_the_hub_never_lands(env):
    store, hub, tmp = env
    push_to_hub(store, "math:v1", "hf://org/math", endpoint=hub.endpoint)
    files = hub.repos["org/math"].files("main")
    files["s2reg.json"] = files["s2reg.json"].replace(b'"raw_bytes":', b'"raw_bytes": 1, "x":')
    other = Store(tmp / "other")
    with pytest.raises(s2reg.FormatError):
        pull_from_hub(other, "hf://org/math", "x:v1", endpoint=hub.endpoint)
    assert other.refs() == []


def test_server_errors_are_one_line_and_leave_the_store_unchanged(env):
    store, hub, tmp = env
    push_to_hub(store, "math:v1", "hf://org/math", endpoint=hub.endpoint)
    other = Store(tmp / "other")
    hub.fail(r"/revision/")  # 404-like failures are not retried
    hub.faults[r"/revision/"].status = 403
    with pytest.raises(RegistryError, match="pull from hf://org/math failed") as info:
        pull_from_hub(other, "hf://org/math", endpoint=hub.endpoint)
    assert "\n" not in str(info.value)
    hub.faults.clear()
    hub.fail(r"/commit/", status=400)
    with pytest.raises(RegistryError, match="push to hf://org/math failed"):
        push_to_hub(store, "math:v1", "hf://org/math", endpoint=hub.endpoint)
    with pytest.raises(RegistryError, match="invalid Hub location"):
        push_to_hub(store, "math:v1", "hf://../etc", endpoint=hub.endpoint)
    assert other.refs() == []


def test_truncated_download_is_refused(env):
    store, hub, tmp = env
    push_to_hub(store, "math:v1", "hf://org/math", endpoint=hub.endpoint)
    hub.fail(r"/resolve/.*/payload", truncate=True)
    other = Store(tmp / "other")
    before = tree_digest(tmp / "home")
    with pytest.raises((RegistryError, s2reg.FormatError)):
        pull_from_hub(other, "hf://org/math", endpoint=hub.endpoint)
    assert other.refs() == [] and tree_digest(tmp / "home") == before


def _cli(tmp, *args, **env):
    """The CLI in a fresh process (huggingface_hub reads its offline and timeout settings at import)."""
    environment = {**os.environ, "S2REG_HOME": str(tmp / "fresh"), "PYTHONPATH": str(ROOT),
                   "HF_HUB_CACHE": str(tmp / "cli-hf-cache"), "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    return subprocess.run([sys.executable, "-m", "s2reg", *args], capture_output=True, text=True, env=environment,
                          check=False, timeout=120)


def test_offline_pull_from_the_hub_cache_and_with_an_empty_cache(env):
    store, hub, tmp = env
    push_to_hub(store, "math:v1", "hf://org/math", endpoint=hub.endpoint)
    online = _cli(tmp, "pull", "hf://org/math", "m:v1", HF_ENDPOINT=hub.endpoint)
    assert online.returncode == 0, online.stderr
    requests = len(hub.requests)
    offline = _cli(tmp, "pull", "hf://org/math", "m:v2", HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert len(hub.requests) == requests  # served from the cache
    empty = _cli(tmp, "pull", "hf://org/math", "m:v3", HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="1",
                 HF_HUB_CACHE=str(tmp / "empty-cache"))
    assert empty.returncode == 1 and empty.stderr.startswith("Error: pull from hf://org/math failed")
    assert len(empty.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # over 20 s on 2 cores: outside the quick subset (README)
def test_timeout_is_a_clear_error(env):
    store, hub, tmp = env
    push_to_hub(store, "math:v1", "hf://org/math", endpoint=hub.endpoint)
    hub.fail(r"/resolve/.*/payload", delay=4.0)
    slow = _cli(tmp, "pull", "hf://org/math", "m:v1", HF_ENDPOINT=hub.endpoint, HF_HUB_ETAG_TIMEOUT="1",
                HF_HUB_DOWNLOAD_TIMEOUT="1")
    assert slow.returncode == 1 and "Error: pull from hf://org/math failed" in slow.stderr
    assert not (tmp / "fresh" / "refs").exists()
