"""Stage ``finetune``: metric learning from the mined pools (docs/method.md section 6).

Reads the training images (``--train``), the pools of the ``mine`` stage
(``--pools``) and the anchors (``--anchors``); optionally the validation split
(``--val``, training classes' images, labels used only to log Recall@1).
Writes ``<out-dir>/start.pt`` (the network before its first step, head
initialized: the "untrained start" that evaluate reports) and
``<out-dir>/model.pt`` (``{"meta", "state_dict", "extra"}``: rebuilds
with ``mom.networks.load_checkpoint``; ``extra["embedding"]`` holds the scales
and aggregation at which whiten and evaluate embed images with it), ``<out-dir>/live/``
(the training log, written with DVCLive: per-epoch loss, active fraction and
validation Recall@1, and their summary; :mod:`mom.training_log`) and
``<out-dir>/summary.json`` (what the run used: pools, head, parameters).

Resume: after every epoch the full training state is written to
``<checkpoint-dir>/<fingerprint>.pt``, *outside* the stage's DVC outputs (DVC
deletes declared outputs before running a stage unless they are
``persist: true``, and a persistent output would be resumed even after the
params or inputs changed). The fingerprint hashes the options and the input
files, so a checkpoint is only resumed by the very run that wrote it; it is
deleted once ``model.pt`` is written.

Runs unchanged under ``torchrun --nproc_per_node N`` (gloo on the CPU, nccl
with ``--device cuda``, one GPU per process): every rank caches the frozen
prefix, the trainable suffix trains under DistributedDataParallel with the
tuples re-mined identically on every rank (:func:`mom.training.fit`); rank 0
alone writes the checkpoint and the outputs.

``--device cuda[:N]`` trains on a GPU: the network and the cached inputs live
there, ``model.pt`` holds CPU tensors (it loads on a CPU-only machine). That
path was never run in this project (no GPU in its CI); ``cpu`` is the tested one.

HDML (docs/method.md section 10): ``--synthesis hdml`` adds hardness-aware synthetic
negatives to the training (generator and softmax state in the checkpoint).
``--supervision`` says where the tuples' classes come from: ``none`` (MoM's
mined pools, no labels; HDML's ``J_soft`` off), ``kmeans`` (mined pools; HDML's
softmax learns ``--pseudo_labels`` k-means clusters of the untrained start's
embeddings of the training pool) or ``labels`` (the supervised reference:
triplets or, with ``--loss npair``, N-pair groups from the training labels;
``--pools`` and ``--anchors`` are not read). The training labels are read only
with ``labels``; ``summary.json`` records the supervision, and ``model.pt``'s
``extra`` does whenever it is not the default (``none`` without synthesis).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import numpy as np
import torch

from mom import artifacts, autosize, distributed, extraction, hdml, metrics, networks, prefix_cache, training, tuples
from mom.artifacts import tables
from mom.training_log import write_training_log
from mom.errors import InputError
from mom.imagestore import ImageStore
from mom.tuples import build_pools, unit_mean_weights
from stages._cli import AUTO_INT, StageCommand, log_auto, require, stage_command, timed

log = logging.getLogger("mom")

POOL_COLUMNS = ("anchor", "member", "kind", "rank", "manifold_similarity")
SYNTHESES = ("none", "hdml")
SUPERVISIONS = ("none", "labels", "kmeans")


class TrainableBlocks(click.ParamType):
    """A non-negative number of last trunk stages, or ``all``."""

    name = "blocks"

    def convert(self, value, param, ctx):
        if value is None or str(value).strip().lower() == "all":
            return None
        try:
            blocks = int(value)
        except ValueError:
            self.fail(f"trainable_blocks: {value!r} must be a number of blocks (>= 0) or 'all'", param, ctx)
        if blocks < 0:
            self.fail(f"trainable_blocks: must be >= 0 or 'all', got {blocks}", param, ctx)
        return blocks


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def run_fingerprint(options: dict, inputs: list[Path]) -> str:
    """Hash of the options and the bytes of every input file."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for path in inputs:
        digest.update(f"{path.name}:{file_digest(path)}".encode())
    return digest.hexdigest()


def read_pools(path: Path, n_train: int, anchor_ids: np.ndarray):
    """The mined pools as training tuples' source (every pool anchor one of ``anchor_ids``)."""
    columns = tables.pool_columns(tables.read_pools(path, n_items=n_train, anchors=anchor_ids))
    try:
        return build_pools(**{name: columns[name] for name in POOL_COLUMNS})
    except ValueError as error:
        raise InputError(f"{path}: {error}") from None


def make_validation(net_suffix_inputs, labels: np.ndarray, batch_size: int):
    """``validate(module) -> {"val_recall_at_1"}`` on cached validation inputs."""
    def validate(module):
        embedded = training.run_in_batches(module, net_suffix_inputs, np.arange(len(labels)), batch_size).cpu().numpy()
        return {"val_recall_at_1": metrics.recall_at_k(embedded, labels, ks=(1,))[1]}
    return validate


@click.command(cls=StageCommand)
@click.option("--train", "train_dir", type=click.Path(path_type=Path), default="data/prepared/train", show_default=True)
@click.option("--val", "val_dir", type=click.Path(path_type=Path), default="data/prepared/val", show_default=True,
              help="Validation split (training classes): Recall@1 per epoch. Empty string: none.")
@click.option("--pools", "pools_path", type=click.Path(path_type=Path), default="data/mine/pools.parquet", show_default=True)
@click.option("--anchors", "anchors_path", type=click.Path(path_type=Path), default="data/anchors/anchors.parquet", show_default=True)
@click.option("--out-dir", type=click.Path(path_type=Path), default="data/finetune", show_default=True)
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), default="checkpoints/finetune", show_default=True,
              help="Per-epoch training state for resuming (outside the DVC outputs).")
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--pooling", default="gem", show_default=True)
@click.option("--gem_p", type=float, default=3.0, show_default=True)
@click.option("--weights", default="", help="Local backbone weights file (default source when empty).")
@click.option("--head_dim", type=int, default=0, show_default=True, help="FC output dim; 0: no head (the default).")
@click.option("--trainable_blocks", type=TrainableBlocks(), default="2", show_default=True,
              help="Last trunk stages that train (the rest is frozen and cached), or 'all'.")
@click.option("--head_init", default="pca", show_default=True,
              help="FC head initialization: pca (PCA of the pooled training descriptors, unsupervised) | "
                   "pca_whiten (the same, whitened) | random")
@click.option("--image_size", type=AUTO_INT, default="auto", show_default=True,
              help="Training input side in pixels; auto: from the training images' median side (mom/autosize.py).")
@click.option("--scales", type=AUTO_INT, multiple=True, default=("auto",), show_default=True,
              help="Longer image side(s) at which whiten/evaluate embed with this network (recorded in model.pt); "
                   "auto: [image_size].")
@click.option("--aggregation", default="sum", show_default=True, help="Multi-scale aggregation for those: sum | gem")
@click.option("--epochs", type=int, default=8, show_default=True)
@click.option("--batch_size", type=AUTO_INT, default="auto", show_default=True,
              help="Tuples per SGD step; auto: from the number of anchors (mom/autosize.py).")
@click.option("--lr", type=float, default=0.001, show_default=True)
@click.option("--momentum", type=float, default=training.TrainingConfig.momentum, show_default=True)
@click.option("--weight_decay", type=float, default=training.TrainingConfig.weight_decay, show_default=True)
@click.option("--lr_step", type=int, default=6, show_default=True)
@click.option("--lr_gamma", type=float, default=training.TrainingConfig.lr_gamma, show_default=True)
@click.option("--loss", default="triplet", show_default=True, help="triplet | contrastive")
@click.option("--margin", type=float, default=0.5, show_default=True)
@click.option("--weighted/--no-weighted", default=True, show_default=True,
              help="Multiply each tuple's loss by the positive's manifold similarity.")
@click.option("--negatives_nearest", type=int, default=10, show_default=True)
@click.option("--validate/--no-validate", default=True, show_default=True, help="Recall@1 on --val after each epoch.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch_size_embed", type=int, default=256, show_default=True, help="Images per forward pass when embedding.")
@click.option("--threads", type=int, default=0, show_default=True, help="torch CPU threads (0: torch's default).")
@click.option("--prefix-cache", "prefix_cache_dir", default="", show_default=True,
              help="Folder of the prefix stage: read the frozen prefix's outputs there ('' = compute them).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu or cuda[:N] (under torchrun with cuda: each process its LOCAL_RANK's GPU).")
@click.option("--synthesis", default="none", show_default=True,
              help="none | hdml (hardness-aware synthetic negatives, docs/method.md section 10)")
@click.option("--hdml_alpha", type=float, default=7.0, show_default=True, help="HDML pulling factor alpha.")
@click.option("--hdml_beta", type=float, default=5e3, show_default=True, help="HDML synthetic weight scale beta.")
@click.option("--hdml_lambda", type=float, default=0.5, show_default=True, help="Weight of J_soft in J_gen.")
@click.option("--generator_lr", type=float, default=0.01, show_default=True, help="HDML generator Adam lr.")
@click.option("--softmax_lr", type=float, default=0.001, show_default=True, help="HDML softmax layer Adam lr.")
@click.option("--generator_hidden", type=int, default=512, show_default=True, help="HDML generator hidden units.")
@click.option("--npair_l2", type=float, default=0.0, show_default=True, help="N-pair embedding l2 penalty.")
@click.option("--supervision", default="none", show_default=True,
              help="none (mined pools) | kmeans (mined pools, k-means pseudo-labels for HDML's softmax) | "
                   "labels (tuples from the training labels: the supervised reference)")
@click.option("--pseudo_labels", type=int, default=10, show_default=True,
              help="supervision kmeans: k-means clusters of the start network's training embeddings.")
@stage_command("finetune")
def main(train_dir, val_dir, pools_path, anchors_path, out_dir, checkpoint_dir, backbone, pooling, gem_p, weights,
         head_dim, head_init, trainable_blocks, image_size, scales, aggregation, epochs, batch_size, lr, momentum, weight_decay, lr_step, lr_gamma,
         loss, margin, weighted, negatives_nearest, validate, seed, batch_size_embed, threads, device,
         synthesis, hdml_alpha, hdml_beta, hdml_lambda, generator_lr, softmax_lr, generator_hidden, npair_l2,
         supervision, pseudo_labels, prefix_cache_dir):
    require(batch_size_embed >= 1, f"batch_size_embed: must be at least 1, got {batch_size_embed}")
    distributed.check_device(device)
    auto_batch = autosize.is_auto(batch_size)
    config = training.TrainingConfig(
        epochs=epochs, batch_size=1 if auto_batch else batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay, lr_step=lr_step,
        lr_gamma=lr_gamma, loss=loss, margin=margin, weighted=weighted, negatives_nearest=negatives_nearest,
        seed=seed, embed_batch_size=batch_size_embed, npair_l2=npair_l2)
    try:
        config.check()
    except ValueError as error:
        raise InputError(str(error)) from None
    synthesis_config = check_hdml_options(synthesis, supervision, loss, weighted, head_dim, pseudo_labels, training.SynthesisConfig(
        hdml.HDMLSettings(alpha=hdml_alpha, beta=hdml_beta, lam=hdml_lambda, margin=margin, npair_l2=npair_l2),
        generator_lr=generator_lr, softmax_lr=softmax_lr, hidden=generator_hidden))
    require(head_dim >= 0, f"head_dim: must be >= 0 (0 = no head), got {head_dim}")
    require(head_init in training.HEAD_INITS,
            f"head_init: must be one of {', '.join(training.HEAD_INITS)}, got {head_init!r}")
    require(autosize.is_auto(image_size) or image_size >= 16, f"image_size: must be >= 16 pixels, got {image_size}")
    require(threads >= 0, f"threads: must be >= 0, got {threads}")
    scales_given = [] if any(autosize.is_auto(scale) for scale in scales) and len(scales) == 1 else list(scales)
    require(len(scales) > 0 and all(not autosize.is_auto(s) and s >= 16 for s in scales_given),
            f"scales: need one or more sizes >= 16 pixels (or auto alone), got {list(scales)}")
    require(aggregation in extraction.AGGREGATIONS,
            f"aggregation: must be one of {', '.join(extraction.AGGREGATIONS)}, got {aggregation!r}")
    require(not (aggregation == "gem" and head_dim), "aggregation: gem needs non-negative descriptors (head_dim 0)")
    if threads:
        torch.set_num_threads(threads)
    training.use_deterministic_algorithms(device)
    try:
        meta = networks.make_meta(backbone, pooling, gem_p, head_dim or None)
    except InputError as error:
        raise InputError(f"backbone/pooling: {error}") from None

    train_store = ImageStore.open(train_dir)
    sizes: dict = {}
    image_size, scales = resolve_input_sizes(image_size, scales, train_store, sizes)
    weight_scale = None
    if supervision == "labels":
        if auto_batch:
            config = replace(config, batch_size=autosize.resolve("finetune.batch_size", "auto", len(train_store), sizes))
        pools, class_labels = labeled_source(train_store, train_dir, loss, config.batch_size, negatives_nearest)
    else:
        pools, weight_scale = read_mined_pools(pools_path, anchors_path, len(train_store), weighted)
        class_labels = None
        if auto_batch:
            config = replace(config, batch_size=autosize.resolve("finetune.batch_size", "auto", len(pools.anchors),
                                                                 sizes))
    log_auto(sizes)
    use_val = validate and str(val_dir) not in ("", ".")
    val_store = ImageStore.open(val_dir) if use_val else None
    if val_store is not None and len(np.unique(val_store.labels)) < 2:
        log.info("%s has fewer than two labeled classes: no validation Recall@1", val_dir)
        val_store = None
    if val_store is not None:
        require((val_store.labels >= 0).all(), f"{val_dir}: validation needs labels on every item (or --no-validate)")
    if supervision != "labels":
        log.info("%d anchors with a tuple (%d dropped: empty P+ or P-), training pool of %d items",
                 len(pools.anchors), len(pools.dropped_anchors), len(pools.items()))

    # No device here: a checkpoint is read onto the CPU and resumes on any device
    # (a run moved between CPU and GPU differs from either only in rounding).
    options = dict(meta=meta, config=training.config_dict(config), trainable_blocks=trainable_blocks, head_init=head_init,
                   image_size=image_size, validate=bool(use_val), weights=weights, supervision=supervision,
                   synthesis=None if synthesis_config is None else asdict(synthesis_config),
                   pseudo_labels=pseudo_labels if supervision == "kmeans" else None)
    inputs_to_hash = [train_dir / "manifest.parquet", train_dir / "pixels.npy"]
    if supervision != "labels":
        inputs_to_hash += [pools_path, anchors_path]
    if val_store is not None:
        inputs_to_hash += [val_dir / "manifest.parquet", val_dir / "pixels.npy"]
    fingerprint = run_fingerprint(options, inputs_to_hash)
    checkpoint_path = checkpoint_dir / f"{fingerprint[:20]}.pt"

    with distributed.session(device) as ctx:
        if not ctx.is_main:
            log.setLevel(logging.WARNING)
        hdml_run = HDMLRun(synthesis_config, supervision, class_labels, pseudo_labels)
        train(ctx, meta, weights, seed, trainable_blocks, pools, train_store, val_store, image_size,
              batch_size_embed, head_dim, head_init, config, checkpoint_path, fingerprint, scales, aggregation,
              out_dir, weight_scale, hdml_run, sizes, prefix_cache_dir)


def resolve_input_sizes(image_size, scales, train_store, sizes: dict) -> tuple[int, list[int]]:
    """``image_size`` and ``scales`` as ints: ``auto`` from the training images'
    median side (mom/autosize.py); ``scales`` auto = ``[image_size]``."""
    if autosize.is_auto(image_size):
        image_size = autosize.resolve_scales("finetune.image_size", ["auto"], lambda: train_store.shapes, sizes)[0]
    if len(scales) == 1 and autosize.is_auto(scales[0]):
        sizes["finetune.scales"] = {"value": [int(image_size)], "rule": "[finetune.image_size]"}
        return int(image_size), [int(image_size)]
    return int(image_size), [int(scale) for scale in scales]


@dataclass(frozen=True)
class HDMLRun:
    """What the run does beyond MoM: HDML synthesis (None: none), where classes
    come from, the training labels (supervision labels) and the k-means count."""

    synthesis: training.SynthesisConfig | None
    supervision: str = "none"
    class_labels: np.ndarray | None = None
    pseudo_labels: int = 10

    def record(self) -> dict:
        """What ``summary.json`` says about supervision and synthesis."""
        return {"supervision": self.supervision, "labels_used": self.supervision == "labels",
                "synthesis": "none" if self.synthesis is None else "hdml",
                **({"pseudo_labels": self.pseudo_labels} if self.supervision == "kmeans" else {})}

    def model_extra(self) -> dict:
        """Keys added to ``model.pt``'s extra: none for the default (its bytes stay those of plain MoM)."""
        if self.synthesis is None and self.supervision == "none":
            return {}
        return {"supervision": self.supervision, "synthesis": "none" if self.synthesis is None else "hdml"}


def check_hdml_options(synthesis, supervision, loss, weighted, head_dim, pseudo_labels, synthesis_config):
    """The synthesis config to train with (None: none), or an InputError naming the option."""
    require(synthesis in SYNTHESES, f"synthesis: must be one of {', '.join(SYNTHESES)}, got {synthesis!r}")
    require(supervision in SUPERVISIONS, f"supervision: must be one of {', '.join(SUPERVISIONS)}, got {supervision!r}")
    require(pseudo_labels >= 2, f"pseudo_labels: must be >= 2 k-means clusters, got {pseudo_labels}")
    require(loss != "npair" or supervision == "labels",
            f"loss: npair needs N-pair groups of distinct classes, i.e. supervision labels (got {supervision})")
    require(not (supervision == "labels" and weighted),
            "weighted: needs mined pools (manifold similarities); use --no-weighted with supervision labels")
    require(supervision != "kmeans" or synthesis == "hdml",
            "supervision: kmeans pseudo-labels only feed HDML's softmax; needs synthesis hdml (or supervision none)")
    if synthesis == "none":
        return None
    require(head_dim > 0, "synthesis: hdml needs an FC head (head_dim > 0): synthetic features are re-embedded through it")
    require(loss != "contrastive", "synthesis: hdml is defined for loss triplet or npair, not contrastive")
    try:
        synthesis_config.check()
    except ValueError as error:
        name, _, rest = str(error).partition(" ")
        option = {"alpha": "hdml_alpha", "beta": "hdml_beta", "lam": "hdml_lambda", "hidden": "generator_hidden"}
        raise InputError(f"{option.get(name, name)} {rest}") from None
    return synthesis_config


def read_mined_pools(pools_path: Path, anchors_path: Path, n_train: int, weighted: bool):
    """MoM's pools (weights rescaled to mean 1 when ``weighted``) and that scale."""
    anchor_ids = tables.read_anchors(anchors_path, n_items=n_train, owner="the train split")
    pools = read_pools(pools_path, n_train, anchor_ids)
    weight_scale = None
    if weighted:
        try:
            pools, weight_scale = unit_mean_weights(pools)
        except ValueError as error:
            raise InputError(f"{pools_path}: {error}; train with --no-weighted (baseline pools)") from None
    return pools, weight_scale


def labeled_source(train_store, train_dir: Path, loss: str, batch_size: int, negatives_nearest: int):
    """Supervision labels: the tuple source from the training labels and the
    labels as dense class indices (for HDML's softmax)."""
    labels = train_store.labels
    require((labels >= 0).all(), f"supervision: labels needs a label on every training item; {train_dir} has "
            f"{int((labels < 0).sum())} unlabelled (use supervision none or kmeans)")
    _, class_labels = np.unique(labels, return_inverse=True)
    require(len(tuples.labeled_anchors(class_labels)) and len(np.unique(class_labels)) >= 2,
            f"supervision: labels needs at least two classes with two or more images each in {train_dir}")
    if loss == "npair":
        source = tuples.LabeledPairs(class_labels, tuples.npair_group_size(class_labels, batch_size))
        require(source.group_size >= 2, f"supervision: N-pair groups need two classes with two or more images in {train_dir}")
        log.info("supervision labels: N-pair groups of %d classes from the training labels", source.group_size)
    else:
        source = tuples.LabeledTriplets(class_labels, negatives_nearest)
        log.info("supervision labels: one triplet per labelled image from the training labels")
    return source, class_labels


def train(ctx, meta, weights, seed, trainable_blocks, pools, train_store, val_store, image_size, batch_size_embed,
          head_dim, head_init, config, checkpoint_path, fingerprint, scales, aggregation, out_dir, weight_scale,
          hdml_run: HDMLRun, sizes: dict | None = None, prefix_cache_dir: Path | None = None):
    """Build, fine-tune and (rank 0) write the network; every rank runs it."""
    if ctx.distributed:
        log.info("%d processes (%s)", ctx.world_size, ctx.backend)
    net = networks.build_network(meta, weights=weights or None, seed=seed).to(ctx.device)
    try:
        prefix, suffix = training.split_for_finetuning(net, trainable_blocks)
    except ValueError as error:
        raise InputError(f"trainable_blocks: {error}") from None
    log.info("training stages %d.. of %d (%s), %d trainable parameters", suffix.start, len(net.trunk_blocks()),
             "all" if trainable_blocks is None else f"last {trainable_blocks}",
             sum(p.numel() for p in suffix.parameters() if p.requires_grad))
    items = pools.items()
    cache = (prefix_cache_dir, net) if prefix_cache_dir else None
    train_inputs, val_inputs = _inputs(prefix, suffix.start, train_store, items, val_store, image_size, batch_size_embed,
                                       ctx.device, cache)

    explained = None
    if head_dim and head_init.startswith("pca"):
        with timed(f"FC head initialized with the {head_init} of the pooled training descriptors"):
            try:
                explained = training.init_head_with_pca(suffix, train_inputs, batch_size_embed,
                                                        whiten=head_init == "pca_whiten")
            except ValueError as error:
                raise InputError(f"head_init: {error} (or use --head_init random)") from None
        log.info("the %d components keep %.1f%% of the descriptors' variance", head_dim, 100 * explained)
    embedding = {"scales": [int(scale) for scale in scales], "aggregation": aggregation}
    if ctx.is_main:  # the untrained start, which evaluate reports beside the fine-tuned network
        networks.save_checkpoint(out_dir / "start.pt", net, extra={"epochs": 0, "embedding": embedding})
    class_labels = hdml_run.class_labels
    if hdml_run.supervision == "kmeans":
        class_labels = kmeans_pseudo_labels(ctx, suffix, train_inputs, items, len(train_store), batch_size_embed,
                                            hdml_run.pseudo_labels, seed)
    validation = None
    initial_val = None
    if val_store is not None and ctx.is_main:  # only rank 0 validates
        validation = make_validation(val_inputs, val_store.labels, batch_size_embed)
        initial_val = validation(suffix)["val_recall_at_1"]
        log.info("validation Recall@1 before training: %.4f", initial_val)
    with timed(f"{config.epochs} epochs"):
        history = training.fit(suffix, train_inputs, items, len(train_store), pools, config,
                               checkpoint_path=checkpoint_path, fingerprint=fingerprint,
                               checkpoint_extra={"meta": meta}, validate=validation, ctx=ctx,
                               synthesis=hdml_run.synthesis, class_labels=class_labels)
    if not ctx.is_main:
        distributed.barrier(ctx)  # rank 0 writes the outputs
        return

    networks.save_checkpoint(out_dir / "model.pt", net, extra={"epochs": config.epochs, "embedding": embedding,
                                                               **hdml_run.model_extra()})
    write_training_log(out_dir / "live", history, initial_val)
    artifacts.save_json(out_dir / "summary.json", {
        **hdml_run.record(),
        "anchors_with_tuples": len(pools.anchors),
        "anchors_dropped": len(pools.dropped_anchors),
        "training_pool": len(items),
        "positive_weight_mean": weight_scale,
        "head_init": head_init if head_dim else None,
        "head_pca_explained_variance": explained,
        "trainable_start_stage": suffix.start,
        "trainable_parameters": sum(p.numel() for p in suffix.parameters() if p.requires_grad),
        "val_recall_at_1_initial": initial_val,
        "val_recall_at_1_final": history[-1].get("val_recall_at_1") if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        **({"processes": ctx.world_size} if ctx.distributed else {}),
        **({"device": ctx.device} if ctx.device != "cpu" else {}),
        **({"auto_sizes": sizes} if sizes else {}),
    })
    checkpoint_path.unlink(missing_ok=True)
    distributed.barrier(ctx)


def kmeans_pseudo_labels(ctx, suffix, train_inputs, items, n_items, batch_size, n_clusters, seed) -> np.ndarray:
    """Supervision kmeans: pseudo-labels (one per item id, -1 outside the
    training pool) from k-means of the untrained start's embeddings of the
    training pool; rank 0 clusters, every rank gets the same labels."""
    labels = None
    if ctx.is_main:
        with timed(f"k-means pseudo-labels ({n_clusters} clusters) of {len(items)} training embeddings"):
            embeddings = training.embed_pool(suffix, train_inputs, n_items, items, batch_size)[items]
            try:
                clusters = hdml.pseudo_labels(embeddings, n_clusters, seed)
            except ValueError as error:
                raise InputError(f"pseudo_labels: {error}") from None
        labels = np.full(n_items, -1, dtype=np.int64)
        labels[items] = clusters
    return distributed.broadcast_object(ctx, labels)


def _inputs(prefix, start, train_store, items, val_store, image_size, batch_size, device, cache=None):
    """Training (and validation) inputs on ``device``: the frozen prefix's outputs
    cached once (read from the ``prefix`` stage's folder ``cache`` = ``(folder, net)``
    when given), or, when every stage trains, lazily loaded pixels."""
    if cache is not None:
        return _cached_inputs(*cache, start, train_store, items, val_store, image_size, device)
    train_pixels = training.SquarePixels(train_store, items, image_size, device)
    val_pixels = None
    if val_store is not None:
        val_pixels = training.SquarePixels(val_store, np.arange(len(val_store)), image_size, device)
    if start == 0:
        return train_pixels, val_pixels
    with timed(f"frozen prefix on {len(items)} training items"):
        train_inputs = training.cache_prefix(prefix, train_pixels, batch_size, desc="prefix train")
    val_inputs = None
    if val_pixels is not None:
        with timed(f"frozen prefix on {len(val_pixels)} validation items"):
            val_inputs = training.cache_prefix(prefix, val_pixels, batch_size, desc="prefix val")
    return train_inputs, val_inputs


def _cached_inputs(folder, net, start, train_store, items, val_store, image_size, device):
    require(start > 0, "prefix-cache: every trunk stage trains (trainable_blocks: all): there is no frozen prefix")
    with timed(f"read the frozen prefix's outputs from {folder}"):
        train_inputs = prefix_cache.read_outputs(folder, train_store, net, start, image_size)
        train_inputs = train_inputs[torch.from_numpy(np.asarray(items, dtype=np.int64))].to(device)
        val_inputs = None
        if val_store is not None:
            val_inputs = prefix_cache.read_outputs(folder, val_store, net, start, image_size).to(device)
    return train_inputs, val_inputs


if __name__ == "__main__":
    main()
