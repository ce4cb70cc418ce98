"""What token ids the model under test has: its vocabulary size and its special ids.

Completions prompts are random token ids (``load.scenarios``); an id the model does not
have is an error (vLLM: "Token id 29919 is out of vocabulary") on every request. The
size is learnt, first source that knows:

1. given: ``--infmax-vocab-size`` (``INFMAX_VOCAB_SIZE``, ini ``infmax_vocab_size``,
   ``vocab_size=`` in ``@pytest.mark.infmax_server``);
2. the model's folder on this machine: ``config.json``'s ``vocab_size`` (or its
   ``text_config``'s) and the tokenizer's size from ``tokenizer.json`` (its vocabulary
   and added tokens), the smaller of the two, so an id is valid for both the tokenizer
   and the embedding. The folder is the model path when it is a directory; else the
   ``root`` that vLLM's ``/v1/models`` reports, for a server on this machine (started
   here, or an endpoint on a loopback address); else a Hugging Face id found in the
   local Hugging Face cache;
3. the embedded simulator: any id is valid;
4. otherwise unknown.

Special ids (``tokenizer.json``'s added tokens marked special, ``tokenizer_config.json``'s
``added_tokens_decoder``, ``config.json``'s bos/eos/pad ids) are read from the same folder
whenever it is found, also when the size is given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Vocabulary:
    """The model's token ids as far as they are known; ``size`` None: unknown."""

    size: int | None
    special_ids: tuple[int, ...] = ()
    source: str = "unknown"
    any_id: bool = False  # the server takes any id (the simulator)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "special_ids": len(self.special_ids), "source": self.source}


SIMULATOR = Vocabulary(None, (), "the embedded simulator (any token id)", any_id=True)
UNKNOWN = Vocabulary(None, (), "vocabulary unknown")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _ints(values: Iterable[Any]) -> set[int]:
    return {v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0}


def _config_vocab(config: Any) -> tuple[int | None, set[int]]:
    """config.json's vocabulary size and special ids (bos/eos/pad; a list for eos in some models)."""
    if not isinstance(config, Mapping):
        return None, set()
    specials: set[int] = set()
    size = None
    for part in (config, config.get("text_config")):
        if not isinstance(part, Mapping):
            continue
        if size is None and _ints([part.get("vocab_size")]):
            size = int(part["vocab_size"])
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            value = part.get(key)
            specials |= _ints(value if isinstance(value, list) else [value])
    return size, specials


def _tokenizer_vocab(folder: Path) -> tuple[int | None, set[int]]:
    """The tokenizer's size (highest id + 1) and its special ids, from tokenizer.json and tokenizer_config.json."""
    size = None
    specials: set[int] = set()
    tok = _json(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    if isinstance(tok, Mapping):
        ids: set[int] = set()
        model = tok.get("model")
        vocab = model.get("vocab") if isinstance(model, Mapping) else None
        if isinstance(vocab, Mapping):  # WordLevel, WordPiece, BPE: token -> id
            ids |= _ints(vocab.values())
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
            ids |= set(range(len(vocab)))
        for added in tok.get("added_tokens") or []:
            if isinstance(added, Mapping) and _ints([added.get("id")]):
                ids.add(added["id"])
                if added.get("special"):
                    specials.add(added["id"])
        if ids:
            size = max(ids) + 1
    cfg = _json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else None
    decoder = cfg.get("added_tokens_decoder") if isinstance(cfg, Mapping) else None
    if isinstance(decoder, Mapping):
        for key, entry in decoder.items():
            if str(key).isdigit() and (not isinstance(entry, Mapping) or entry.get("special", True)):
                specials.add(int(key))
    return size, specials


def from_folder(folder: Path, size: int | None = None, given: str = "") -> Vocabulary | None:
    """The vocabulary a model folder describes; None when it describes none.

    ``size``, when given (``given`` says where), is kept and only the special ids are read.
    """
    if not folder.is_dir():
        return None
    model_size, specials = _config_vocab(_json(folder / "config.json") if (folder / "config.json").is_file() else None)
    tok_size, tok_specials = _tokenizer_vocab(folder)
    specials |= tok_specials
    if size is not None:
        return Vocabulary(size, tuple(sorted(specials)), f"{given} (special ids from {folder})")
    known = [s for s in (model_size, tok_size) if s is not None]
    if not known:
        return None
    parts = [
        *([f"config.json vocab_size {model_size}"] if model_size is not None else []),
        *([f"tokenizer {tok_size} ids"] if tok_size is not None else []),
    ]
    return Vocabulary(min(known), tuple(sorted(specials)), f"{folder}: {', '.join(parts)}")


def hf_cache_folder(model_id: str, env: Mapping[str, str] | None = None) -> Path | None:
    """The newest snapshot of a Hugging Face model id in the local cache, if it is there."""
    if model_id.count("/") != 1 or model_id.startswith(("/", ".")):
        return None
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        cache = Path(env["HF_HUB_CACHE"])
    elif env.get("HF_HOME"):
        cache = Path(env["HF_HOME"]) / "hub"
    else:
        cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface" / "hub"
    snapshots = cache / f"models--{model_id.replace('/', '--')}" / "snapshots"
    try:
        found = [p for p in snapshots.iterdir() if (p / "config.json").is_file()]
    except OSError:
        return None
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def learn(
    *,
    given_size: int | None,
    given_source: str,
    candidates: Iterable[str | None],
    env: Mapping[str, str] | None = None,
) -> Vocabulary:
    """The vocabulary from the first of ``candidates`` (model paths or ids) that describes one.

    With ``given_size`` the size is that, whatever the folders say; they still give the
    special ids when one is found.
    """
    for candidate in candidates:
        if not candidate:
            continue
        folder = Path(candidate).expanduser()
        if not folder.is_dir():
            folder = hf_cache_folder(candidate, env) or folder
        found = from_folder(folder, given_size, given_source)
        if found is not None:
            return found
    if given_size is not None:
        return Vocabulary(given_size, (), given_source)
    return UNKNOWN
