"""The media type an object gets from its name: the standard library's table, corrected and
completed for the files ML work is made of (``.pt`` is not a SNES page table)."""

from __future__ import annotations

import mimetypes
import posixpath

DEFAULT = "application/octet-stream"

#: Formats the standard table lacks or gets wrong for ML work.
ML_TYPES: dict[str, str] = {
    ".pt": DEFAULT, ".pth": DEFAULT, ".ckpt": DEFAULT, ".bin": DEFAULT, ".safetensors": DEFAULT,
    ".gguf": DEFAULT, ".ggml": DEFAULT, ".onnx": DEFAULT, ".pb": DEFAULT, ".h5": DEFAULT,
    ".npy": DEFAULT, ".npz": DEFAULT, ".pkl": DEFAULT, ".pickle": DEFAULT, ".msgpack": DEFAULT,
    ".tflite": DEFAULT, ".mlmodel": DEFAULT, ".joblib": DEFAULT,
    ".parquet": "application/vnd.apache.parquet",
    ".arrow": "application/vnd.apache.arrow.file",
    ".feather": "application/vnd.apache.arrow.file",
    ".jsonl": "application/jsonl", ".ndjson": "application/x-ndjson",
    ".yaml": "application/yaml", ".yml": "application/yaml",
    ".md": "text/markdown", ".tsv": "text/tab-separated-values",
}


def content_type_of(path: str) -> str:
    """``model.safetensors`` → ``application/octet-stream``, ``a.parquet`` → Parquet's."""
    ext = posixpath.splitext(path)[1].lower()
    if ext in ML_TYPES:
        return ML_TYPES[ext]
    return mimetypes.guess_type(path, strict=False)[0] or DEFAULT
