"""The fine-tuning loop of docs/method.md section 6: re-embed, re-mine, SGD; with a
checkpoint after every epoch and resume from the last finished one.

The network being trained is split in two by the caller:

- a frozen ``prefix`` (the first backbone blocks), run once over the training
  pool; its outputs are the ``inputs`` here (on CPU this is what makes training
  affordable: an epoch only runs the trainable suffix);
- the trainable ``module`` (the last blocks, pooling, FC head, l2n), which maps
  ``inputs[rows]`` to l2-normalized embeddings.

With every block trainable the prefix is the identity and ``inputs`` are the
preprocessed images. Batch-norm statistics stay frozen (the module is kept in
``eval`` mode while its parameters train): batches of a few dozen tuples give
poor statistics, and the cached prefix then stays exactly the network's.

Determinism: the tuple draw and batch order of epoch ``e`` come from a
generator seeded with ``(seed, e)``, so an interrupted run resumed from the
checkpoint of epoch ``e - 1`` repeats exactly what the uninterrupted run did.

Several processes (``torchrun``, :mod:`mom.distributed`): the module trains
inside ``DistributedDataParallel``. Each epoch every rank embeds its shard of
the pool, rank 0 gathers the embeddings, selects the tuples and broadcasts them
with the generator's state, so every rank holds the same tuples and the same
batch order; each rank then computes its share of every batch and DDP averages
the gradients, scaled so that one step is the mean over the whole batch (the
same number of steps as one process). Rank 0 alone writes checkpoints; every
rank resumes from the same one.

Device: the caller moves the network to its device and builds the inputs there
(:class:`SquarePixels` ``device``; a cached prefix then lives there too); the
tuple selection stays on the CPU and checkpoints are read onto the CPU
(:func:`load_training_state`). Only the CPU path is tested in this project
(no GPU in CI).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

from mom import artifacts, distributed, hdml
from mom.errors import InputError
from mom.losses import active_fraction, npair_loss, reduce_losses, tuple_losses
from mom.networks import read_torch_file
from mom.pooling import l2n
from mom.tuples import PairGroups, Pools, PoolTuples, Tuples

log = logging.getLogger("mom")

LOSS_KINDS = ("contrastive", "triplet", "npair")


class Inputs(Protocol):
    """Anything indexable by an int64 array of rows returning a float tensor
    batch (a tensor of cached prefix outputs, or a lazy image loader)."""

    def __getitem__(self, rows) -> torch.Tensor: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class SynthesisConfig:
    """HDML's synthesis (docs/method.md section 10): its settings and the Adam
    learning rates of the generator and the softmax layer (the authors' optimizer)."""

    settings: hdml.HDMLSettings = hdml.HDMLSettings()
    generator_lr: float = 1e-2
    softmax_lr: float = 1e-3
    hidden: int = 512

    def check(self) -> None:
        self.settings.check()
        for name in ("generator_lr", "softmax_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 10
    batch_size: int = 42           # tuples (N-pair: pairs, in whole groups) per SGD step
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step: int = 10              # epochs between learning-rate decays
    lr_gamma: float = 0.1
    loss: str = "triplet"          # contrastive | triplet | npair (labelled pairs only)
    margin: float = 0.5
    weighted: bool = False         # multiply each tuple by s_m(anchor, positive)
    negatives_nearest: int = 10
    seed: int = 0
    embed_batch_size: int = 512
    npair_l2: float = 0.0          # N-pair embedding l2 penalty

    def check(self) -> None:
        """Raise ValueError naming the first invalid field."""
        positive_ints = ("epochs", "batch_size", "lr_step", "negatives_nearest", "embed_batch_size")
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "margin", "lr_gamma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("momentum", "weight_decay", "npair_l2"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {', '.join(LOSS_KINDS)}, got {self.loss!r}")


def use_deterministic_algorithms(device: str) -> None:
    """torch's deterministic kernels only (an op without one raises). On CUDA
    cuBLAS needs a fixed workspace for that, read from the environment when its
    first handle is created: set before any CUDA work (a value already set wins)."""
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def epoch_generator(seed: int, epoch: int) -> np.random.Generator:
    """The generator of everything random in one epoch (tuples, batch order)."""
    return np.random.default_rng([int(seed), int(epoch)])


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


@torch.no_grad()
def run_in_batches(module: Callable, inputs, rows: np.ndarray, batch_size: int, progress: str | None = None) -> torch.Tensor:
    """``module(inputs[rows])`` in batches, without gradients, concatenated."""
    outputs = []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        outputs.append(module(inputs[rows[start:start + batch_size]]))
    return torch.cat(outputs) if outputs else torch.empty(0)


def embed_pool(module: torch.nn.Module, inputs: Inputs, n_items: int, items: np.ndarray, batch_size: int) -> np.ndarray:
    """Embeddings ``(n_items, d)`` with row ``items[j]`` = module(inputs[j]);
    rows of items outside the pool are zero (never read)."""
    was_training = module.training
    module.eval()
    embedded = run_in_batches(module, inputs, np.arange(len(items)), batch_size).cpu().numpy()
    module.train(was_training)
    out = np.zeros((n_items, embedded.shape[1]), dtype=np.float32)
    out[items] = embedded
    return out


def tuples_digest(chosen: Tuples | PairGroups) -> str:
    """sha256 of the tuples (ids and weights, in order): ranks compare it."""
    digest = hashlib.sha256()
    for field in fields(chosen):
        digest.update(np.ascontiguousarray(getattr(chosen, field.name)).tobytes())
    return digest.hexdigest()


def mine_epoch_tuples(module, inputs: Inputs, items: np.ndarray, n_items: int, source,
                      config: TrainingConfig, rng: np.random.Generator,
                      ctx: distributed.Context) -> Tuples | PairGroups:
    """The epoch's tuples from the current embedding (docs/method.md section 6), the
    same on every rank: each embeds its shard, rank 0 selects, then broadcasts
    the tuples and the state of ``rng`` (which selecting advanced). ``source``:
    a :class:`mom.tuples.PoolTuples`, ``LabeledTriplets`` or ``LabeledPairs``
    (which needs no embedding: every rank draws the same groups from ``rng``)."""
    if not source.needs_embeddings:
        return source.select(None, rng)
    if not ctx.distributed:
        embeddings = embed_pool(module, inputs, n_items, items, config.embed_batch_size)
        return source.select(embeddings, rng)
    shard = np.asarray(distributed.shard_range(len(items), ctx.rank, ctx.world_size), dtype=np.int64)
    module.eval()
    local = run_in_batches(module, inputs, shard, config.embed_batch_size).cpu().numpy()
    if local.ndim != 2:  # an empty shard
        local = np.zeros((0, 1), dtype=np.float32)
    embeddings = distributed.gather_rows(ctx, local.astype(np.float32, copy=False), items[shard], n_items)
    payload = None
    if ctx.is_main:
        chosen = source.select(embeddings, rng)
        payload = (chosen, rng.bit_generator.state)
    chosen, state = distributed.broadcast_object(ctx, payload)
    rng.bit_generator.state = state
    return chosen


def make_optimizer(module: torch.nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    parameters = [p for p in module.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the trainable module has no parameter that requires a gradient")
    return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)


def train_one_epoch(
    module: torch.nn.Module,
    inputs: Inputs,
    items: np.ndarray,
    chosen: Tuples,
    optimizer: torch.optim.Optimizer,
    config: TrainingConfig,
    rng: np.random.Generator,
    ctx: distributed.Context | None = None,
) -> dict:
    """One pass of SGD over the epoch's tuples in a random order.

    Returns the mean per-tuple loss and the fraction of tuples with a non-zero
    loss (both measured on the fly, before each step). Under several ranks
    ``module`` is the DDP-wrapped module and each rank computes its share of
    every batch."""
    ctx = ctx or distributed.Context()
    module.eval()  # frozen batch-norm statistics; parameters still train
    order = rng.permutation(len(chosen))
    total_loss, total_active = 0.0, 0.0
    for start in range(0, len(order), config.batch_size):
        whole = order[start:start + config.batch_size]
        mine = whole[np.asarray(distributed.shard_range(len(whole), ctx.rank, ctx.world_size), dtype=np.int64)]
        idle = len(mine) == 0  # fewer tuples than ranks: still join DDP's gradient average, with zero
        batch = chosen.subset(whole[:1] if idle else mine)
        rows = np.searchsorted(items, np.concatenate([batch.anchor, batch.positive, batch.negative]))
        anchor, positive, negative = module(inputs[rows]).chunk(3)
        weights = torch.from_numpy(batch.weight).to(anchor.device) if config.weighted else None
        losses = tuple_losses(config.loss, anchor, positive, negative, config.margin, weights)
        optimizer.zero_grad(set_to_none=True)
        if ctx.distributed:  # DDP divides the summed gradients by world_size: the step is the whole batch's mean
            objective = losses.sum() * (0.0 if idle else ctx.world_size / len(whole))
        else:
            objective = reduce_losses(losses, "mean")
        objective.backward()
        optimizer.step()
        if not idle:
            total_loss += float(losses.detach().sum())
            total_active += active_fraction(losses.detach()) * len(losses)
    total_loss, total_active = distributed.all_sum(ctx, [total_loss, total_active])
    return {"loss": total_loss / len(chosen), "active": total_active / len(chosen)}


# ------------------------------------------------------------ objectives given as per-anchor terms (N-pair, HDML)


def _rows_and_anchors(chosen: Tuples | PairGroups, config: TrainingConfig) -> tuple[int, int]:
    """``(units per SGD step, anchors per unit)``: tuples, or whole N-pair groups
    of at most ``batch_size`` pairs (at least one group)."""
    if isinstance(chosen, PairGroups):
        return max(1, config.batch_size // chosen.group_size), chosen.group_size
    return config.batch_size, 1


class NPairObjective:
    """The N-pair loss of each group of the batch (docs/method.md section 10.4)."""

    def __init__(self, l2_reg: float):
        self.l2_reg = l2_reg

    def __call__(self, trainer, x: torch.Tensor, batch: PairGroups) -> dict[str, torch.Tensor]:
        groups = trainer(x).reshape(len(batch), 2, batch.group_size, -1)
        losses = torch.cat([npair_loss(group[0], group[1], l2_reg=self.l2_reg) for group in groups])
        return {"j_m": losses, "total": losses}

    def record(self, terms: dict) -> None:
        pass

    def epoch_status(self) -> dict:
        return {}

    def close_epoch(self, ctx: distributed.Context) -> None:
        pass


class HDMLObjective:
    """HDML's per-anchor terms (:class:`mom.hdml.HDML`) with the training status
    of the previous epoch (:class:`mom.hdml.StatusTracker`). ``class_labels``:
    the class (or pseudo-label) of every item id, ``None`` without labels."""

    def __init__(self, synthesis: SynthesisConfig, weighted: bool, class_labels: np.ndarray | None):
        self.settings, self.weighted = synthesis.settings, weighted
        self.class_labels = None if class_labels is None else torch.from_numpy(np.asarray(class_labels, dtype=np.int64))
        self.tracker = hdml.StatusTracker()

    def __call__(self, trainer, x: torch.Tensor, batch: Tuples | PairGroups) -> dict[str, torch.Tensor]:
        labels = None
        if self.class_labels is not None:
            labels = self.class_labels[torch.from_numpy(batch.item_rows())].to(x.device)
        if isinstance(batch, PairGroups):
            return trainer(x, "npair", self.tracker.status, self.settings, labels=labels, groups=len(batch))
        weights = torch.from_numpy(batch.weight).to(x.device) if self.weighted else None
        return trainer(x, "triplet", self.tracker.status, self.settings, labels=labels, weights=weights)

    def record(self, terms: dict) -> None:
        self.tracker.add(terms["j_m"], terms["j_gen"])

    def epoch_status(self) -> dict:
        """The status this epoch trains with (log columns)."""
        status = self.tracker.status
        return {"j_avg": status.j_avg, "synthetic_weight": 1.0 - hdml.synthesis_weight(self.settings.beta, status.j_gen)}

    def close_epoch(self, ctx: distributed.Context) -> None:
        self.tracker.end_epoch(distributed.all_sum(ctx, self.tracker.totals()))


def train_one_epoch_terms(trainer, inputs: Inputs, items: np.ndarray, chosen: Tuples | PairGroups,
                          optimizers: list[torch.optim.Optimizer], config: TrainingConfig,
                          rng: np.random.Generator, objective, ctx: distributed.Context | None = None) -> dict:
    """:func:`train_one_epoch` for an ``objective(trainer, x, batch)`` that
    returns per-anchor terms: ``total`` is back-propagated (its mean over the
    step's anchors; every optimizer steps), ``j_m`` (the real tuples' metric
    loss) gives the log's ``loss`` and ``active``, and the epoch means of the
    other terms join the log row. Several ranks share each step's units
    (tuples or whole N-pair groups) as :func:`train_one_epoch` shares tuples."""
    ctx = ctx or distributed.Context()
    trainer.eval()  # frozen batch-norm statistics; parameters still train
    units, per_unit = _rows_and_anchors(chosen, config)
    order = rng.permutation(len(chosen))
    names, sums = None, None
    for start in range(0, len(order), units):
        whole = order[start:start + units]
        mine = whole[np.asarray(distributed.shard_range(len(whole), ctx.rank, ctx.world_size), dtype=np.int64)]
        idle = len(mine) == 0  # fewer units than ranks: still join DDP's gradient average, with zero
        batch = chosen.subset(whole[:1] if idle else mine)
        terms = objective(trainer, inputs[np.searchsorted(items, batch.item_rows())], batch)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        if ctx.distributed:  # DDP divides the summed gradients by world_size: the step is the whole batch's mean
            step_objective = terms["total"].sum() * (0.0 if idle else ctx.world_size / (len(whole) * per_unit))
        else:
            step_objective = terms["total"].mean()
        step_objective.backward()
        for optimizer in optimizers:
            optimizer.step()
        names = names or sorted(name for name in terms if name != "total")
        sums = sums or [0.0] * (len(names) + 1)
        if not idle:
            objective.record(terms)
            for index, name in enumerate(names):
                sums[index] += float(terms[name].detach().sum())
            sums[-1] += active_fraction(terms["j_m"].detach()) * len(terms["j_m"])
    objective.close_epoch(ctx)
    sums = distributed.all_sum(ctx, sums)
    anchors = len(chosen) * per_unit
    means = {name: total / anchors for name, total in zip(names, sums)}
    return {"loss": means.pop("j_m"), "active": sums[-1] / anchors, **means}


def wrap_for_ranks(module: torch.nn.Module, ctx: distributed.Context) -> torch.nn.Module:
    """``module`` itself for one process, else DDP over it (rank 0's parameters
    broadcast to every rank on construction)."""
    if not ctx.distributed:
        return module
    device_ids = [torch.device(ctx.device).index] if ctx.device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


# ------------------------------------------------------------ network split


class SquarePixels:
    """Items of an image store as float RGB pixels ``(B, 3, size, size)`` in
    [0, 255] (bilinear, antialiased resize; grayscale replicated): fixed-size
    training inputs, so a frozen prefix's outputs stack into one tensor.
    ``self[rows]`` loads ``items[rows]``, resized on the CPU, onto ``device``."""

    def __init__(self, store, items: np.ndarray, size: int, device: str = "cpu"):
        self.store, self.items, self.size = store, np.asarray(items, dtype=np.int64), int(size)
        self.device = device

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, rows) -> torch.Tensor:
        images = [self.store[item] for item in self.items[np.asarray(rows)]]
        if not images:
            return torch.empty(0, 3, self.size, self.size, device=self.device)
        if len({image.shape for image in images}) == 1:  # one resize call for the batch
            return self._resized(np.stack(images)).to(self.device)
        return torch.cat([self._resized(image[None]) for image in images]).to(self.device)

    def _resized(self, images: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
        if tuple(pixels.shape[2:]) != (self.size, self.size):
            pixels = torch.nn.functional.interpolate(
                pixels, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return pixels.expand(-1, 3, -1, -1).clamp(0, 255).contiguous()


class NetworkSuffix(torch.nn.Module):
    """The trainable part of an ``EmbeddingNet``: trunk stages ``start..``,
    pooling, head, l2n (``net.forward_from(x, start)``).

    ``embed_pooled(pooled(x)) == forward(x)``: the two halves HDML needs (its
    generator maps embeddings back to pooled features, which are re-embedded)."""

    def __init__(self, net: torch.nn.Module, start: int):
        super().__init__()
        self.net, self.start = net, int(start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_from(channels_last(x), self.start)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk stages ``start..`` then pooling: the descriptor before the head ``(B, channels)``."""
        x = channels_last(x)
        if self.start == 0:
            x = self.net.normalize(x)
        for block in self.net.trunk[self.start:]:
            x = block(x)
        return self.net.pool(x)

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Head (if any) and l2n of pooled descriptors."""
        if self.net.head is not None:
            pooled = self.net.head(pooled)
        return l2n(pooled)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """Feature maps in the layout the network's convolutions run fastest in (NHWC)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def trainable_start(n_stages: int, trainable_blocks: int | None) -> int:
    """Index of the first trainable trunk stage: ``None`` = all stages train."""
    if trainable_blocks is None:
        return 0
    if not 0 <= trainable_blocks <= n_stages:
        raise ValueError(f"trainable_blocks must be in 0..{n_stages} or all, got {trainable_blocks}")
    return n_stages - int(trainable_blocks)


def split_for_finetuning(net: torch.nn.Module, trainable_blocks: int | None):
    """Freeze the first trunk stages of ``net``; return ``(prefix, suffix)`` with
    ``suffix(prefix(pixels)) == net(pixels)``. ``prefix`` maps pixels to the
    input of the first trainable stage (pixels themselves when all train);
    ``suffix`` holds every trainable parameter (last stages, pooling, head)."""
    stages = net.trunk_blocks()
    start = trainable_start(len(stages), trainable_blocks)
    for parameter in net.parameters():
        parameter.requires_grad_(True)
    frozen = torch.nn.Sequential(*[module for _, module in stages[:start]])
    freeze(frozen)
    # ~1.5x faster convolutions on CPU, ~2x for the training steps of the last stages
    net.to(memory_format=torch.channels_last).eval()

    def prefix(pixels: torch.Tensor) -> torch.Tensor:
        if start == 0:
            return pixels
        normalized = channels_last(net.normalize(pixels))
        return frozen(normalized).contiguous()

    return prefix, NetworkSuffix(net, start)


HEAD_INITS = ("pca", "pca_whiten", "random")


@torch.no_grad()
def init_head_with_pca(suffix: NetworkSuffix, inputs: Inputs, batch_size: int, whiten: bool = False) -> float:
    """Set the FC head to the PCA projection of the pooled training descriptors
    (unsupervised): ``W = V_d^T``, ``b = -V_d^T mean``, so the untrained network
    outputs ``l2n(PCA_d(descriptor))`` instead of a random projection. With
    ``whiten`` the rows are also scaled by ``1 / sqrt(eigenvalue)`` (PCA
    whitening, docs/method.md section 7). Returns the fraction of the
    descriptors' variance the kept components explain."""
    net = suffix.net
    if net.head is None:
        raise ValueError("the network has no FC head to initialize")
    # the eigendecomposition on the CPU: the same head for the same descriptors on any device
    descriptors = run_in_batches(suffix.pooled, inputs, np.arange(len(inputs)), batch_size).cpu().double()
    dim = net.head.out_features
    if len(descriptors) < dim:
        raise ValueError(f"PCA head init needs at least {dim} training items, got {len(descriptors)}")
    mean = descriptors.mean(dim=0)
    centred = descriptors - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(descriptors))
    order = torch.argsort(eigenvalues, descending=True)[:dim]
    components = eigenvectors[:, order].T  # (dim, channels)
    # sign convention: largest-magnitude entry positive (deterministic)
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    components = components * torch.where(signs == 0, 1.0, signs)
    if whiten:
        kept = eigenvalues[order]
        components = components / kept.clamp_min(kept[0] * 1e-9).sqrt().unsqueeze(1)
    net.head.weight.copy_(components.float())
    net.head.bias.copy_(-(components @ mean).float())
    return float(eigenvalues[order].sum() / eigenvalues.clamp_min(0).sum())


def cache_prefix(prefix: Callable, pixels: Inputs, batch_size: int, desc: str | None = "frozen prefix") -> torch.Tensor:
    """The frozen prefix's outputs for every row of ``pixels``, computed once."""
    return run_in_batches(prefix, pixels, np.arange(len(pixels)), batch_size, progress=desc)


# ------------------------------------------------------------ checkpoints


def save_training_state(path: str | Path, state: dict) -> None:
    """Write a training checkpoint atomically (a kill leaves the previous one)."""
    with artifacts.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: str | Path, fingerprint: str) -> dict | None:
    """The checkpoint at ``path`` if it exists and belongs to the same run
    (same ``fingerprint`` of inputs and options); otherwise None.

    A file that is not a training checkpoint of this code (unreadable, refused
    by torch's weights-only loader, a bare tensor, missing or mistyped keys) is
    ignored with a one-line warning: it only costs the head start.

    Read onto the CPU whatever device wrote it: a GPU run's checkpoint then
    resumes on a CPU-only machine and back, the module's and optimizer's
    ``load_state_dict`` copy the tensors to the parameters' device, and
    ``torch.set_rng_state`` takes a CPU tensor only."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = read_torch_file(path, "cpu", "training checkpoint", "")
    except InputError as error:
        log.warning("ignoring %s; starting afresh", error)
        return None
    problem = training_state_problem(state)
    if problem is not None:
        log.warning("ignoring %s: %s; starting afresh", path, problem)
        return None
    if state["fingerprint"] != fingerprint:
        log.info("checkpoint %s belongs to other inputs or options: starting afresh", path)
        return None
    return state


TRAINING_STATE_TYPES = {"fingerprint": str, "epoch": int, "module": dict, "optimizer": dict, "scheduler": dict,
                        "torch_rng": torch.Tensor, "history": list}


def training_state_problem(state) -> str | None:
    """Why ``state`` is not a training checkpoint written by :func:`fit`, or None."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a training checkpoint"
    missing = [key for key in TRAINING_STATE_TYPES if key not in state]
    if missing:
        return f"not a training checkpoint of this code (missing keys {missing})"
    wrong = [key for key, kind in TRAINING_STATE_TYPES.items() if not isinstance(state[key], kind)]
    if wrong or state["epoch"] < 0 or state["torch_rng"].dtype != torch.uint8:
        return f"keys of the wrong type or value: {wrong or ['epoch' if state['epoch'] < 0 else 'torch_rng']}"
    return None


def _capture_state(module, optimizer, scheduler, epoch, history, fingerprint, extra) -> dict:
    return {
        "fingerprint": fingerprint,
        "epoch": epoch,  # epochs finished
        "module": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "history": history,
        **extra,
    }


def fit(
    module: torch.nn.Module,
    inputs: Inputs,
    items: np.ndarray,
    n_items: int,
    pools: Pools,
    config: TrainingConfig,
    checkpoint_path: str | Path | None = None,
    fingerprint: str = "",
    checkpoint_extra: dict | None = None,
    validate: Callable[[torch.nn.Module], dict] | None = None,
    ctx: distributed.Context | None = None,
    synthesis: SynthesisConfig | None = None,
    class_labels: np.ndarray | None = None,
) -> list[dict]:
    """Fine-tune ``module`` for ``config.epochs`` epochs (docs/method.md section 6).

    ``items``: sorted item ids of the training pool, ``inputs[j]`` is item
    ``items[j]``'s input; ``n_items``: size of the split (item ids < n_items).
    Every epoch: embed the pool with the current module, select one tuple per
    anchor (negatives re-mined among the nearest pool members), one SGD pass,
    learning-rate step, optional ``validate(module) -> dict`` (added to the
    epoch's log row), checkpoint. Resumes from ``checkpoint_path`` when it holds
    a state with the same ``fingerprint``. Returns the log: one dict per epoch.

    ``ctx`` (several ranks, see the module docstring): every rank calls ``fit``
    with the same arguments; rank 0 alone validates and writes checkpoints, and
    only its returned log holds the validation columns.

    ``pools``: the mined :class:`Pools`, or any tuple source of
    :mod:`mom.tuples` (``LabeledTriplets``, ``LabeledPairs`` for ``loss
    npair``: the supervised reference). ``synthesis``: train with HDML
    (docs/method.md section 10): what trains is :class:`mom.hdml.HDML` over
    ``module``, its generator and softmax layer with Adam, and the checkpoint
    holds their state and the training status. ``class_labels``: the class (or
    pseudo-label, dense ``0..C-1``) of every item id for HDML's softmax layer;
    None switches ``J_soft`` off.
    """
    ctx = ctx or distributed.Context()
    config.check()
    source = PoolTuples(pools, config.negatives_nearest) if isinstance(pools, Pools) else pools
    items = np.asarray(items, dtype=np.int64)
    if not np.all(np.diff(items) > 0) or len(items) != len(inputs):
        raise ValueError("items must be strictly increasing with one input per item")
    missing = np.setdiff1d(source.items(), items)
    if len(missing):
        raise ValueError(f"{len(missing)} pool members have no input (first: {missing[0]})")
    learner, extra_optimizers, objective = _training_plan(module, source, config, synthesis, class_labels)
    optimizer = make_optimizer(module, config)
    scheduler = make_scheduler(optimizer, config)
    history: list[dict] = []
    first_epoch = 0
    state = load_training_state(checkpoint_path, fingerprint) if checkpoint_path else None
    if state is not None:
        learner.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if synthesis is not None:
            _load_synthesis_state(state["synthesis"], extra_optimizers, objective)
        history, first_epoch = list(state["history"]), int(state["epoch"])
        log.info("resuming after epoch %d of %d from %s", first_epoch, config.epochs, checkpoint_path)
    trainer = wrap_for_ranks(learner, ctx)
    for epoch in range(first_epoch, config.epochs):
        start = time.perf_counter()
        rng = epoch_generator(config.seed, epoch)
        torch.manual_seed(int(rng.integers(2**62)))
        chosen = mine_epoch_tuples(module, inputs, items, n_items, source, config, rng, ctx)
        if ctx.distributed:
            check_ranks_agree(ctx, epoch, chosen)
        mined = time.perf_counter()
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        if objective is None:  # MoM's tuple losses (docs/method.md section 6)
            row.update(train_one_epoch(trainer, inputs, items, chosen, optimizer, config, rng, ctx))
        else:
            row.update(objective.epoch_status())
            row.update(train_one_epoch_terms(trainer, inputs, items, chosen, [optimizer, *extra_optimizers],
                                             config, rng, objective, ctx))
        scheduler.step()
        trained = time.perf_counter()
        if validate is not None and ctx.is_main:
            row.update(validate(module))
        history.append(row)
        log.info("epoch %d/%d: %s (re-embed+mine %.1f s, SGD %.1f s, validation %.1f s)", epoch + 1, config.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"),
                 mined - start, trained - mined, time.perf_counter() - trained)
        if checkpoint_path and ctx.is_main:
            extra = dict(checkpoint_extra or {})
            if synthesis is not None:
                extra["synthesis"] = _synthesis_state(extra_optimizers, objective)
            save_training_state(checkpoint_path, _capture_state(
                learner, optimizer, scheduler, epoch + 1, history, fingerprint, extra))
        distributed.barrier(ctx)  # no rank starts the next epoch (or a resume) before the checkpoint is whole
    return history


def _training_plan(module, source, config: TrainingConfig, synthesis: SynthesisConfig | None,
                   class_labels: np.ndarray | None):
    """``(module that trains, optimizers beside the metric's SGD, per-anchor
    objective)``; the objective is None for MoM's tuple losses."""
    pairs = source.layout == "npair"
    if pairs != (config.loss == "npair"):
        raise ValueError("loss npair trains on labelled N-pair groups, and N-pair groups on loss npair only")
    if synthesis is None:
        return module, [], (NPairObjective(config.npair_l2) if pairs else None)
    synthesis.check()
    if config.loss == "contrastive":
        raise ValueError("HDML synthesis is defined for the triplet and N-pair losses, not contrastive")
    n_classes = None if class_labels is None else int(np.max(class_labels)) + 1
    model = hdml.HDML(module, n_classes, synthesis.hidden, seed=config.seed)
    model.to(next(p for p in module.parameters() if p.requires_grad).device)
    optimizers = [torch.optim.Adam(model.generator_parameters(), lr=synthesis.generator_lr)]
    if model.softmax is not None:
        optimizers.append(torch.optim.Adam(model.softmax_parameters(), lr=synthesis.softmax_lr))
    return model, optimizers, HDMLObjective(synthesis, config.weighted, class_labels)


def _synthesis_state(optimizers: list, objective: HDMLObjective) -> dict:
    return {"optimizers": [optimizer.state_dict() for optimizer in optimizers], "status": objective.tracker.state_dict()}


def _load_synthesis_state(state: dict, optimizers: list, objective: HDMLObjective) -> None:
    for optimizer, optimizer_state in zip(optimizers, state["optimizers"], strict=True):
        optimizer.load_state_dict(optimizer_state)
    objective.tracker.load_state_dict(state["status"])


def check_ranks_agree(ctx: distributed.Context, epoch: int, chosen: Tuples | PairGroups) -> None:
    """Raise unless every rank holds the same tuples; log their digest."""
    digests = distributed.all_gather_object(ctx, tuples_digest(chosen))
    if len(set(digests)) != 1:
        raise RuntimeError(f"epoch {epoch + 1}: ranks hold different tuples (sha256 {digests})")
    log.info("epoch %d: %d tuples, sha256 %s on all %d ranks", epoch + 1, len(chosen), digests[0], ctx.world_size)


def config_dict(config: TrainingConfig) -> dict:
    return asdict(config)
