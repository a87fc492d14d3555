"""Speed of one fine-tuning step of the trainable stages, in the two memory layouts.

Fine-tuning runs the frozen prefix once and then, every SGD step, the last
``trainable_blocks`` stages forward and backward on a batch of cached prefix
outputs (`mom.training.split_for_finetuning`). This prints milliseconds per step
(forward, backward, SGD update) with the network and its input in NCHW
(`torch.contiguous_format`) and in NHWC (`torch.channels_last`, what
`split_for_finetuning` uses), and their ratio. The two are timed alternately,
several rounds, and the best round of each is kept, so that other processes on a
shared machine disturb the ratio less.

    python benchmarks/finetune_step.py                   # the default: 42 triplets, 64 px, 1 thread
    python benchmarks/finetune_step.py --image-size 224 --trainable-blocks 3 --threads 2
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import click
import torch

from mom.networks import build_network, make_meta
from mom.training import split_for_finetuning

LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}


def step_seconds(suffix: torch.nn.Module, inputs: torch.Tensor, layout, steps: int) -> float:
    """Mean seconds of ``steps`` SGD steps of ``suffix`` on ``inputs``, both in ``layout``."""
    suffix.to(memory_format=layout)
    inputs = inputs.contiguous(memory_format=layout)
    trainable = [parameter for parameter in suffix.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-3, momentum=0.9)
    started = None
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            started = time.perf_counter()
        optimizer.zero_grad()
        suffix.net.forward_from(inputs, suffix.start).sum().backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


@click.command()
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--trainable-blocks", default=2, show_default=True)
@click.option("--image-size", default=64, show_default=True)
@click.option("--batch", default=126, show_default=True, help="images per step (42 triplets = 126)")
@click.option("--threads", default=1, show_default=True)
@click.option("--steps", default=10, show_default=True)
@click.option("--rounds", default=3, show_default=True)
def main(backbone, trainable_blocks, image_size, batch, threads, steps, rounds):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_network(make_meta(backbone), load_pretrained=False, seed=0)
    prefix, suffix = split_for_finetuning(net, trainable_blocks)
    with torch.no_grad():
        inputs = prefix(torch.rand(batch, 3, image_size, image_size))
    best = {name: float("inf") for name in LAYOUTS}
    for _ in range(rounds):
        for name, layout in LAYOUTS.items():
            best[name] = min(best[name], step_seconds(suffix, inputs, layout, steps))
    print(f"{backbone}, last {trainable_blocks} stages trained, input {tuple(inputs.shape)} "
          f"({image_size} px), {threads} thread(s), best of {rounds} rounds of {steps} steps:")
    for name, seconds in best.items():
        print(f"  {name}: {1000 * seconds:.1f} ms/step")
    print(f"  NHWC speed-up: {best['NCHW'] / best['NHWC']:.2f}x")


if __name__ == "__main__":
    main()
