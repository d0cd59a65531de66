"""AdapterStore: atomic saves, replaces and deletes, crashes at every step of a replace, sweeping, names.
The registry over it: test_registry.py."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import pytest

from adapters import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterExists,
    AdapterNotFound,
    AdapterStore,
    InvalidAdapter,
    content_version,
)


def _entries(store: AdapterStore) -> list[str]:
    """The root's entries, less `.versions` (which `_versions` checks)."""
    return sorted(p.name for p in store.root.iterdir() if p.name != ".versions")


def _hidden(store: AdapterStore) -> list[str]:
    return [name for name in _entries(store) if name.startswith(".")]


def _versions(store: AdapterStore) -> dict[str, str]:
    """name -> the version its symlink points to; asserts that `.versions` holds exactly those."""
    current = {}
    for p in store.root.iterdir():
        if p.is_symlink():
            link = os.readlink(p)
            assert link == f".versions/{p.name}/{Path(link).name}", f"{p.name} -> {link}"
            current[p.name] = Path(link).name
    held = {}
    if store.versions.exists():
        held = {d.name: sorted(v.name for v in d.iterdir()) for d in store.versions.iterdir()}
    held = {name: versions for name, versions in held.items() if versions}
    assert held == {name: [v] for name, v in current.items()}, f"stray version directories: {held} vs {current}"
    for name, version in current.items():
        files = sorted(os.listdir(store.versions / name / version))
        assert files == sorted([CONFIG_FILE, WEIGHTS_FILE]), files
    return current


# --- AdapterStore ---------------------------------------------------------------------------------


def test_save_writes_both_files_and_no_temp_dir(tmp_path):
    store = AdapterStore(tmp_path / "store")
    target = store.save("a1", b'{"x": 1}', b"weights")
    assert target == store.root / "a1"
    assert (target / CONFIG_FILE).read_bytes() == b'{"x": 1}'
    assert (target / WEIGHTS_FILE).read_bytes() == b"weights"
    assert sorted(p.name for p in target.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert _entries(store) == ["a1"]
    assert _versions(store) == {"a1": content_version(b'{"x": 1}', b"weights")}
    assert store.names() == ["a1"] and store.exists("a1")


@pytest.mark.parametrize("fail_at", ["fsync", "rename", "symlink", "write"])
def test_failed_save_leaves_nothing(tmp_path, monkeypatch, fail_at):
    store = AdapterStore(tmp_path / "store")
    store.save("keep", b"{}", b"w")

    def boom(*args, **kwargs):
        raise OSError(errno.EIO, f"simulated {fail_at} failure")

    if fail_at == "write":  # the disk fills up while writing the weights
        real_open = open

        class FailingFile:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[:3])
                raise OSError(errno.ENOSPC, "simulated: no space left on device")

            def __getattr__(self, name):
                return getattr(self.f, name)

        def failing_open(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            return FailingFile(f) if "w" in mode and str(path).endswith(WEIGHTS_FILE) else f

        monkeypatch.setattr("builtins.open", failing_open)
    else:
        monkeypatch.setattr(os, fail_at, boom)
    with pytest.raises(OSError):
        store.save("new", b"{}", b"weights")
    monkeypatch.undo()
    assert _entries(store) == ["keep"], "a temporary directory or a half-written adapter was left behind"
    assert list(_versions(store)) == ["keep"]
    assert store.names() == ["keep"]
    assert not store.exists("new")
    # and the store still works
    store.save("new", b"{}", b"weights")
    assert store.names() == ["keep", "new"]


def test_save_existing_name_raises_and_keeps_original(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.save("a1", b"config-1", b"weights-1")
    with pytest.raises(AdapterExists, match="a1"):
        store.save("a1", b"config-2", b"weights-2")
    assert (store.root / "a1" / CONFIG_FILE).read_bytes() == b"config-1"
    assert (store.root / "a1" / WEIGHTS_FILE).read_bytes() == b"weights-1"
    assert _entries(store) == ["a1"]
    assert _versions(store) == {"a1": content_version(b"config-1", b"weights-1")}


def test_save_losing_a_race_raises_adapter_exists(tmp_path, monkeypatch):
    """Another save creates the name between the existence check and the symlink."""
    store = AdapterStore(tmp_path / "store")
    real_symlink = os.symlink

    def rival_wins(src, dst, *args, **kwargs):
        os.mkdir(dst)
        with open(os.path.join(dst, CONFIG_FILE), "wb") as f:
            f.write(b"rival")
        return real_symlink(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "symlink", rival_wins)
    with pytest.raises(AdapterExists):
        store.save("a1", b"mine", b"mine")
    monkeypatch.undo()
    assert (store.root / "a1" / CONFIG_FILE).read_bytes() == b"rival"
    assert _entries(store) == ["a1"]
    assert _versions(store) == {}, "the loser's version directory was kept"


def test_delete(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.save("a1", b"{}", b"w")
    store.save("a2", b"{}", b"w")
    store.delete("a1")
    assert store.names() == ["a2"]
    assert _entries(store) == ["a2"], "delete left its trash behind"
    assert list(_versions(store)) == ["a2"], "delete left the files behind"
    with pytest.raises(AdapterNotFound):
        store.delete("a1")
    with pytest.raises(InvalidAdapter):
        store.delete("../a2")
    assert store.names() == ["a2"]


def test_sweep_removes_leftovers_at_start_up(tmp_path):
    root = tmp_path / "store"
    AdapterStore(root).save("good", b"{}", b"w")
    for leftover in (".tmp-0123abcd", ".trash-4567ef"):
        (root / leftover).mkdir()
        (root / leftover / WEIGHTS_FILE).write_bytes(b"half")
    store = AdapterStore(root)  # start-up
    assert _entries(store) == ["good"]
    assert store.names() == ["good"]


def test_names_ignore_hidden_invalid_and_files(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.save("zeta", b"{}", b"w")
    store.save("Alpha-1", b"{}", b"w")
    for junk in (".hidden", ".tmp-keep-out", "with space", "-dash", "x" * 129):
        (store.root / junk).mkdir()
    (store.root / "a-file").write_bytes(b"not a dir")
    assert store.names() == ["Alpha-1", "zeta"]


def test_path_checks_names(tmp_path):
    store = AdapterStore(tmp_path / "store")
    for bad in ("../x", ".hidden", "", "a/b"):
        with pytest.raises(InvalidAdapter):
            store.path(bad)
        with pytest.raises(InvalidAdapter):
            store.save(bad, b"{}", b"w")
    assert _entries(store) == []
    assert not (tmp_path / "x").exists()


OLD, NEW = (b'{"v": "old"}', b"old weights"), (b'{"v": "new"}', b"new weights, longer")


def _files(store: AdapterStore, name: str) -> tuple[bytes, bytes]:
    return (store.root / name / CONFIG_FILE).read_bytes(), (store.root / name / WEIGHTS_FILE).read_bytes()


def _plain_directory(store: AdapterStore, name: str, files: tuple[bytes, bytes]) -> None:
    """An adapter as stored before versions (or dropped in by hand): a plain directory."""
    (store.root / name).mkdir()
    (store.root / name / CONFIG_FILE).write_bytes(files[0])
    (store.root / name / WEIGHTS_FILE).write_bytes(files[1])


def test_replace_swaps_the_version(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.save("a1", *OLD)
    store.save("other", b"{}", b"w")
    assert store.replace("a1", *NEW) == store.root / "a1"
    assert _files(store, "a1") == NEW
    assert _versions(store) == {"a1": content_version(*NEW), "other": content_version(b"{}", b"w")}
    assert _entries(store) == ["a1", "other"] and store.names() == ["a1", "other"]
    store.replace("a1", *NEW)  # the same files: nothing changes
    assert _files(store, "a1") == NEW and _versions(store)["a1"] == content_version(*NEW)
    store.replace("a1", *OLD)  # and back: a version directory is written afresh
    assert _files(store, "a1") == OLD and _versions(store)["a1"] == content_version(*OLD)
    with pytest.raises(AdapterNotFound, match="missing"):
        store.replace("missing", *NEW)
    with pytest.raises(InvalidAdapter):
        store.replace("../a1", *NEW)
    assert _entries(store) == ["a1", "other"] and "missing" not in _versions(store)
    # and a restart reads the same
    again = AdapterStore(tmp_path / "store")
    assert again.names() == ["a1", "other"] and _files(again, "a1") == OLD


def test_plain_directories_are_read_replaced_and_deleted(tmp_path):
    store = AdapterStore(tmp_path / "store")
    _plain_directory(store, "legacy", OLD)
    _plain_directory(store, "legacy-2", OLD)
    assert store.names() == ["legacy", "legacy-2"] and store.exists("legacy")
    with pytest.raises(AdapterExists):
        store.save("legacy", *NEW)
    store.replace("legacy", *NEW)
    assert (store.root / "legacy").is_symlink() and _files(store, "legacy") == NEW
    assert _entries(store) == ["legacy", "legacy-2"], "the old directory or the pending link was left behind"
    assert _versions(store) == {"legacy": content_version(*NEW)}
    store.delete("legacy-2")
    assert _entries(store) == ["legacy"] and store.names() == ["legacy"]


def test_a_failed_replace_changes_nothing(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path / "store")
    store.save("a1", *OLD)
    _plain_directory(store, "legacy", OLD)
    real_rename = os.rename

    def last_rename_fails(src, dst):
        if Path(dst).name in ("a1", "legacy") and not Path(src).name.startswith(".trash-"):  # the new version's link
            raise OSError(errno.EIO, "simulated rename failure")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", last_rename_fails)
    for name in ("a1", "legacy"):
        with pytest.raises(OSError, match="simulated"):
            store.replace(name, *NEW)
    monkeypatch.undo()
    assert _files(store, "a1") == OLD and _files(store, "legacy") == OLD
    assert not (store.root / "legacy").is_symlink()
    assert _entries(store) == ["a1", "legacy"]
    assert _versions(store) == {"a1": content_version(*OLD)}, "the new version's files were kept"


_DURABLE_STEPS = [(os, "rename"), (os, "symlink"), (os, "mkdir"), (os, "fsync"), (os, "unlink"), (os, "rmdir")]


def _crash_at(step: int, action) -> int:
    """Run `action` in a forked child that dies (os._exit, no clean-up of any kind) just before its
    `step`-th file-system step; the child's exit code: 17 if it died, 0 if `action` finished first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads: the child only touches files
        pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            count = [0]
            for module, name in _DURABLE_STEPS:
                real = getattr(module, name)

                def step_then(*args, _real=real, **kwargs):
                    if count[0] == step:
                        os._exit(17)
                    count[0] += 1
                    return _real(*args, **kwargs)

                setattr(module, name, step_then)
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("layout", ["symlink", "plain-directory"])
def test_a_crash_at_any_step_of_a_replace_leaves_old_or_new(tmp_path, layout):
    """Killed before each file-system step of a replace in turn, then restarted (the sweep): the
    adapter is there, whole, as the old version or the new one; nothing else is left behind."""
    outcomes = []
    for step in range(100):
        root = tmp_path / f"store-{step}"
        store = AdapterStore(root)
        store.save("other", b"{}", b"w")
        if layout == "symlink":
            store.save("a1", *OLD)
        else:
            _plain_directory(store, "a1", OLD)
        code = _crash_at(step, lambda: store.replace("a1", *NEW))
        assert code in (0, 17), f"step {step}: the child failed with {code}"
        restarted = AdapterStore(root)
        assert restarted.names() == ["a1", "other"], f"step {step}"
        files = _files(restarted, "a1")
        assert files in (OLD, NEW), f"step {step}: a mix of two versions: {files}"
        assert _entries(restarted) == ["a1", "other"], f"step {step}: left behind"
        versions = _versions(restarted)
        if files == NEW:
            assert versions["a1"] == content_version(*NEW)
        outcomes.append(files)
        restarted.replace("a1", *NEW)  # and the store still works
        assert _files(restarted, "a1") == NEW
        if code == 0:
            break
    else:
        raise AssertionError("the replace never finished")
    assert outcomes[0] == OLD and outcomes[-1] == NEW and len(outcomes) > 5, outcomes


def test_sweep_finishes_or_drops_an_interrupted_replace(tmp_path):
    """What a crash can leave, by hand: a pending link with the old directory moved to the trash
    (finished: the new version), a pending link with the old one still in place (dropped), and
    version directories no adapter refers to (removed)."""
    root = tmp_path / "store"
    store = AdapterStore(root)
    store.save("forward", *NEW)
    store.save("back", *NEW)
    store.save("kept", *OLD)
    for name in ("forward", "back"):
        os.rename(root / name, root / f".pending-{name}")
    _plain_directory(store, "back", OLD)
    (root / ".pending-ghost").symlink_to(".versions/ghost/0123")  # to nothing
    (root / ".versions" / "kept" / "feedfacefeedface").mkdir()  # an interrupted replace's new version
    (root / ".versions" / "gone" / "0000").mkdir(parents=True)  # an interrupted save's
    (root / ".tmp-link").symlink_to(".versions/kept")
    restarted = AdapterStore(root)
    assert restarted.names() == ["back", "forward", "kept"]
    assert _files(restarted, "forward") == NEW and _files(restarted, "back") == OLD and _files(restarted, "kept") == OLD
    assert _entries(restarted) == ["back", "forward", "kept"]
    assert _versions(restarted) == {"forward": content_version(*NEW), "kept": content_version(*OLD)}


def test_external_symlinks_are_adapters_and_left_alone(tmp_path):
    """An operator's symlink to a folder elsewhere: read, replaced and deleted as a link; its folder is untouched."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / CONFIG_FILE).write_bytes(OLD[0])
    (elsewhere / WEIGHTS_FILE).write_bytes(OLD[1])
    store = AdapterStore(tmp_path / "store")
    (store.root / "linked").symlink_to(elsewhere)
    (store.root / "linked-2").symlink_to(elsewhere)
    assert AdapterStore(tmp_path / "store").names() == ["linked", "linked-2"]
    store.replace("linked", *NEW)
    assert _files(store, "linked") == NEW
    store.delete("linked-2")
    assert store.names() == ["linked"]
    assert (elsewhere / CONFIG_FILE).read_bytes() == OLD[0] and (elsewhere / WEIGHTS_FILE).read_bytes() == OLD[1]
