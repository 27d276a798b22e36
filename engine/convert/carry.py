"""What travels beside the weights: tokenizer files and the special token ids of config.json.
Neither is needed to compute logits, so both are copied, never interpreted."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from engine.convert.hf import read_json_object
from engine.errors import InputError

# Everything `AutoTokenizer` / `GenerationConfig.from_pretrained` may read from a model folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def tokenizer_files(path: str | Path | None) -> list[Path]:
    """The tokenizer files in a folder, or `path` itself if a file; none for None."""
    if path is None:
        return []
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    raise InputError(f"{path}: no such tokenizer file or folder")


def copy_files(files: list[Path], dest: Path) -> list[str]:
    if not files:  # no empty tokenizer/ folder that would look like one
        return []
    dest.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copyfile(file, dest / file.name)
    return [file.name for file in files]


def token_ids(config: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    """bos/eos/pad ids from `config`, the ones it lacks from `folder`/generation_config.json."""
    ids = {key: config[key] for key in TOKEN_ID_KEYS if config.get(key) is not None}
    generation = folder / "generation_config.json" if folder is not None else None
    if generation is not None and generation.is_file():
        extra = read_json_object(generation)
        ids.update({k: extra[k] for k in TOKEN_ID_KEYS if k not in ids and extra.get(k) is not None})
    return ids
