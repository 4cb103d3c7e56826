"""Shared fixtures: miniature Llama 3.1 checkpoints and their GGUF conversions (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.convert.minimodel import MiniSpec, build_checkpoint


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own CORRAL_HOME, so nothing touches the user's data. Planning on detected hardware
    does not time llama.cpp's CPU kernels (seconds per fresh home; tests/test_cpu_rates.py runs it once)."""
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path_factory.mktemp("corral-home")))
    monkeypatch.setenv("CORRAL_CPU_RATES", "off")


@pytest.fixture(scope="session")
def mini_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A default miniature Llama 3.1 instruct checkpoint (BF16, 2 shards, real tokenizer)."""
    return build_checkpoint(tmp_path_factory.mktemp("mini-ckpt") / "Llama-3.1-Mini-Instruct", MiniSpec(), seed=0)


def _convert(src: Path, out: Path, outtype: str) -> Path:
    from corral.convert.converter import convert_checkpoint

    convert_checkpoint(src, out, outtype=outtype)
    return out


@pytest.fixture(scope="session")
def mini_gguf_f32(mini_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The miniature checkpoint converted to an F32 GGUF by corral."""
    return _convert(mini_checkpoint, tmp_path_factory.mktemp("mini-gguf") / "mini-f32.gguf", "f32")


@pytest.fixture(scope="session")
def mini_gguf_bf16(mini_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The miniature checkpoint converted to a BF16 GGUF by corral."""
    return _convert(mini_checkpoint, tmp_path_factory.mktemp("mini-gguf") / "mini-bf16.gguf", "bf16")


@pytest.fixture(scope="session")
def trained_models() -> dict[str, Path]:
    """The trained miniature models' Hugging Face folders by name (built once into the cache, see
    tests/helpers/trained)."""
    from tests.helpers import trained

    return trained.trained_models()


@pytest.fixture(scope="session")
def trained_hf():  # type: ignore[no-untyped-def]
    """`trained_hf(name)`: a trained model's Hugging Face folder (built on first use, cached across sessions)."""
    from tests.helpers import trained

    return trained.trained_hf


@pytest.fixture(scope="session")
def trained_gguf():  # type: ignore[no-untyped-def]
    """`trained_gguf(name, outtype="f32")`: a trained model converted by corral (cached beside the model)."""
    from tests.helpers import trained

    return trained.trained_gguf
