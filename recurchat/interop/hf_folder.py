"""A transformers model folder (config.json, *.safetensors, tokenizer.json, tokenizer_config.json) read for import.

    hf_config, tensors, tokenizer, meta = read_hf_folder("path/to/SmolLM2-135M")

Weights are read from safetensors only (one file or a sharded index); a folder with only pickled weights
(pytorch_model.bin) is refused, since unpickling runs code. The chat template comes from chat_template.jinja or
tokenizer_config.json, the special tokens from tokenizer.json's added tokens.
Exercise: `pytest tests/interop/test_import.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer

from recurchat.errors import UserError


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e})") from None


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in read_json(index).get("weight_map", {}).values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.glob("*.bin")]
        raise UserError(f"{folder} has no .safetensors weights" + (
            f" (only {pickled[0]}: pickled weights are never loaded; convert them with transformers' "
            "save_pretrained(safe_serialization=True))" if pickled else ""))
    return files


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in weight_files(folder):
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f} is corrupt ({e})") from None
    return tensors


def token_text(value) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict (older files)."""
    return value.get("content", "") if isinstance(value, dict) else (value or "")


def read_hf_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor], HFTokenizer, dict]:
    """(config.json, tensors, tokenizer, metadata: special tokens and template) of a transformers folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a transformers model folder (no config.json)")
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder} has no tokenizer.json (recurchat imports fast tokenizers only)")
    config = read_json(folder / "config.json")
    try:
        tokenizer = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception with a serde message
        raise UserError(f"{folder / 'tokenizer.json'} is corrupt ({str(e).splitlines()[0]})") from None
    tok_cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    template = tok_cfg.get("chat_template", "")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), "")
    specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
    meta = {"specials": specials, "bos_token": token_text(tok_cfg.get("bos_token")),
            "eos_token": token_text(tok_cfg.get("eos_token")), "pad_token": token_text(tok_cfg.get("pad_token")),
            "add_bos_token": bool(tok_cfg.get("add_bos_token", False)), "chat_template": template or ""}
    return config, load_tensors(folder), tokenizer, meta
