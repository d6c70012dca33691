"""A saved model folder: model.safetensors (weights, no pickled code), config.json and tokenizer.tiktoken.

`VLM.save`/`VLM.load` and `CLIP.save`/`CLIP.load` use these functions, so both kinds of model are written the
same way and a damaged or foreign file is named, in one line, whichever kind it belongs to.
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from .tokenizer import Tokenizer

FILES = ("model.safetensors", "config.json", "tokenizer.tiktoken")


def save_folder(model: nn.Module, cfg: object, tokenizer: Tokenizer, directory: str | Path) -> None:
    """Write the model's weights, its config (a dataclass) and its tokenizer into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    tokenizer.save(directory / "tokenizer.tiktoken")


def check_folder(directory: Path, what: str) -> None:
    """FileNotFoundError naming the first of FILES that directory lacks."""
    for name in FILES:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing; is {directory} a saved nanovlm {what}?")


def read_json(path: Path) -> object:
    """config.json as Python values; ValueError naming the file if it is not JSON text."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not JSON text ({first_line(e)}); it is damaged: copy the model again") from e


def read_weights(model: nn.Module, path: Path, device: str) -> None:
    """Load model.safetensors into model, checking the file's header against the model first."""
    try:
        with safe_open(path, "pt") as f:  # reads the header only; fails on a cut, empty or foreign file
            shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a whole safetensors file ({e}); copy it again or train anew") from e
    params = model.state_dict()
    wrong = [name for name, shape in shapes.items() if name in params and list(params[name].shape) != shape]
    if wrong:
        name = wrong[0]
        raise ValueError(
            f"{path} does not fit its config.json: {name} is {shapes[name]} in the file but "
            f"{list(params[name].shape)} in the model ({len(wrong)} tensors differ)"
        )
    missing, unexpected = load_model(model, str(path), strict=False, device=device)
    if missing or unexpected:
        keys = f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        raise ValueError(f"{path} does not fit its config.json: {keys}")


def read_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer saved with a model; the caller checks it against the model's vocabulary."""
    try:
        return Tokenizer.load(path)
    except ValueError as e:
        raise ValueError(f"{e}; copy {path.parent} again") from e


def first_line(error: Exception) -> str:
    """An exception's message cut to its first line, so the error we raise stays one line."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
