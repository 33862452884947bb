"""An HF model's ``config.json``, read in one place: parsed, checked for the Qwen2 fields, errors naming the file.

Owns ``read_hf_config`` (a model directory or the file itself) and ``check_hf_config`` (a config
that came from elsewhere, e.g. a Megatron checkpoint's ``extra``). Every reader of ``config.json``
goes through here: ``plan``, the trainer, ``convert``, ``mcore.model.Qwen2Arch`` and the bridge's
HF export. Standard library only and no project imports, so ``plan`` still runs on a laptop and
every layer may import it.

Only the fields every consumer indexes are required (``REQUIRED``); the optional ones
(``num_key_value_heads``, ``tie_word_embeddings``, ``rope_theta``, ``rms_norm_eps``, ...) keep the
defaults ``Qwen2Arch`` gives them. The architecture itself (Qwen2, SwiGLU, no sliding window) is
``Qwen2Arch.from_hf``'s check.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
POSITIVE_IF_SET = ("num_key_value_heads",)
_FIX = "re-download the model or re-export it (megatron-fipo convert --to-hf)"


def read_hf_config(path: str | os.PathLike, *, hint: str = "") -> dict:
    """The validated ``config.json`` of an HF model directory (or the file itself).

    Args:
        path: a model directory or a ``config.json``.
        hint: appended to the "no config.json" error (e.g. which option to pass instead).

    Raises:
        ValueError: naming the file: missing, not UTF-8, not JSON (with line and column), not an
            object, or without a required field (listed) / with a non-positive size.
    """
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"no HF config.json at {file!r}{hint}")
    with open(file, "rb") as fh:
        data = fh.read()
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}); {_FIX}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); {_FIX}") from None
    check_hf_config(config, file)
    return config


def check_hf_config(config: Any, where: str) -> None:
    """``ValueError`` naming ``where`` unless ``config`` is an object with every ``REQUIRED`` size >= 1."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: an HF config must be a JSON object, got {type(config).__name__}; {_FIX}")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} (a Qwen2 config.json needs {', '.join(REQUIRED)}); "
                         f"{_FIX}")
    for key in REQUIRED + tuple(k for k in POSITIVE_IF_SET if config.get(k) is not None):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}; {_FIX}")
