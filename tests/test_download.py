"""`corral download`: file selection, disk-space check, resume and CLI, with a fake hub (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from corral.app.cli.main import cli
from corral.convert import atomic
from corral.convert import download as dl
from corral.convert.errors import InsufficientDisk, UsageError

# The file list of meta-llama/Llama-3.1-405B-Instruct as the hub reports it (sizes rounded).
GB = 10**9
REPO_405B = [
    dl.RepoFile(".gitattributes", 1_519),
    dl.RepoFile("LICENSE", 7_627),
    dl.RepoFile("README.md", 42_000),
    dl.RepoFile("USE_POLICY.md", 4_691),
    dl.RepoFile("config.json", 1_000),
    dl.RepoFile("generation_config.json", 184),
    dl.RepoFile("model.safetensors.index.json", 119_000),
    dl.RepoFile("special_tokens_map.json", 296),
    dl.RepoFile("tokenizer.json", 9_085_657),
    dl.RepoFile("tokenizer_config.json", 55_351),
    *[dl.RepoFile(f"model-{i:05d}-of-00191.safetensors", 4 * GB + i) for i in range(1, 192)],
    *[dl.RepoFile(f"original/mp16/consolidated.{i:02d}.pth", 50 * GB) for i in range(16)],
    dl.RepoFile("original/params.json", 300),
    dl.RepoFile("original/tokenizer.model", 2_183_982),
]


def test_selects_only_what_conversion_needs() -> None:
    chosen = [f.path for f in dl.select_files(REPO_405B)]
    assert chosen[:9] == ["LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
                          "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json",
                          "tokenizer_config.json"]
    assert len(chosen) == 9 + 191 and chosen[-1] == "model-00191-of-00191.safetensors"
    assert not any(p.startswith("original/") or p == ".gitattributes" for p in chosen)
    with_orig = [f.path for f in dl.select_files(REPO_405B, include_original=True)]
    assert "original/tokenizer.model" in with_orig and len(with_orig) == len(chosen) + 18


def test_rejects_repos_without_weights_or_config() -> None:
    with pytest.raises(UsageError, match="no safetensors"):
        dl.select_files([dl.RepoFile("config.json", 1), dl.RepoFile("pytorch_model.bin", 10)])
    with pytest.raises(UsageError, match="no config.json"):
        dl.select_files([dl.RepoFile("model.safetensors", 10)])


class FakeHub:
    def __init__(self, files: list[dl.RepoFile]) -> None:
        self.files = files
        self.fetched: list[str] = []
        self.tokens: set[str | None] = set()

    def list(self, repo: str, token: str | None, revision: str | None) -> list[dl.RepoFile]:
        self.tokens.add(token)
        return self.files

    def fetch(self, repo: str, name: str, dest: Path, token: str | None, revision: str | None) -> None:
        self.fetched.append(name)
        size = next(f.size for f in self.files if f.path == name)
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(b"x" * size)


SMALL_REPO = [dl.RepoFile("config.json", 10), dl.RepoFile("tokenizer.json", 20),
              dl.RepoFile("model-00001-of-00002.safetensors", 1000), dl.RepoFile("model-00002-of-00002.safetensors", 500),
              dl.RepoFile("original/consolidated.00.pth", 5000)]


def test_space_check_happens_before_any_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = FakeHub(REPO_405B)
    free = 700 * GB  # the 405B BF16 weights are ~764 GB
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**13, 10**13 - free, free))
    with pytest.raises(InsufficientDisk, match=r"need 764,[\d,]+ bytes, 700,000,000,000 free"):
        dl.download_repo("meta-llama/Llama-3.1-405B-Instruct", tmp_path, lister=hub.list, fetcher=hub.fetch)
    assert hub.fetched == []


def test_download_resumes_and_skips_complete_files(tmp_path: Path) -> None:
    hub = FakeHub(SMALL_REPO)
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)  # already complete
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 10)  # partial: fetched again
    seen: list[tuple[int, int]] = []
    result = dl.download_repo("o/r", tmp_path, lister=hub.list, fetcher=hub.fetch,
                              progress=lambda d, t, w="": seen.append((d, t)))
    assert hub.fetched == ["config.json", "tokenizer.json", "model-00002-of-00002.safetensors"]
    assert result.bytes_total == 1530 and result.bytes_fetched == 530
    assert seen[0] == (1000, 1530) and seen[-1] == (1530, 1530)
    assert dl.missing_bytes(dl.select_files(SMALL_REPO), tmp_path) == 0


def test_bad_repo_id() -> None:
    with pytest.raises(UsageError, match="repository id"):
        dl.download_repo("just-a-name", Path("/nonexistent"), lister=FakeHub([]).list, fetcher=FakeHub([]).fetch)


def test_cli_download_uses_token_and_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = FakeHub(SMALL_REPO)
    real = dl.download_repo
    monkeypatch.setattr(dl, "download_repo", lambda *a, **k: real(*a, lister=hub.list, fetcher=hub.fetch, **k))
    monkeypatch.setenv("HF_TOKEN", "hf_env_token")
    res = CliRunner().invoke(cli, ["download", "o/r", "--dir", str(tmp_path / "m"), "--json", "--include-original"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["bytes_total"] == 6530 and "original/consolidated.00.pth" in payload["files"]
    assert (tmp_path / "m" / "original" / "consolidated.00.pth").stat().st_size == 5000
    assert hub.tokens == {"hf_env_token"}
