"""Hugging Face Hub side of a release: upload the written hub layout, and `load` with helpful errors."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO_TYPE = "dataset"
GATED_MODES = ("auto", "manual")


class HubAccessError(PermissionError):
    """A Hub dataset needs a token or an accepted access request; the message says what to do."""


@dataclass(frozen=True)
class PushConfig:
    """Where and how to upload a release folder.

    Attributes:
        repo_id: ``ORG/NAME`` of the dataset repository (created when missing).
        private: create the repository private (the default; pass ``False`` to publish).
        gated: ``None`` (not gated), ``"auto"`` (access granted on accepting the card's agreement)
            or ``"manual"`` (each request approved by the owners).
        commit_message: the commit's message.
    """

    repo_id: str
    private: bool = True
    gated: str | None = None
    commit_message: str = "Upload SafetyPairs release"

    def __post_init__(self) -> None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(self.repo_id)
        except HFValidationError as err:
            raise ValueError(f"invalid repo id {self.repo_id!r}: {err}") from None
        if "/" not in self.repo_id:
            raise ValueError(f"repo id must be ORG/NAME, got {self.repo_id!r}")
        if self.gated not in (None, *GATED_MODES):
            raise ValueError(f"gated must be None or one of {GATED_MODES}, got {self.gated!r}")


def layout_files(out_dir: str | Path) -> dict[str, Path]:
    """Every file of a written release folder, keyed by its path in the repository (POSIX, sorted).

    Args:
        out_dir: a folder written by `release.publish.write_release`.

    Returns:
        ``{path_in_repo: local path}``.

    Raises:
        FileNotFoundError: if the folder holds no ``README.md``.

    Hidden files and folders (``.cache``, a writer's ``.lock``) are left out.
    """
    root = Path(out_dir)
    if not (root / "README.md").is_file():
        raise FileNotFoundError(f"{root} is not a release folder (no README.md); run write_release first")
    files = (p for p in root.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts))  # .cache, a writer's .lock
    return {p.relative_to(root).as_posix(): p for p in sorted(files)}


def _resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubAccessError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    return token


def push_release(out_dir: str | Path, config: PushConfig, token: str | None = None) -> str:
    """Upload a written release folder (card + every config's parquet shards) in one commit.

    The repository gets exactly the dry-run layout; older ``data/`` files not in it are deleted in
    the same commit. The token (argument, ``HF_TOKEN`` or the saved login) is never logged.

    Args:
        out_dir: a folder written by `release.publish.write_release`.
        config: repository, visibility and gating.
        token: a Hub token; ``None`` uses the usual huggingface_hub resolution.

    Returns:
        The commit's URL.

    Raises:
        HubAccessError: if no token is available, or the Hub refuses it.
        ConnectionError: when the Hub cannot be reached (no network, offline mode).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    files = layout_files(out_dir)
    api = HfApi(token=_resolve_token(token))
    try:
        api.create_repo(config.repo_id, repo_type=REPO_TYPE, private=config.private, exist_ok=True)
        stale = [f for f in api.list_repo_files(config.repo_id, repo_type=REPO_TYPE)
                 if f.startswith("data/") and f not in files]
        operations = [CommitOperationDelete(path_in_repo=f) for f in stale]
        operations += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in files.items()]
        info = api.create_commit(config.repo_id, operations, commit_message=config.commit_message,
                                 repo_type=REPO_TYPE)
        if config.gated:
            api.update_repo_settings(config.repo_id, gated=config.gated, repo_type=REPO_TYPE)
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", "?")
        raise HubAccessError(f"the Hub refused the upload to {config.repo_id} (HTTP {status}); check that your "
                             "token has write access to that namespace") from None
    except (HTTPError, ConnectionError) as err:  # the transport failed (HfHubHTTPError, a reply, is above)
        raise ConnectionError(f"cannot reach the Hub to push {config.repo_id}: {type(err).__name__}: "
                              f"{' '.join(str(err).split())}") from None
    logger.info("pushed %d files to %s (%s%s)", len(files), config.repo_id,
                "private" if config.private else "public", f", gated={config.gated}" if config.gated else "")
    return str(getattr(info, "commit_url", info))


def load(path_or_repo: str, config: str = "pairs", split: str | None = None, **kwargs: Any) -> Any:
    """Load a SafetyPairs release (a local folder or a Hub repo): `engine.datafiles.load_release`, with the steps
    to get access when the repository is gated or private.

    Args:
        path_or_repo: a release folder or ``ORG/NAME``.
        config: ``"pairs"`` (default), ``"images"`` or ``"rejected"``.
        split: one split, ``"auto"`` (``test``, else ``train``), or ``None`` for a `DatasetDict`.
        **kwargs: passed to `datasets.load_dataset` (``token``, ``revision``, ``cache_dir`` ...).

    Returns:
        A `Dataset` or `DatasetDict`.

    Raises:
        ValueError: when the release has no such config.
        HubAccessError: if the repository is gated or private and no valid token was given, with
            the steps to get access.
    """
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import GatedRepoError

    from safetypairs.engine.datafiles import load_release

    try:
        loaded = load_release(path_or_repo, config, split, **kwargs)
    except (DatasetNotFoundError, GatedRepoError) as err:
        gated = isinstance(err, GatedRepoError) or isinstance(err.__cause__, GatedRepoError) or "gated" in str(err)
        if not gated and Path(path_or_repo).exists():
            raise
        url = f"https://huggingface.co/datasets/{path_or_repo}"
        what = "is gated" if gated else "was not found or is private"
        raise HubAccessError(
            f"{path_or_repo} {what}: open {url}, accept the research-use agreement (gated repos), then log in "
            "with `hf auth login` or set HF_TOKEN (or pass token=...) and load again"
        ) from err
    if loaded is None:
        raise ValueError(f"{path_or_repo} has no {config!r} config; a release has pairs, images and rejected")
    return loaded
