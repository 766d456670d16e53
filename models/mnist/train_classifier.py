"""Train the MNIST feature classifier that scores the embedded model (class accuracy of generated
digits, and the 128-d feature of the in-domain Frechet distance).

    python -m models.mnist.train_classifier            # about 10 minutes on 1 CPU thread

Deterministic for a seed: initialisation from torch.manual_seed(seed), the data order and the
augmentation (random shifts of up to 2 pixels) from generators seeded by (seed, epoch). Writes
model.safetensors, config.json, training.json and README.md to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

import provenance
from models.mnist import card, data
from models.mnist.architecture import MnistClassifier, count_parameters
from models.mnist.classifier import ARCHITECTURE, DEFAULT_CLASSIFIER, WEIGHTS_FILE

SHIFT = 2


def _shift(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image moved by its own random offset in [-SHIFT, SHIFT]^2 (background = -1 fills in)."""
    batch = images.shape[0]
    padded = F.pad(images, (SHIFT,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * SHIFT + 1, (batch,), generator=generator)
    dy = torch.randint(0, 2 * SHIFT + 1, (batch,), generator=generator)
    rows = (dy.view(-1, 1) + torch.arange(28)).view(batch, 1, 28, 1).expand(batch, 1, 28, 28 + 2 * SHIFT)
    taken = padded.gather(2, rows)
    cols = (dx.view(-1, 1) + torch.arange(28)).view(batch, 1, 1, 28).expand(batch, 1, 28, 28)
    return taken.gather(3, cols)


@torch.no_grad()
def accuracy(model: MnistClassifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Fraction of `images` (float in [-1, 1], (N, 1, 28, 28)) classified as `labels`."""
    model.eval()
    right = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start : start + batch_size])
        right += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return right / images.shape[0]


def train(args: argparse.Namespace) -> float:
    torch.manual_seed(args.seed)
    train_set, test_set = data.load("train", args.data), data.load("test")
    images, labels = train_set.scaled(), train_set.labels
    model = MnistClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    steps_per_epoch = images.shape[0] // args.batch_size
    total = steps_per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total)
    began = time.perf_counter()
    progress = tqdm(total=total, desc="mnist classifier", unit="step", mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for epoch in range(args.epochs):
        generator = torch.Generator().manual_seed(args.seed * 7919 + epoch)
        order = torch.randperm(images.shape[0], generator=generator)
        model.train()
        for k in range(steps_per_epoch):
            index = order[k * args.batch_size : (k + 1) * args.batch_size]
            loss = F.cross_entropy(model(_shift(images[index], generator)), labels[index], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update(1)
        progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    progress.close()
    test_accuracy = accuracy(model, test_set.scaled(), test_set.labels)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    config = {
        "architecture": ARCHITECTURE,
        "feature_dim": MnistClassifier.feature_dim,
        "input": "(B, 1, 28, 28) in [-1, 1]",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    info = {
        "parameters": count_parameters(model),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "augmentation": f"random shifts of up to {SHIFT} pixels; label smoothing 0.05",
        "test_accuracy": test_accuracy,
        "wall_seconds": round(time.perf_counter() - began, 1),
        "device": "cpu",
        "provenance": provenance.collect({k: str(v) for k, v in vars(args).items()}),
    }
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    card.write_classifier_card(out)
    return test_accuracy


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m models.mnist.train_classifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data", type=Path, default=None, help=f"folder of the MNIST IDX files (default {data.SHARED_ROOT})"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_CLASSIFIER)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch-size must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        test_accuracy = train(args)
    except data.MnistDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"test accuracy {test_accuracy:.4f}; written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
