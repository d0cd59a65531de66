"""S3Store against a real S3-compatible server (moto's, as its own process on loopback): save, names,
path through the disk cache, replace, delete, visibility only once complete, two servers on one store, and
a remote that fails (dead endpoint, silent endpoint, missing bucket) giving a clear error quickly."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
from botocore.exceptions import ClientError

from adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterExists, AdapterNotFound, InvalidAdapter, SourceUnavailable
from adapters.s3_store import S3Store, parse_url
from adapters.store import AdapterStore, open_store
from server.config import load_config
from tests.at_once import at_once
from tests.s3 import client, free_port, moto_server

CONFIG, WEIGHTS = b'{"peft_type": "PROMPT_TUNING"}', b"\x00weights\x01" * 1000


def _store(endpoint: str, bucket: str, cache, prefix: str = "team/adapters", **kwargs) -> S3Store:
    return S3Store(f"s3://{bucket}/{prefix}", cache, endpoint_url=endpoint, **kwargs)


def _keys(endpoint: str, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client(endpoint).list_objects_v2(Bucket=bucket).get("Contents", ()))


def test_parse_url():
    assert parse_url("s3://b") == ("b", "")
    assert parse_url("s3://b/") == ("b", "")
    assert parse_url("s3://b/p/q/") == ("b", "p/q/")
    for bad in ("s3://", "s3:///p", "gs://b/p"):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_save_names_path_delete(s3_endpoint, bucket, tmp_path):
    store = _store(s3_endpoint, bucket, tmp_path / "cache")
    assert store.url == f"s3://{bucket}/team/adapters" and store.source == "s3"
    assert store.names() == [] and not store.exists("a1")
    path = store.save("a1", CONFIG, WEIGHTS)
    assert (path / CONFIG_FILE).read_bytes() == CONFIG and (path / WEIGHTS_FILE).read_bytes() == WEIGHTS
    assert store.path("a1") == path
    store.save("b2", b"{}", b"w")
    assert store.names() == ["a1", "b2"] and store.exists("a1")

    keys = _keys(s3_endpoint, bucket)
    pointer_object = client(s3_endpoint).get_object(Bucket=bucket, Key="team/adapters/adapters/a1.json")
    pointer = json.loads(pointer_object["Body"].read())
    version = pointer["version"]
    assert pointer["files"][WEIGHTS_FILE]["size"] == len(WEIGHTS)
    assert f"team/adapters/versions/a1/{version}/{WEIGHTS_FILE}" in keys
    assert all(k.startswith("team/adapters/") for k in keys)

    with pytest.raises(AdapterExists, match="a1"):
        store.save("a1", b"{}", b"other")
    assert store.path("a1") == path and (path / WEIGHTS_FILE).read_bytes() == WEIGHTS

    store.delete("a1")
    assert store.names() == ["b2"] and not store.exists("a1")
    assert not any("/a1" in k for k in _keys(s3_endpoint, bucket)), "delete left files behind"
    assert not (tmp_path / "cache" / "a1").exists()
    with pytest.raises(AdapterNotFound, match="a1"):
        store.delete("a1")
    with pytest.raises(AdapterNotFound, match="a1"):
        store.path("a1")
    for bad in ("../x", ".hidden", "a/b"):
        with pytest.raises(InvalidAdapter):
            store.save(bad, b"{}", b"w")
    # the name is free again
    store.save("a1", b"{}", b"again")
    assert (store.path("a1") / WEIGHTS_FILE).read_bytes() == b"again"


def test_second_server_reads_through_its_own_cache(s3_endpoint, bucket, tmp_path):
    first = _store(s3_endpoint, bucket, tmp_path / "cache-1")
    first.save("shared", CONFIG, WEIGHTS)
    second = _store(s3_endpoint, bucket, tmp_path / "cache-2")
    assert second.names() == ["shared"]
    path = second.path("shared")
    assert path.is_relative_to(tmp_path / "cache-2")
    assert (path / CONFIG_FILE).read_bytes() == CONFIG and (path / WEIGHTS_FILE).read_bytes() == WEIGHTS
    assert sorted(p.name for p in (tmp_path / "cache-2").iterdir()) == ["shared"], "temporary directories left"
    # deleted by the first server: the second sees it gone
    first.delete("shared")
    assert not second.exists("shared")
    with pytest.raises(AdapterNotFound):
        second.path("shared")


def test_an_adapter_is_visible_only_once_complete(s3_endpoint, bucket, tmp_path):
    """Files without a pointer (a save interrupted before its last write, or a delete after its
    first) are no adapter; the start-up sweep removes them once they are old enough."""
    s3 = client(s3_endpoint)
    store = _store(s3_endpoint, bucket, tmp_path / "cache", sweep_grace=0)
    store.save("kept", CONFIG, WEIGHTS)
    for version in ("0" * 32, "1" * 32):
        s3.put_object(Bucket=bucket, Key=f"team/adapters/versions/half/{version}/{CONFIG_FILE}", Body=CONFIG)
    s3.put_object(Bucket=bucket, Key=f"team/adapters/versions/kept/{'2' * 32}/{WEIGHTS_FILE}", Body=b"stale")
    s3.put_object(Bucket=bucket, Key="team/adapters/adapters/not a name.json", Body=b"{}")
    assert store.names() == ["kept"]
    assert not store.exists("half")
    with pytest.raises(AdapterNotFound):
        store.path("half")

    s3.put_object(Bucket=bucket, Key="team/adapters/adapters/garbled.json", Body=b"{not json")
    s3.put_object(Bucket=bucket, Key=f"team/adapters/versions/garbled/{'3' * 32}/{CONFIG_FILE}", Body=CONFIG)
    with pytest.raises(InvalidAdapter, match="garbled"):
        store.path("garbled")
    (tmp_path / "cache" / "gone" / ("0" * 32)).mkdir(parents=True)  # cached once, deleted by another server
    patient = _store(s3_endpoint, bucket, tmp_path / "cache-2")  # the default grace: too young to sweep
    assert any("/half/" in k for k in _keys(s3_endpoint, bucket))
    store.sweep()
    keys = _keys(s3_endpoint, bucket)
    assert not any("/half/" in k or "2" * 32 in k for k in keys), keys
    assert any("3" * 32 in k for k in keys), "the files of an unreadable pointer were swept"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["kept"]
    assert (patient.path("kept") / WEIGHTS_FILE).read_bytes() == WEIGHTS


@pytest.mark.parametrize("round_", range(3))
def test_two_servers_saving_one_name_one_wins(s3_endpoint, bucket, tmp_path, round_):
    stores = [_store(s3_endpoint, bucket, tmp_path / f"cache-{i}") for i in range(2)]
    results = at_once(lambda i: stores[i].save("race", CONFIG, f"weights-{i}".encode()), 2)
    losers = [r for r in results if isinstance(r, Exception)]
    assert len(losers) == 1 and isinstance(losers[0], AdapterExists), results
    winner = 1 - results.index(losers[0])
    fresh = _store(s3_endpoint, bucket, tmp_path / "reader")
    assert (fresh.path("race") / WEIGHTS_FILE).read_bytes() == f"weights-{winner}".encode()
    assert len(_keys(s3_endpoint, bucket)) == 3, "the loser's files were kept"


def test_a_corrupted_object_is_refused(s3_endpoint, bucket, tmp_path):
    store = _store(s3_endpoint, bucket, tmp_path / "cache")
    store.save("bad", CONFIG, WEIGHTS)
    key = next(k for k in _keys(s3_endpoint, bucket) if k.endswith(WEIGHTS_FILE))
    client(s3_endpoint).put_object(Bucket=bucket, Key=key, Body=WEIGHTS[:-1] + b"X")
    reader = _store(s3_endpoint, bucket, tmp_path / "cache-2")
    with pytest.raises(InvalidAdapter, match="does not match"):
        reader.path("bad")
    assert list((tmp_path / "cache-2").iterdir()) == []


def test_missing_bucket_is_a_clear_error(s3_endpoint, tmp_path):
    with pytest.raises(SourceUnavailable, match=r"s3://no-such-bucket-here/p.*does not exist"):
        _store(s3_endpoint, "no-such-bucket-here", tmp_path / "cache", prefix="p")


def test_denied_access_is_a_clear_error(tmp_path, aws_credentials):
    """A server that checks credentials (moto's IAM enforcement) and knows none of ours."""
    with moto_server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as endpoint:
        with pytest.raises(SourceUnavailable, match=r"s3://bkt/p: .*access denied"):
            _store(endpoint, "bkt", tmp_path / "cache", prefix="p")


def test_dead_endpoint_fails_fast_naming_the_store(tmp_path, aws_credentials):
    start = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"s3://bkt/p") as info:
        _store(f"http://127.0.0.1:{free_port()}", "bkt", tmp_path / "cache", prefix="p")
    assert time.monotonic() - start < 10
    assert "127.0.0.1" in str(info.value)


def test_silent_endpoint_times_out(tmp_path, aws_credentials):
    """A server that accepts connections and never answers: the read timeout ends it, not a hang."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(SourceUnavailable, match=r"s3://bkt.*timeout"):
            _store(endpoint, "bkt", tmp_path / "cache", prefix="", read_timeout=0.5, max_attempts=2)
        assert time.monotonic() - start < 10


def test_no_credentials_is_a_clear_error(s3_endpoint, tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    with pytest.raises(SourceUnavailable, match=r"s3://bkt/p: .*credentials.*AWS_ACCESS_KEY_ID"):
        _store(s3_endpoint, "bkt", tmp_path / "cache", prefix="p")


def test_server_refuses_to_start_on_an_unreachable_store(tmp_path, aws_credentials):
    """Checked before the model loads: the message comes at once."""
    from server.__main__ import build_service

    dead = f"http://127.0.0.1:{free_port()}"
    config = load_config(["--adapter-store", "s3://nowhere/p", "--s3-endpoint-url", dead,
                          "--adapter-dir", str(tmp_path / "cache")], environ={})
    threads, start = torch.get_num_threads(), time.monotonic()
    try:
        with pytest.raises(SystemExit, match=r"refusing to start: adapter store s3://nowhere/p: .*127\.0\.0\.1"):
            build_service(config)
    finally:
        torch.set_num_threads(threads)  # build_service gives this thread one
    assert time.monotonic() - start < 10


def test_open_store_and_config(s3_endpoint, bucket, tmp_path):
    assert isinstance(open_store(tmp_path / "local"), AdapterStore)
    store = open_store(f"s3://{bucket}", cache_dir=tmp_path / "cache", endpoint_url=s3_endpoint)
    assert isinstance(store, S3Store) and store.url == f"s3://{bucket}"

    config = load_config(["--adapter-store", f"s3://{bucket}/x", "--s3-endpoint-url", s3_endpoint], environ={})
    assert config.adapter_store == f"s3://{bucket}/x" and config.s3_endpoint_url == s3_endpoint
    env = {"SOFTPROMPT_ADAPTER_STORE": "s3://b/p", "SOFTPROMPT_S3_ENDPOINT_URL": "http://127.0.0.1:9"}
    assert load_config([], environ=env).adapter_store == "s3://b/p"
    same = tmp_path / "dir"
    assert load_config(["--adapter-store", str(same), "--adapter-dir", str(same)], environ={}).adapter_store
    for argv in (["--adapter-store", "gs://b/p"], ["--adapter-store", "s3:///p"],
                 ["--s3-endpoint-url", "http://x"], ["--adapter-store", "here", "--s3-endpoint-url", "http://x"],
                 ["--adapter-store", str(tmp_path / "a"), "--adapter-dir", str(tmp_path / "b")]):
        with pytest.raises(SystemExit):
            load_config(argv, environ={})


def test_replace_overwrites_the_pointer_last(s3_endpoint, bucket, tmp_path, monkeypatch):
    store = _store(s3_endpoint, bucket, tmp_path / "cache")
    store.save("r", CONFIG, WEIGHTS)
    reader = _store(s3_endpoint, bucket, tmp_path / "cache-reader")
    assert (reader.path("r") / WEIGHTS_FILE).read_bytes() == WEIGHTS
    old_version = json.loads(client(s3_endpoint).get_object(
        Bucket=bucket, Key="team/adapters/adapters/r.json")["Body"].read())["version"]

    path = store.replace("r", b"{}", b"new weights")
    assert (path / WEIGHTS_FILE).read_bytes() == b"new weights" and store.path("r") == path
    keys = _keys(s3_endpoint, bucket)
    assert len(keys) == 3 and not any(old_version in k for k in keys), "the old version's files were kept"
    assert sorted(p.name for p in (tmp_path / "cache" / "r").iterdir()) == [path.name], "old cache kept"
    # another server reads the new version (its cached old one is no longer the pointer's)
    assert (reader.path("r") / WEIGHTS_FILE).read_bytes() == b"new weights"
    assert sorted(p.name for p in (tmp_path / "cache-reader" / "r").iterdir()) == [path.name]

    with pytest.raises(AdapterNotFound, match="absent"):
        store.replace("absent", CONFIG, WEIGHTS)
    assert len(_keys(s3_endpoint, bucket)) == 3

    # the pointer's write fails: the old version stays, the new files are removed
    real_put = store.client.put_object

    def pointer_fails(**kwargs):
        if kwargs["Key"].endswith("r.json"):
            raise ClientError({"Error": {"Code": "InternalError", "Message": "simulated"}}, "PutObject")
        return real_put(**kwargs)

    monkeypatch.setattr(store.client, "put_object", pointer_fails)
    with pytest.raises(SourceUnavailable, match="simulated"):
        store.replace("r", CONFIG, b"never stored")
    monkeypatch.undo()
    assert _keys(s3_endpoint, bucket) == keys
    assert (_store(s3_endpoint, bucket, tmp_path / "cache-3").path("r") / WEIGHTS_FILE).read_bytes() == b"new weights"
