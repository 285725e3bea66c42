"""Train the base digits CNN on CPU and write its weights as safetensors (a few seconds).

    python -m examples.digits.train --out examples/digits/cnn.safetensors

Run it from the repository root. It uses dsk-compress's own training loop (the one every stage uses)
with plain cross-entropy; the recipe then prunes, quantizes, exports and benchmarks this checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def train_base(out: str | Path, steps: int = 300, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> dict:
    """Train ``make_cnn()`` on the digits task for ``steps`` steps, save it to ``out``; returns its validation metrics."""
    import torch

    from dsk_compress.compress.cnn import make_classifier_kd_loss, torch_predict
    from dsk_compress.compress.trainer import TrainConfig, train
    from dsk_compress.io import save_state_dict
    from examples.digits.model import make_cnn
    from examples.digits.task import make_task

    torch.manual_seed(seed)
    task = make_task(seed=seed)
    model = make_cnn()
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=steps // 10, seed=seed, ckpt_every=steps)
    train(model, make_classifier_kd_loss(None), task.train_batch, cfg, desc="digits")
    save_state_dict(model.state_dict(), out)
    return task.evaluate(torch_predict(model.eval())).as_dict()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="examples/digits/cnn.safetensors")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for a model this small)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    m = train_base(args.out, steps=args.steps, seed=args.seed)
    print(
        f"wrote {args.out}: validation accuracy {m['accuracy']:.2f}% ({int(m['eval_samples'])} images), cross-entropy {m['cross_entropy']:.4f}"
    )


if __name__ == "__main__":
    main()
