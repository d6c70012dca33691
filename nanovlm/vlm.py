"""The vision-language model: a ViT, a projector and a decoder joined into one sequence.

    image -> ViT -> projector -> image tokens (B, N, D) --+
                                                           +-> [image tokens | text tokens] -> decoder -> logits
    text  -> token ids -> token embeddings (B, T, D) -----+

The decoder reads the image tokens as if they were words that came before the text. Loss is computed on
text positions only: the image tokens are given, not predicted, and padding or the prompt part of a
question carry target -100, which the loss ignores.

A trained model is saved as a directory: model.safetensors (weights, no pickled code), config.json and
tokenizer.tiktoken.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import check_folder, first_line, read_json, read_tokenizer, read_weights, save_folder
from .decoder import Decoder, DecoderConfig, KVCache
from .projector import Projector, ProjectorConfig
from .tokenizer import Tokenizer
from .vit import ViT, ViTConfig

IGNORE = -100  # target value that the loss skips


@dataclass
class VLMConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        for name, cls in (("vit", ViTConfig), ("projector", ProjectorConfig), ("decoder", DecoderConfig)):
            if isinstance(getattr(self, name), dict):  # loaded from config.json
                setattr(self, name, cls(**getattr(self, name)))
        if self.projector.in_dim != self.vit.dim or self.projector.out_dim != self.decoder.dim:
            raise ValueError(
                f"projector maps {self.projector.in_dim} -> {self.projector.out_dim} but the ViT is "
                f"{self.vit.dim} wide and the decoder {self.decoder.dim}; make them match"
            )

    @property
    def n_image_tokens(self) -> int:
        return self.vit.n_patches // self.projector.pixel_shuffle**2

    @property
    def max_text_len(self) -> int:
        return self.decoder.max_seq_len - self.n_image_tokens


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = ViT(cfg.vit)
        self.projector = Projector(cfg.projector)
        self.decoder = Decoder(cfg.decoder)
        self.apply(_init_weights)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, N_img, D) vectors in the decoder's space."""
        return self.projector(self.vit(images))

    def forward(
        self, images: torch.Tensor | None, input_ids: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for the text positions (B, T, V), and the mean loss over targets != -100 if given.

        images=None runs the decoder on text alone (stage 1: language-model pre-training).
        """
        text = self.decoder.embed(input_ids)  # (B, T, D)
        if images is None:
            h = self.decoder.hidden(text)
        else:
            img = self.image_tokens(images)  # (B, N_img, D)
            h = self.decoder.hidden(torch.cat([img, text], dim=1))[:, img.size(1) :]  # text positions only
        logits = self.decoder.head(h)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor | None,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        eot: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Continue each prompt (B, Tp) after its image; returns the new tokens per sample, without eot.

        temperature 0 is greedy decoding. use_cache=False recomputes the whole sequence at every step
        (same tokens, much slower: it is there to show what the KV cache saves).
        """
        B = prompt_ids.size(0)
        seq = self.decoder.embed(prompt_ids)
        if images is not None:
            seq = torch.cat([self.image_tokens(images), seq], dim=1)  # (B, N_img + Tp, D)
        max_new_tokens = min(max_new_tokens, self.cfg.decoder.max_seq_len - seq.size(1))
        cache = KVCache(self.cfg.decoder.n_layers, self.cfg.decoder.max_seq_len) if use_cache else None
        out = torch.empty(B, 0, dtype=torch.long, device=prompt_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
        step_input = seq
        for _ in range(max_new_tokens):
            h = self.decoder.hidden(step_input if use_cache else seq, cache)
            logits = self.decoder.head(h[:, -1]).float()  # (B, V) scores for the next token
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            nxt = nxt.masked_fill(done, eot)  # finished sequences keep emitting eot
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eot
            if done.all():
                break
            step_input = self.decoder.embed(nxt[:, None])  # (B, 1, D): only the new token with a cache
            if not use_cache:
                seq = torch.cat([seq, step_input], dim=1)
        return [_until(row, eot) for row in out.tolist()]

    def save(self, directory: str | Path, tokenizer: Tokenizer) -> None:
        """Write model.safetensors, config.json and tokenizer.tiktoken into directory."""
        save_folder(self, self.cfg, tokenizer, directory)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> tuple["VLM", Tokenizer]:
        """Read a directory written by save(); no pickled code is executed, a damaged file is named."""
        directory = Path(directory)
        check_folder(directory, "model")
        config = directory / "config.json"
        cfg = _read_config(config)
        try:
            model = cls(cfg)
        except (TypeError, ValueError) as e:  # a field of the wrong type fails only when the layers are built
            raise ValueError(f"{config} describes no model that can be built: {first_line(e)}") from e
        read_weights(model, directory / "model.safetensors", device)
        return model.to(device).eval(), _read_tokenizer(directory / "tokenizer.tiktoken", cfg)


def _read_config(path: Path) -> VLMConfig:
    """The VLMConfig in a config.json written by VLM.save; ValueError names the file if it is damaged."""
    raw = read_json(path)
    if isinstance(raw, dict) and raw.get("kind") == "clip":  # what CLIP.save writes
        raise ValueError(
            f"{path} is a contrastive model (CLIP), not a captioner; load it with nanovlm.clip.CLIP.load, "
            "or start a VLM from its ViT"
        )
    parts = ("vit", "projector", "decoder")
    if not isinstance(raw, dict) or sorted(raw) != sorted(parts) or not all(isinstance(raw[p], dict) for p in parts):
        raise ValueError(f"{path} is not a nanovlm config: it must be an object with objects {list(parts)}")
    try:
        return VLMConfig(**raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid nanovlm config: {first_line(e)}") from e


def _read_tokenizer(path: Path, cfg: VLMConfig) -> Tokenizer:
    """The tokenizer saved with a model, checked against the model's vocabulary."""
    tokenizer = read_tokenizer(path)
    if tokenizer.vocab_size != cfg.decoder.vocab_size:
        # a file cut at a line end still parses, and would fail only when the model emits an id it lost
        raise ValueError(
            f"{path} has {tokenizer.vocab_size} tokens but config.json gives the model a vocab_size of "
            f"{cfg.decoder.vocab_size}: the file is cut short or belongs to another model; copy {path.parent} again"
        )
    return tokenizer


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token id per row of (B, V) logits: greedy, or sampled with temperature / top-k / top-p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1) k-th largest score
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        # keep the smallest set of most likely tokens whose probabilities add up to at least top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _until(tokens: list[int], eot: int) -> list[int]:
    return tokens[: tokens.index(eot)] if eot in tokens else tokens


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style initialisation: small normal weights (the linear layers have no biases)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
