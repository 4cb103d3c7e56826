"""Shared fixtures: miniature Llama 3.1 checkpoints and their GGUF conversions (built once per session)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from corral.convert.minimodel import MiniSpec, build_checkpoint


def pytest_configure(config: pytest.Config) -> None:
    """A shell starts background jobs with SIGINT ignored, and children inherit that: the ctrl-c tests need the
    default handler, whoever started the suite."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def _cpu_verdicts(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """This CPU's extra-buffer verdicts (offload/cpu_probe), probed once per session: every load checks them
    (a broken AMX buffer would take the test process down), and a fresh home would probe again."""
    from corral.offload import cpu_probe
    from corral.offload.hardware import Hardware, cpu_info

    home = tmp_path_factory.mktemp("probe-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CORRAL_HOME", str(home))
        flags, name = cpu_info()
        cpu_probe.machine_verdicts(Hardware(cpu_flags=flags, cpu_name=name))
        verdicts = home / "cache" / cpu_probe.PROBE_CACHE_FILE
        return verdicts.read_bytes() if verdicts.is_file() else b""


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
                   _cpu_verdicts: bytes) -> None:
    """Every test gets its own CORRAL_HOME, so nothing touches the user's data; it starts with this CPU's probe
    verdicts. Planning on detected hardware does not time llama.cpp's CPU kernels (seconds per fresh home;
    tests/test_cpu_rates.py runs it once)."""
    from corral.offload import cpu_probe

    home = tmp_path_factory.mktemp("corral-home")
    monkeypatch.setenv("CORRAL_HOME", str(home))
    monkeypatch.setenv("CORRAL_CPU_RATES", "off")
    if _cpu_verdicts:
        (home / "cache").mkdir()
        (home / "cache" / cpu_probe.PROBE_CACHE_FILE).write_bytes(_cpu_verdicts)


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
