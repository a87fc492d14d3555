"""Stage ``prefix``: the frozen prefix's outputs of prepared splits, computed once
for the runs that share them (mom/prefix_cache.py).

Builds the pretrained network (``--backbone``, ``--weights``), freezes all but
its last ``--trainable_blocks`` trunk stages as ``finetune`` does, and writes
``<out-dir>/<split>.npy`` (the prefix's output for every item of
``<prepared>/<split>``, resized square to ``--image_size``) and
``<out-dir>/prefix.json`` (what produced them). ``finetune --prefix-cache`` and
``evaluate --prefix-cache`` read them instead of running the prefix; they check
the record against their own network and images. The Table 1 grid
(ablations/dvc.yaml) uses it: its 39 cells share one prefix computation.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import numpy as np

from mom import autosize, networks, prefix_cache, training
from mom.imagestore import ImageStore
from stages._cli import AUTO_INT, StageCommand, log_auto, require, stage_command, timed

log = logging.getLogger("mom")


@click.command(cls=StageCommand)
@click.option("--prepared", type=click.Path(path_type=Path), default="data/prepared", show_default=True)
@click.option("--splits", multiple=True, default=("train", "val", "new_images", "new_classes"), show_default=True,
              help="Split folders of --prepared to cache (one option per split).")
@click.option("--out-dir", type=click.Path(path_type=Path), default="data/prefix", show_default=True)
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--weights", default="", help="Local backbone weights file (default source when empty).")
@click.option("--trainable_blocks", default="2", show_default=True,
              help="Last trunk stages that train (finetune.trainable_blocks); the others form the prefix.")
@click.option("--image_size", type=AUTO_INT, default="auto", show_default=True,
              help="Input side in pixels; auto: finetune's rule on the train split (mom/autosize.py).")
@click.option("--batch_size", type=int, default=256, show_default=True,
              help="Images per forward pass (finetune.batch_size_embed, for bit-identical outputs).")
@stage_command("prefix")
def main(prepared, splits, out_dir, backbone, weights, trainable_blocks, image_size, batch_size):
    require(splits, "splits: name at least one split")
    require(batch_size >= 1, f"batch_size: must be >= 1, got {batch_size}")
    require(trainable_blocks.isdigit(), f"trainable_blocks: a number of stages, got {trainable_blocks!r} "
                                        "(with 'all' there is no frozen prefix)")
    stores = {split: (prepared / split, ImageStore.open(prepared / split)) for split in splits}
    if autosize.is_auto(image_size):
        require("train" in stores, "image_size auto: resolved from the train split; add --splits train or set it")
        sizes: dict = {}
        image_size = autosize.resolve_scales("finetune.image_size", ["auto"], lambda: stores["train"][1].shapes,
                                             sizes)[0]
        log_auto(sizes)
    require(int(image_size) >= 16, f"image_size: must be >= 16 pixels, got {image_size}")
    net = networks.build_network(networks.make_meta(backbone), weights=weights or None)
    stages = len(net.trunk_blocks())
    require(int(trainable_blocks) < stages, f"trainable_blocks: the trunk has {stages} stages: "
                                            f"{trainable_blocks} trainable leave no frozen prefix")
    start = training.trainable_start(stages, int(trainable_blocks))
    prefix, _ = training.split_for_finetuning(net, int(trainable_blocks))
    outputs = {}
    for split, (folder, store) in stores.items():
        with timed(f"{split}: frozen prefix (trunk stages 0..{start - 1}, {image_size} px) of {len(store)} items"):
            pixels = training.SquarePixels(store, np.arange(len(store)), int(image_size))
            outputs[split] = (folder, training.cache_prefix(prefix, pixels, batch_size, desc=f"prefix {split}"))
    record = prefix_cache.write_cache(out_dir, net, start, int(image_size), outputs)
    for split, entry in record["splits"].items():
        log.info("%s: %d items -> %s", split, entry["items"], entry["shape"])


if __name__ == "__main__":
    main()
