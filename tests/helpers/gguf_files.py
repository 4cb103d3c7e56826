"""Small GGUF files for header tests, written by gguf-py's own writer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFWriter


def write_gguf(path: Path, kvs: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> Path:
    """A llama GGUF with these key/values (int: uint32, str: string, list: array) and tensors, in this order."""
    writer = GGUFWriter(str(path), "llama")
    for key, value in kvs.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
