"""Where a captioner's remaining loss is: per-token cross-entropy and accuracy on validation captions.

    python tools/token_loss.py runs/scenes/best [--data data/scenes] [--n 250] [--top 25]

Runs the checkpoint teacher-forced on n canonical validation captions and groups the loss by the target
token, largest share first: which words (shapes, relation words, counts) the model has not learned yet.
"""

import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F

from nanovlm.data import PackedSplit, prepare
from nanovlm.loader import Loader
from nanovlm.vlm import IGNORE, VLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="a saved model directory, e.g. runs/scenes/best")
    p.add_argument("--data", default="data/scenes", help="dataset root whose val split is scored")
    p.add_argument("--n", type=int, default=250, help="validation captions to score")
    p.add_argument("--top", type=int, default=25, help="tokens to print")
    args = p.parse_args()

    model, tok = VLM.load(args.ckpt)
    split = PackedSplit(prepare(args.data, "val", model.cfg.vit.image_size))  # as `nanovlm eval` finds it
    loader = Loader(split, tok, args.n, model.cfg.max_text_len, first_caption_prob=1.0, seed=5)
    batch = loader.batch(0)
    with torch.no_grad():
        logits, _ = model(batch["images"], batch["input_ids"])
    targets = batch["targets"].flatten()
    losses = F.cross_entropy(logits.flatten(0, 1), targets, ignore_index=IGNORE, reduction="none")
    right = logits.flatten(0, 1).argmax(-1) == targets

    per_token = defaultdict(lambda: [0.0, 0, 0])  # token -> [loss sum, count, correct]
    for t, loss, ok in zip(targets.tolist(), losses.tolist(), right.tolist(), strict=True):
        if t == IGNORE:
            continue
        entry = per_token["<end>" if t == tok.eot else repr(tok.decode([t]))]
        entry[0] += loss
        entry[1] += 1
        entry[2] += ok
    total = sum(e[0] for e in per_token.values())
    print(f"{args.ckpt}: {total / args.n:.3f} nats per caption over {args.n} validation captions")
    print(f"{'token':<14}{'share':>7}{'mean loss':>11}{'right':>7}{'count':>7}")
    for token, (loss, n, ok) in sorted(per_token.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{token:<14}{loss / total:>7.1%}{loss / n:>11.3f}{ok / n:>7.0%}{n:>7}")


if __name__ == "__main__":
    main()
