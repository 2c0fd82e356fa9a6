"""Push and load: the commit gets exactly the dry-run layout; the token never leaks; gated repos explain themselves."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub import HfApi
from release_rows import validated_rows

import safetypairs
from safetypairs.cli import main
from safetypairs.release.hub import HubAccessError, PushConfig, layout_files, push_release

TOKEN = "hf_TESTsecretTOKEN0123456789abcdefXYZ"


class FakeHub:
    """Records what HfApi would send; replaces only the network calls."""

    def __init__(self, monkeypatch, existing=("data/pairs/test-00000-of-00009.parquet", "README.md")):
        self.calls: dict[str, object] = {}
        self.tokens: set = set()
        self.uploaded: dict[str, bytes] = {}
        hub = self

        def create_repo(api, repo_id, **kw):
            hub.tokens.add(api.token)
            hub.calls["create_repo"] = (repo_id, kw)

        def list_repo_files(api, repo_id, **kw):
            return list(existing)

        def create_commit(api, repo_id, operations, **kw):
            hub.calls["commit"] = (repo_id, list(operations), kw)
            hub.uploaded = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes()  # what the upload sends, now
                            for op in operations if hasattr(op, "path_or_fileobj")}
            return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/datasets/{repo_id}/commit/abc"})()

        def update_repo_settings(api, repo_id, **kw):
            hub.calls["settings"] = (repo_id, kw)

        for name, fn in [("create_repo", create_repo), ("list_repo_files", list_repo_files),
                         ("create_commit", create_commit), ("update_repo_settings", update_repo_settings)]:
            monkeypatch.setattr(HfApi, name, fn)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("hub") / "validated"
    validated_rows(n_sources=6).save_to_disk(str(path))
    return path


def _all_text(root) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_push_commits_exactly_the_dry_run_layout(saved, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    dry, pushed = tmp_path / "dry", tmp_path / "pushed"
    assert main(["release", str(saved), "--out", str(dry), "--push", "org/sp", "--gated", "--dry-run"]) == 0
    hub = FakeHub(monkeypatch)
    assert main(["release", str(saved), "--out", str(pushed), "--push", "org/sp", "--gated"]) == 0
    repo_id, operations, _ = hub.calls["commit"]
    adds = {op.path_in_repo: op for op in operations if hasattr(op, "path_or_fileobj")}
    deletes = [op.path_in_repo for op in operations if not hasattr(op, "path_or_fileobj")]
    expected = layout_files(dry)
    assert repo_id == "org/sp" and sorted(adds) == sorted(expected)
    for rel in adds:
        assert hub.uploaded[rel] == expected[rel].read_bytes() == (pushed / rel).read_bytes(), rel
    assert deletes == ["data/pairs/test-00000-of-00009.parquet"]  # stale shard of an older push
    assert hub.calls["create_repo"] == ("org/sp", {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert hub.calls["settings"] == ("org/sp", {"gated": "auto", "repo_type": "dataset"})
    assert hub.tokens == {TOKEN}
    captured = capsys.readouterr()
    assert "commit/abc" in captured.out
    for text in (captured.out, captured.err, caplog.text):
        assert TOKEN not in text
    assert TOKEN.encode() not in _all_text(dry) + _all_text(pushed)


def test_public_opt_out(saved, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, existing=())
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["-q", "release", str(saved), "--out", str(tmp_path / "o"), "--push", "org/sp", "--public"]) == 0
    assert hub.calls["create_repo"][1]["private"] is False and "settings" not in hub.calls


def test_missing_token_and_refused_upload_are_one_line_errors(saved, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    assert main(["-q", "release", str(saved), "--out", str(out)]) == 0
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(HubAccessError, match="HF_TOKEN"):
        push_release(out, PushConfig("org/sp"))
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(api, repo_id, **kw):
        response = SimpleNamespace(status_code=403, headers={}, request=None)
        raise HfHubHTTPError(f"403 Forbidden for token {api.token}", response=response)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(HubAccessError) as err:
        push_release(out, PushConfig("org/sp"), token=TOKEN)
    assert TOKEN not in str(err.value) and err.value.__suppress_context__ and "403" in str(err.value)


@pytest.mark.parametrize("kwargs", [{"repo_id": "no-namespace"}, {"repo_id": "a/b/c"},
                                    {"repo_id": "org/sp", "gated": "yes"}])
def test_push_config_validation(kwargs):
    with pytest.raises(ValueError):
        PushConfig(**kwargs)


def test_load_local_folder_and_gated_hint(saved, tmp_path, monkeypatch):
    out = tmp_path / "o"
    main(["-q", "release", str(saved), "--out", str(out)])
    images = safetypairs.load(str(out), config="images", split="test")
    assert images.features["label"].names == ["safe", "unsafe"]

    def gated(*args, **kwargs):
        raise DatasetNotFoundError("Dataset 'org/sp' is a gated dataset on the Hub. You must be authenticated.")

    monkeypatch.setattr("datasets.load_dataset", gated)
    monkeypatch.setattr("datasets.get_dataset_config_names", gated)  # the loader asks for the configs first
    with pytest.raises(HubAccessError, match="accept the research-use agreement.*HF_TOKEN"):
        safetypairs.load("org/sp")
