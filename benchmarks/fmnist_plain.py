"""The recipe of ``configs/fmnist_fast.yaml`` as a plain PyTorch loop in one process.

    python benchmarks/fmnist_plain.py [--target 0.90] [--threads 2] [--out DIR]

The same small residual CNN (``gigatrain.models.ResNet``, a plain ``nn.Module``), the same
Fashion-MNIST tensors, batch 256, AdamW (betas 0.9, 0.99, weight decay 0.05 on the weights only),
the one-cycle learning rate of ``gigatrain.optim.lr_at`` (a pure function), evaluated every
40 steps on the same 9,984 test images; stops when the test accuracy reaches ``--target``. No
gigatrain engine, process group, sampler or loader: the peer the library is compared with.
Prints the training seconds (timed like the library's: from the first step, evaluations
included) and samples to the target.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gigatrain.data.images import FashionMNIST  # noqa: E402
from gigatrain.models import ResNet  # noqa: E402
from gigatrain.optim import lr_at  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--steps", type=int, default=702)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train, test = FashionMNIST(split="train"), FashionMNIST(split="val")
    n_test = len(test) // args.batch * args.batch
    xt, yt = test.get_batch(torch.arange(n_test))
    model = ResNet(widths=(32, 64, 128), depths=(1, 1, 1))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99), eps=1e-8, foreach=True)
    g = torch.Generator().manual_seed(args.seed)
    perm, pos, log = torch.randperm(len(train), generator=g), 0, []
    t0 = time.perf_counter()
    reached = None
    for step in range(args.steps):
        if pos + args.batch > len(perm):
            perm, pos = torch.cat([perm[pos:], torch.randperm(len(train), generator=g)]), 0
        x, y = train.get_batch(perm[pos:pos + args.batch])
        pos += args.batch
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, kind="onecycle", lr=args.lr, total_steps=args.steps)
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            model.eval()
            with torch.no_grad():
                acc = sum(int((model(xt[i:i + args.batch]).argmax(-1) == yt[i:i + args.batch]).sum())
                          for i in range(0, n_test, args.batch)) / n_test
            elapsed = time.perf_counter() - t0
            log.append({"step": done, "val_accuracy": acc, "elapsed_s": elapsed, "loss": float(loss.detach())})
            print(f"step {done}: loss {float(loss.detach()):.4f}, test accuracy {acc:.2%}, {elapsed:.1f} s", flush=True)
            if acc >= args.target:
                reached = {"step": done, "seconds": elapsed, "samples": done * args.batch}
                break
    print(f"plain PyTorch: {'reached' if reached else 'did not reach'} {args.target:.2f}"
          + (f" at step {reached['step']} after {reached['seconds']:.1f} s and {reached['samples']:,} samples"
             if reached else ""))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fmnist_plain.json").write_text(json.dumps({"args": vars(args), "reached": reached, "log": log}, indent=1))


if __name__ == "__main__":
    main()
