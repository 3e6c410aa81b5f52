"""Tokenizers: a byte-level default that needs no files, or a checkpoint's `tokenizer.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from fedmoe.model.errors import ModelError


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, then EOS=256, PAD=257, BOS=258 (vocab 259; presets use 320)."""

    vocab_size = 259
    eos_id = 256
    pad_id = 257
    bos_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer loaded from a checkpoint folder's tokenizer.json."""

    def __init__(self, path: Path, *, eos_id: int | None) -> None:
        from tokenizers import Tokenizer as _HFTok

        try:
            self._tok = _HFTok.from_file(str(path))
        except Exception as err:  # the tokenizers package raises a bare Exception on bad files
            raise ModelError(f"{path}: cannot load tokenizer ({err})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if eos_id is None:
            raise ModelError(f"{path.parent / 'config.json'}: eos_token_id is required with a tokenizer.json")
        self.eos_id = eos_id
        self.pad_id = self._find_pad(path) if self._find_pad(path) is not None else eos_id

    def _find_pad(self, path: Path) -> int | None:
        cfg = path.parent / "tokenizer_config.json"
        if cfg.exists():
            pad = json.loads(cfg.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                return self._tok.token_to_id(pad)
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(ckpt_dir: str | Path | None = None, *, eos_id: int | None = None) -> Tokenizer:
    """The checkpoint's tokenizer.json if present, else the byte-level tokenizer.

    eos_id: None = the folder's config.json `eos_token_id` (the first, if a list).
    """
    if ckpt_dir is not None:
        path = Path(ckpt_dir) / "tokenizer.json"
        if path.exists():
            return HFTokenizer(path, eos_id=eos_id if eos_id is not None else _config_eos(Path(ckpt_dir)))
    return ByteTokenizer()


def _config_eos(folder: Path) -> int | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
    return eos[0] if isinstance(eos, list) and eos else eos
