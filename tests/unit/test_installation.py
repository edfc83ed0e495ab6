"""The install manifest and uninstall's decisions (pure)."""

from __future__ import annotations

import json

import pytest

from diversityd.installation import (
    KEEP,
    NOTHING,
    REMOVE,
    RESTORE,
    AdoptedUnit,
    Manifest,
    ManifestError,
    WrittenFile,
    check_restored,
    missing_links,
    plan_adopted_files,
    plan_written_files,
    sha256_bytes,
    stop_order,
)

NATIVE = AdoptedUnit(
    unit="llama-cpp-native.service",
    path="/u/llama-cpp-native.service",
    sha256=sha256_bytes(b"unit"),
    backup="/s/install/backup/llama-cpp-native.service.abc",
    unit_file_state="enabled",
    active_state="active",
    links=(("/u/default.target.wants/llama-cpp-native.service", "/u/llama-cpp-native.service"),),
    ports=(8080,),
    replaced_by="diversityd-llama_cpp_native.service",
    mode=0o640,
)
MANIFEST = Manifest(
    config_dir="/c",
    unit_dir="/u",
    written=(
        WrittenFile("/u/diversityd.service", sha256_bytes(b"daemon")),
        WrittenFile(
            "/c/diversityd.yaml", sha256_bytes(b"new"), "/s/backup/diversityd.yaml.1", 0o600, 0o644
        ),
        WrittenFile("/c/master.key", sha256_bytes(b"key"), None, 0o600),
    ),
    adopted=(NATIVE,),
    drop_in_dirs=("/u/diversityd-x.service.d",),
)


def test_the_manifest_round_trips() -> None:
    assert Manifest.from_json(MANIFEST.to_json(), "/s/m.json") == MANIFEST


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{", "not a diversityd install manifest"),
        ("[]", "not a diversityd install manifest"),
        ('{"version": 99}', "manifest version 99"),
        ('{"version": 1}', "KeyError"),
        (
            '{"version": 1, "config_dir": "/c", "unit_dir": "/u", "adopted": [{"x": 1}]}',
            "TypeError",
        ),
    ],
)
def test_a_broken_manifest_names_its_file_and_the_fix(text: str, says: str) -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.from_json(text, "/s/install/manifest.json")
    assert "/s/install/manifest.json" in str(caught.value)
    assert says in str(caught.value)
    assert caught.value.hint


def test_a_second_install_keeps_the_first_backup_and_record() -> None:
    rewritten = MANIFEST.with_written(
        [WrittenFile("/c/diversityd.yaml", sha256_bytes(b"newer"), "/s/backup/ours", 0o600, 0o600)]
    )
    entry = next(w for w in rewritten.written if w.path == "/c/diversityd.yaml")
    assert entry.sha256 == sha256_bytes(b"newer")
    assert (entry.backup, entry.backup_mode) == ("/s/backup/diversityd.yaml.1", 0o644)
    later = AdoptedUnit(
        **{**vars(NATIVE), "unit_file_state": "disabled", "active_state": "inactive"}
    )
    assert rewritten.with_adopted([later]).adopted == (NATIVE,)
    assert MANIFEST.with_drop_in_dirs(["/u/diversityd-x.service.d", "/u/y.d"]).drop_in_dirs == (
        "/u/diversityd-x.service.d",
        "/u/y.d",
    )


def test_files_install_wrote_are_removed_restored_or_kept() -> None:
    current = {
        "/u/diversityd.service": sha256_bytes(b"daemon"),  # as written: removed
        "/c/diversityd.yaml": sha256_bytes(b"new"),  # as written, had a backup: restored
        "/c/master.key": sha256_bytes(b"edited"),  # changed since: kept
    }
    actions = {a.path: a for a in plan_written_files(MANIFEST, current)}
    assert actions["/u/diversityd.service"].action == REMOVE
    restored = actions["/c/diversityd.yaml"]
    assert (restored.action, restored.backup, restored.mode) == (
        RESTORE,
        "/s/backup/diversityd.yaml.1",
        0o644,
    )
    assert actions["/c/master.key"].action == KEEP
    gone = {a.path: a.action for a in plan_written_files(MANIFEST, {})}
    assert gone == {
        "/u/diversityd.service": NOTHING,
        "/c/diversityd.yaml": RESTORE,
        "/c/master.key": NOTHING,
    }


def test_adopted_unit_files_are_put_back_when_changed_or_gone() -> None:
    assert [a.action for a in plan_adopted_files(MANIFEST, {NATIVE.path: NATIVE.sha256})] == [
        NOTHING
    ]
    for now in (None, sha256_bytes(b"edited")):
        (action,) = plan_adopted_files(MANIFEST, {NATIVE.path: now})
        assert (action.action, action.backup) == (RESTORE, NATIVE.backup)


def test_enabling_links_to_remake() -> None:
    link, target = NATIVE.links[0]
    assert missing_links(MANIFEST, {link: target}) == []
    (todo,) = missing_links(MANIFEST, {link: None})
    assert (todo.link, todo.target) == (link, target)


def test_the_daemon_stops_first() -> None:
    names = [
        "diversityd-native.service",
        "diversityd-gateway.socket",
        "diversityd-gateway@blue.service",
        "diversityd.service",
    ]
    assert stop_order(names) == [
        "diversityd.service",
        "diversityd-gateway@blue.service",
        "diversityd-gateway.socket",
        "diversityd-native.service",
    ]


def test_restored_state_is_checked() -> None:
    assert check_restored(NATIVE, "enabled", "active").ok
    check = check_restored(NATIVE, "disabled", "inactive")
    assert not check.ok
    assert check.problems == ("was enabled, is disabled", "was active, is inactive")
    stopped = AdoptedUnit(
        **{**vars(NATIVE), "unit_file_state": "disabled", "active_state": "inactive"}
    )
    assert check_restored(stopped, "disabled", "inactive").ok


def test_the_manifest_holds_no_unit_text() -> None:
    document = json.loads(MANIFEST.to_json())
    assert set(document["adopted"][0]) >= {"unit", "sha256", "backup", "links", "ports", "mode"}
    assert "text" not in json.dumps(document)
