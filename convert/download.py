"""Download what conversion needs from a Hugging Face model repository (huggingface_hub).

Only config, tokenizer, generation config, chat template, license and root-level safetensors
(+ index) are fetched; Meta's `original/` folder (consolidated .pth weights) is skipped unless
asked for. Free disk space is checked against the bytes still missing before anything is
fetched; huggingface_hub resumes interrupted files and finds gated-model tokens in the usual
places (HF_TOKEN, `hf auth login`'s token file) when none is given.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .atomic import check_free_space
from .errors import CorralError, UsageError
from .progress import ProgressFn, no_progress

# Exact root files conversion uses (all optional except config/tokenizer, which the converter checks).
ROOT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "model.safetensors.index.json", "LICENSE", "LICENSE.txt",
    "LICENSE.md", "USE_POLICY.md", "README.md",
)  # fmt: skip
WEIGHT_PATTERN = "*.safetensors"


@dataclass(frozen=True)
class RepoFile:
    """A file of a repository and its size in bytes."""

    path: str
    size: int


@dataclass(frozen=True)
class DownloadResult:
    folder: Path
    files: tuple[str, ...]
    bytes_total: int
    bytes_fetched: int


Lister = Callable[[str, str | None, str | None], Sequence[RepoFile]]
Fetcher = Callable[[str, str, Path, str | None, str | None], None]


def select_files(files: Sequence[RepoFile], *, include_original: bool = False) -> list[RepoFile]:
    """The files conversion needs, in a stable order (small files first, then weights by name)."""
    small: list[RepoFile] = []
    weights: list[RepoFile] = []
    for f in files:
        if "/" not in f.path:
            if f.path in ROOT_FILES:
                small.append(f)
            elif fnmatch.fnmatch(f.path, WEIGHT_PATTERN):
                weights.append(f)
        elif include_original and f.path.startswith("original/"):
            weights.append(f)
    names = {f.path for f in small}
    if not weights and not include_original:
        raise UsageError("the repository has no safetensors weights at its root (nothing corral can convert)")
    if "config.json" not in names:
        raise UsageError("the repository has no config.json (not a Hugging Face transformers model)")
    return sorted(small, key=lambda f: f.path) + sorted(weights, key=lambda f: f.path)


def missing_bytes(selected: Sequence[RepoFile], dest: Path) -> int:
    """Bytes still to fetch: files not yet present at their full size in `dest`."""
    total = 0
    for f in selected:
        local = dest / f.path
        if not (local.is_file() and local.stat().st_size == f.size):
            total += f.size
    return total


def hub_list_files(repo_id: str, token: str | None, revision: str | None) -> list[RepoFile]:
    """List a repository's files with sizes (network)."""
    from huggingface_hub import HfApi

    info = _hub_call(lambda: HfApi().model_info(repo_id, revision=revision, token=token, files_metadata=True), repo_id)
    return [RepoFile(s.rfilename, int(s.size or 0)) for s in (info.siblings or [])]


def hub_fetch(repo_id: str, filename: str, dest: Path, token: str | None, revision: str | None) -> None:
    """Download one file into `dest` (resumes partial downloads; network)."""
    from huggingface_hub import hf_hub_download

    _hub_call(lambda: hf_hub_download(repo_id, filename, local_dir=dest, token=token, revision=revision), repo_id)


def _hub_call(fn: Callable[[], object], repo_id: str):  # type: ignore[no-untyped-def]
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return fn()
    except GatedRepoError as exc:
        raise CorralError(
            f"{repo_id} is gated: accept its license on huggingface.co, then pass --token or run `hf auth login`"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise UsageError(f"repository {repo_id} not found (or private: pass --token)") from exc
    except RevisionNotFoundError as exc:
        raise UsageError(f"revision not found in {repo_id}") from exc
    except LocalEntryNotFoundError as exc:
        raise CorralError(f"cannot reach the Hugging Face hub ({exc})") from exc
    except HfHubHTTPError as exc:
        raise CorralError(f"download from {repo_id} failed: {exc}") from exc


def download_repo(
    repo_id: str,
    dest: Path,
    *,
    include_original: bool = False,
    token: str | None = None,
    revision: str | None = None,
    progress: ProgressFn | None = None,
    lister: Lister = hub_list_files,
    fetcher: Fetcher = hub_fetch,
) -> DownloadResult:
    """Fetch the files conversion needs from `repo_id` into `dest`, checking disk space first."""
    if repo_id.count("/") != 1 or any(not part for part in repo_id.split("/")):
        raise UsageError(f"expected a repository id like meta-llama/Llama-3.1-8B-Instruct, got {repo_id!r}")
    report = progress or no_progress
    selected = select_files(lister(repo_id, token, revision), include_original=include_original)
    dest.mkdir(parents=True, exist_ok=True)
    need = missing_bytes(selected, dest)
    check_free_space(dest, need)
    total = sum(f.size for f in selected)
    done = total - need
    report(done, total, "")
    for f in selected:
        local = dest / f.path
        if local.is_file() and local.stat().st_size == f.size:
            continue
        fetcher(repo_id, f.path, dest, token, revision)
        done += f.size
        report(done, total, f.path)
    return DownloadResult(dest, tuple(f.path for f in selected), total, need)
