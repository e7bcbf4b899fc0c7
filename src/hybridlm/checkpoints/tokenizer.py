"""The tokenizer of a checkpoint folder, when it has one (``tokenizer.json``, read by the
``tokenizers`` package: a JSON description, no code from the folder runs)."""

from __future__ import annotations

import shutil
from pathlib import Path

# Files that describe tokenisation and generation defaults; copied along when a folder is converted.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")


def load_tokenizer(folder: str | Path):
    """A ``tokenizers.Tokenizer`` from ``folder/tokenizer.json``, or None when the folder has none.

    Raises ImportError with the install hint when the file exists but ``tokenizers`` is missing.

    Example::

        tok = load_tokenizer("Qwen3-Next-80B-A3B-Instruct")
        ids = tok.encode("Hello").ids          # list[int]
        text = tok.decode(ids)
    """
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError(f"{path} needs the 'tokenizers' package: pip install 'hybridlm[hf]'") from None
    return Tokenizer.from_file(str(path))


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer / generation files that ``src`` has into ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
