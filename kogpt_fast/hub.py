"""Where a checkpoint is: a local directory, or a model id that the Hugging Face cache already holds.

`checkpoint_dir(path_or_id, revision=..., cache_dir=...)` is the one lookup the model loader, the tokenizer, the
CLI and `convert` share. A path that exists is used as it is (HF does the same; `revision` then has no effect).
Anything else that is a valid hub id ("kakaobrain/kogpt") is looked up with huggingface_hub's own cache lookup
(`snapshot_download(..., local_files_only=True)`: the `models--ORG--NAME/refs/REVISION -> snapshots/SHA/` layout
under `cache_dir`, else HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub; a revision may be a branch,
a tag or a commit sha). Nothing is ever downloaded: a model that is not in the cache raises FileNotFoundError
naming where it looked and the `hf download` command that would fetch it.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path


def checkpoint_dir(path, *, revision: str | None = None, cache_dir=None, subfolder: str | None = None) -> Path:
    """The directory that `path` names (None: the embedded demo checkpoint), plus `subfolder` if given."""
    if path is None:
        from .demo import demo_model_path

        directory = demo_model_path()
    elif not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a checkpoint is a directory path or a hub model id (str), got {type(path).__name__}")
    elif Path(path).exists() or not is_hub_id(os.fspath(path)):
        directory = Path(path)
        if not directory.exists():
            raise FileNotFoundError(
                f"no model directory at {os.fspath(path)} (kogpt-fast reads local checkpoints and the Hugging Face "
                "cache; it never downloads)"
            )
    else:
        directory = cached_snapshot(os.fspath(path), revision=revision, cache_dir=cache_dir)
    if subfolder:
        directory = directory / subfolder
        if not directory.is_dir():
            raise FileNotFoundError(f"no subfolder {subfolder!r} in {directory.parent}")
    return directory


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a hub model id ("name" or "org/name"), by huggingface_hub's own rule."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def cache_root(cache_dir=None) -> Path:
    """The hub cache that a lookup reads: `cache_dir`, else huggingface_hub's (HF_HUB_CACHE / HF_HOME/hub / ~)."""
    from huggingface_hub import constants

    return Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()


def cached_snapshot(repo_id: str, *, revision: str | None = None, cache_dir=None) -> Path:
    """The snapshot directory of `repo_id` at `revision` (default "main") in the local cache; never downloads."""
    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError as e:
        repo = cache_root(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        if isinstance(e, getattr(errors, "IncompleteSnapshotError", ())):  # a download that did not finish
            found = f"its snapshot there is incomplete ({str(e).split(': ', 1)[-1].split('. ')[0]})"
        elif not repo.is_dir():
            found = f"there is no {repo}"
        else:
            refs = sorted(p.name for p in (repo / "refs").glob("*")) if (repo / "refs").is_dir() else []
            found = f"{repo} has no snapshot for revision {revision or 'main'!r} (revisions there: " + (
                ", ".join(refs) or "none") + ")"
        command = ["hf", "download", repo_id]
        if revision is not None:
            command += ["--revision", revision]
        if cache_dir is not None:
            command += ["--cache-dir", os.fspath(cache_dir)]
        what = repr(repo_id) + (f" at revision {revision!r}" if revision is not None else "")
        raise FileNotFoundError(
            f"{what} is neither a local directory nor in the Hugging Face cache: {found}. kogpt-fast never "
            f"downloads; fetch it with:  {shlex.join(command)}"
        ) from None
