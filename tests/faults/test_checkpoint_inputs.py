"""Bad safetensors and bad Hugging Face folders: the validator and `corral convert` refuse them cleanly."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from corral.convert.errors import InvalidSafetensors
from corral.convert.safetensors_io import read_header

from .conftest import assert_clean_failure, fingerprint, invoke_convert, temp_leftovers
from .corpus_inputs import HF_CASES, copy_checkpoint, good_safetensors, replace_shard, safetensors_cases

ST_CASES = [pytest.param(c, id=c.name) for c in safetensors_cases()]


@pytest.mark.parametrize("case", ST_CASES)
def test_safetensors_validator(case, tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(case.data)
    with pytest.raises(InvalidSafetensors) as info:
        read_header(path)
    message = str(info.value)
    assert str(path) in message
    assert re.search(case.expect, message.replace(str(path), "<FILE>"), re.IGNORECASE), message


def test_valid_safetensors_passes(tmp_path: Path) -> None:
    path = tmp_path / "good.safetensors"
    path.write_bytes(good_safetensors())
    header = read_header(path)
    assert list(header.tensors) == ["a", "b"] and header.tensors["b"].nbytes == 8


@pytest.mark.parametrize("case", ST_CASES)
def test_convert_refuses_bad_shard(case, mini_checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_checkpoint(mini_checkpoint, tmp_path / "ckpt")
    shard = replace_shard(folder, case.data)
    before = fingerprint(folder)
    out = tmp_path / "out.gguf"
    result = invoke_convert(folder, out)
    assert_clean_failure(result, names=shard.name)
    assert fingerprint(folder) == before
    assert not out.exists() and not temp_leftovers(tmp_path)


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_convert_refuses_bad_folder(name: str, mini_checkpoint: Path, tmp_path: Path) -> None:
    breaker, expect = HF_CASES[name]
    folder = copy_checkpoint(mini_checkpoint, tmp_path / "ckpt")
    breaker(folder)
    before = fingerprint(folder)
    out = tmp_path / "out.gguf"
    result = invoke_convert(folder, out)
    assert_clean_failure(result, names=None, expect=expect)
    line = result.stderr.strip()
    assert "ckpt" in line, f"the folder or file is not named: {line}"
    assert fingerprint(folder) == before
    assert not out.exists() and not temp_leftovers(tmp_path)


def test_convert_missing_input(tmp_path: Path) -> None:
    result = invoke_convert(tmp_path / "no-such-checkpoint", tmp_path / "out.gguf")
    assert_clean_failure(result, names="no-such-checkpoint", expect=r"not found|no such|does not exist", codes=(2,))
    assert list(tmp_path.iterdir()) == []


def test_convert_input_is_a_file(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    src.write_bytes(good_safetensors())
    result = invoke_convert(src, tmp_path / "out.gguf")
    assert_clean_failure(result, names="model.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
