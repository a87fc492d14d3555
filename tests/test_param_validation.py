"""The parameter validation table (issue 8): for every param of params.yaml, an
invalid value given to its stage's command exits with status 2 and ONE line on
stderr that names the param and what is allowed, before any output is written.

Each case runs the stage's click command in-process (CliRunner, stderr kept
apart) on small valid inputs, with only the param under test set to a bad
value: every other option keeps its default (= params.yaml), so a line about
another param fails the case. Cases a stage does not handle yet are
``xfail(strict=True)`` with the reason: the to-do list of the stages' owners
(a case that starts passing fails the run until its mark is removed).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from banana import banana_features
from mom import artifacts
from mom.imagestore import write_image_store
from stages import (anchors, diffuse, evaluate, extract, finetune, graph, index, mine, pool_figure, prepare,
                    proxy_retrieval, whiten)

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"prepare": prepare, "extract": extract, "graph": graph, "anchors": anchors, "diffuse": diffuse,
            "mine": mine, "finetune": finetune, "whiten": whiten, "evaluate": evaluate,
            "proxy_retrieval": proxy_retrieval, "pool_figure": pool_figure, "index": index}
# Words that say what is allowed (a range, a set, a type).
ALLOWED_HINT = re.compile(r"must|one of|allowed|not a valid|is not an|between|at least|>=|<=|>|in \(|\.\.|"
                          r"cpu or|true/false|need|expected|positive|not found|not a directory|or more|"
                          r"\d+-\d+|distinct", re.I)

FLAG = "a click flag given a value, as DVC renders a non-boolean value of a boolean param"
CLICK_USAGE = "click usage error (3 lines: usage, hint, error): use stages._cli.StageCommand"
NEGATIVE_SEED = ("a negative seed is not checked: numpy refuses it (ValueError traceback) once the seed is used, "
                 "or the run goes on when it is not")
LOGS_FIRST = "checked after reading the input, which logs a line first (k <= 0 needs no input)"


@dataclass(frozen=True)
class Case:
    param: str  # section.key of params.yaml
    args: tuple[str, ...]  # the bad value as the CLI gets it
    todo: str = ""  # xfail reason: what the stage's owner has to fix


def case(param, *args, todo=""):
    return Case(param, tuple(str(arg) for arg in args), todo)


def flag(param, todo=""):
    key = param.split(".")[1]
    return case(param, f"--{key}", "3", todo=todo)


CASES = [
    case("prepare.source", "--source", "imagenet"),
    case("prepare.root", "--root", "/nonexistent/fashion"),
    case("prepare.train_classes", "--train_classes", 10),
    case("prepare.train_classes", "--train_classes", "five"),
    case("prepare.test_classes", "--test_classes", 5),  # overlaps train class 5 (inputs_args)
    case("prepare.test_classes", "--test_classes", -1),
    case("prepare.per_class", "--per_class", -3),
    case("prepare.per_class", "--per_class", "many"),
    case("prepare.val_per_class", "--val_per_class", -1),
    case("prepare.new_images_per_class", "--new_images_per_class", 1001),
    case("prepare.new_images_per_class", "--new_images_per_class", -1),
    case("prepare.seed", "--seed", "zero"),
    case("prepare.seed", "--seed", -1),
    flag("prepare.labels_from_folders"),
    case("prepare.max_side", "--max_side", -5),
    case("prepare.holdout", "--holdout", -1),
    case("prepare.holdout", "--holdout", "many"),
    case("prepare.test_root", "--source", "folder", "--root", "IMAGES", "--test_root", "/nonexistent/test"),
    case("prepare.query_root", "--source", "folder", "--root", "IMAGES", "--test_root", "TEST_IMAGES",
         "--ground_truth", "GROUND_TRUTH", "--query_root", "/nonexistent/queries"),
    case("prepare.ground_truth", "--source", "folder", "--root", "IMAGES", "--test_root", "TEST_IMAGES",
         "--ground_truth", "/nonexistent/gt.csv"),
    flag("prepare.download"),
    case("prepare.distractors_root", "--source", "holidays", "--root", "IMAGES", "--distractors_root",
         "/nonexistent/distractors"),
    case("prepare.train_root", "--source", "holidays", "--root", "IMAGES", "--train_root", "/nonexistent/train"),

    case("extract.backbone", "--backbone", "alexnet"),
    case("extract.weights", "--weights", "/nonexistent/weights.pth"),
    flag("extract.download_weights"),
    case("extract.pooling", "--pooling", "max"),
    case("extract.gem_p", "--gem_p", 0),
    case("extract.scales", "--scales", 0),
    case("extract.aggregation", "--aggregation", "mean"),
    case("extract.batch_size", "--batch_size", 0),
    flag("extract.pca_whiten"),
    case("extract.pca_dim", "--pca_dim", -1),
    case("extract.threads", "--threads", -1),
    case("extract.device", "--device", "tpu"),

    case("graph.k", "--k", 0),
    case("graph.k", "--k", "thirty"),
    flag("graph.count_self"),
    case("graph.gamma", "--gamma", 0),
    case("graph.search", "--search", "annoy"),
    case("graph.exact_max_items", "--exact_max_items", -1),
    case("graph.hnsw_m", "--hnsw_m", 0),
    case("graph.hnsw_ef_construction", "--hnsw_ef_construction", 0),
    case("graph.hnsw_ef_search", "--hnsw_ef_search", 0),
    flag("graph.hnsw_self_entry"),
    case("graph.ivf_nlist", "--ivf_nlist", 0),
    case("graph.ivf_nprobe", "--ivf_nprobe", 0),
    case("graph.recall_sample", "--recall_sample", -1),
    case("graph.threads", "--threads", -1),
    case("graph.seed", "--seed", "zero"),
    case("graph.seed", "--seed", -1),
    case("graph.device", "--device", "gpu"),

    case("anchors.strategy", "--strategy", "best"),
    case("anchors.count", "--count", 0),
    case("anchors.seed", "--seed", "zero"),
    case("anchors.seed", "--strategy", "random", "--count", 10, "--seed", -1),

    case("diffuse.alpha", "--alpha", 1.0),
    case("diffuse.alpha", "--alpha", 0),
    case("diffuse.max_iter", "--max_iter", 0),
    case("diffuse.tol", "--tol", -1e-3),
    case("diffuse.block_size", "--block_size", 0),
    case("diffuse.k", "--k", 0),
    flag("diffuse.reorder"),
    case("diffuse.dtype", "--dtype", "float16"),
    case("diffuse.threads", "--threads", -1),
    case("diffuse.fused_min_items", "--fused_min_items", -1),
    case("diffuse.truncate", "--truncate", -1),
    case("diffuse.agreement_sample", "--agreement_sample", -1),

    case("mine.k_pos", "--k_pos", 0),
    case("mine.k_neg", "--k_neg", 0),
    case("mine.positive_cap", "--positive_cap", 0),
    case("mine.negative_cap", "--negative_cap", 0),
    case("mine.positives", "--positives", "oracle"),
    case("mine.negatives", "--negatives", "hardest"),
    case("mine.baseline_k", "--baseline_k", 0),
    case("mine.seed", "--seed", "zero"),
    case("mine.seed", "--negatives", "random", "--seed", -1),

    case("finetune.head_dim", "--head_dim", -1),
    case("finetune.head_init", "--head_init", "zeros"),
    case("finetune.trainable_blocks", "--trainable_blocks", "some"),
    case("finetune.image_size", "--image_size", 8),
    case("finetune.scales", "--scales", 8),
    case("finetune.aggregation", "--aggregation", "max"),
    case("finetune.epochs", "--epochs", 0),
    case("finetune.batch_size", "--batch_size", 0),
    case("finetune.lr", "--lr", -0.1),
    case("finetune.momentum", "--momentum", -0.5),
    case("finetune.weight_decay", "--weight_decay", -1),
    case("finetune.lr_step", "--lr_step", 0),
    case("finetune.lr_gamma", "--lr_gamma", 0),
    case("finetune.loss", "--loss", "hinge"),
    case("finetune.margin", "--margin", -1),
    flag("finetune.weighted"),
    case("finetune.negatives_nearest", "--negatives_nearest", 0),
    flag("finetune.validate"),
    case("finetune.seed", "--seed", "zero"),
    case("finetune.seed", "--seed", -1),
    case("finetune.batch_size_embed", "--batch_size_embed", 0),
    case("finetune.threads", "--threads", -1),
    case("finetune.device", "--device", "tpu"),
    case("finetune.synthesis", "--synthesis", "gan"),
    case("finetune.hdml_alpha", "--synthesis", "hdml", "--head_dim", 64, "--hdml_alpha", -1),
    case("finetune.hdml_beta", "--synthesis", "hdml", "--head_dim", 64, "--hdml_beta", -1),
    case("finetune.hdml_lambda", "--synthesis", "hdml", "--head_dim", 64, "--hdml_lambda", -1),
    case("finetune.generator_lr", "--synthesis", "hdml", "--head_dim", 64, "--generator_lr", 0),
    case("finetune.softmax_lr", "--synthesis", "hdml", "--head_dim", 64, "--softmax_lr", 0),
    case("finetune.generator_hidden", "--synthesis", "hdml", "--head_dim", 64, "--generator_hidden", 0),
    case("finetune.npair_l2", "--npair_l2", -1),
    case("finetune.supervision", "--supervision", "oracle"),
    case("finetune.pseudo_labels", "--pseudo_labels", 1),

    case("whiten.method", "--method", "zca"),
    case("whiten.dim", "--dim", -1),
    case("whiten.eps", "--eps", -1),
    case("whiten.lw_neighbours", "--lw_neighbours", 0),
    case("whiten.batch_size", "--batch_size", 0),

    case("evaluate.ks", "--ks", 0),
    case("evaluate.kmeans_seed", "--kmeans_seed", "zero"),
    case("evaluate.kmeans_seed", "--kmeans_seed", -1),
    case("evaluate.kmeans_n_init", "--kmeans_n_init", 0),
    case("evaluate.precision_ks", "--precision_ks", 0),
    case("evaluate.batch_size", "--batch_size", 0),

    case("proxy_retrieval.objects", "--objects", 1),
    case("proxy_retrieval.views_in_database", "--views_in_database", 0),
    case("proxy_retrieval.levels", "--levels", "extreme"),
    case("proxy_retrieval.seed", "--seed", "zero"),
    case("proxy_retrieval.seed", "--objects", 10, "--seed", -1),
    flag("proxy_retrieval.raw_pixels"),
    case("proxy_retrieval.precision_ks", "--precision_ks", 0),
    case("proxy_retrieval.scales", "--scales", 0),
    case("proxy_retrieval.threads", "--threads", -1),

    case("pool_figure.ours", "--ours", "../x"),
    case("pool_figure.baseline", "--baseline", "a/b"),
    case("pool_figure.anchors", "--anchors", 0),
    case("pool_figure.members", "--members", 21),
    case("pool_figure.seed", "--seed", -1),

    case("index.splits", "--splits", "train", "--splits", "train"),
    case("index.batch_size", "--batch_size", 0),
    case("index.threads", "--threads", -1),
]
# params.yaml entries that are no stage's option, with the reason.
NOT_OPTIONS = {
    "grid.seeds": "DVC matrix of the Table 1 grid stages in ablations/dvc.yaml (checked by stages/report.py)",
    "grid.rows": "DVC matrix of the Table 1 grid stages in ablations/dvc.yaml (checked by stages/report.py)",
    "grid.anchor_sets": "DVC foreach of grid_anchors/grid_diffuse in ablations/dvc.yaml (options checked by stages/anchors.py)",
}
# Sections whose stage is being written: their cases are still to add.
PENDING_SECTIONS = set()


def params_of_yaml() -> set[str]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return {f"{section}.{key}" for section, values in params.items() for key in values}


def test_table_covers_every_param():
    covered = {entry.param for entry in CASES}
    pending = {param for param in params_of_yaml() if param.split(".")[0] in PENDING_SECTIONS}
    missing = params_of_yaml() - covered - set(NOT_OPTIONS) - pending
    assert not missing, f"add a case to CASES in tests/test_param_validation.py for each of {sorted(missing)}"
    assert covered <= params_of_yaml(), covered - params_of_yaml()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Small valid inputs of every stage: 300 banana items (so every default of
    params.yaml is in range), the mining stages run once on them."""
    root = tmp_path_factory.mktemp("inputs")
    features, curve, _ = banana_features(n_per_curve=100, n_curves=3)
    artifacts.save_npy(root / "features.npy", features)
    n = len(features)
    tiles = [np.full((4, 4, 3), i % 251, np.uint8) for i in range(n)]
    for split in ("train", "val", "new_images", "new_classes"):
        write_image_store(root / "prepared" / split, iter(tiles),
                          {"source": ["t"] * n, "split": [split] * n, "origin": [str(i) for i in range(n)],
                           "label": [int(c) for c in curve]})
    (root / "prepared" / "report.json").write_text("{}")
    for folder, count in (("images", 3), ("test_images", 2)):
        (root / folder).mkdir()
        for i in range(count):
            from PIL import Image
            Image.fromarray(tiles[i]).save(root / folder / f"{i}.png")
    (root / "gt.csv").write_text("query,database\n0.png,1.png\n")
    for command, args in (
        (graph, ["--features", root / "features.npy", "--out-dir", root / "graph"]),
        (anchors, ["--graph", root / "graph/adjacency.npz", "--out-dir", root / "anchors"]),
        (diffuse, ["--graph", root / "graph/adjacency.npz", "--anchors", root / "anchors/anchors.parquet",
                   "--features", root / "features.npy", "--out-dir", root / "diffuse", "--threads", 1, "--k", 100]),
        (mine, ["--features", root / "features.npy", "--anchors", root / "anchors/anchors.parquet",
                "--manifold", root / "diffuse/manifold_knn.parquet", "--prepared", root / "prepared/train",
                "--out-dir", root / "mine", "--k_neg", 100]),
    ):
        result = invoke(command, args)
        assert result.exit_code == 0, result.stderr
    return root


def inputs_args(stage: str, root: Path, out: Path) -> list:
    """The stage's input and output options: valid inputs, outputs under ``out``.
    The model and whitening do not exist: every option must be checked before
    they are read."""
    model, whitening_file = out / "no-model.pt", out / "no-whitening.npz"
    return {
        "prepare": ["--out-dir", out / "prepared", "--workers", 1, "--train_classes", 5, "--test_classes", 0],
        "extract": ["--prepared", root / "prepared", "--out-dir", out / "features"],
        "graph": ["--features", root / "features.npy", "--out-dir", out / "graph"],
        "anchors": ["--graph", root / "graph/adjacency.npz", "--out-dir", out / "anchors"],
        "diffuse": ["--graph", root / "graph/adjacency.npz", "--anchors", root / "anchors/anchors.parquet",
                    "--features", root / "features.npy", "--out-dir", out / "diffuse", "--k", 100],
        "mine": ["--features", root / "features.npy", "--anchors", root / "anchors/anchors.parquet",
                 "--manifold", root / "diffuse/manifold_knn.parquet", "--prepared", root / "prepared/train",
                 "--out-dir", out / "mine", "--k_neg", 100],
        "finetune": ["--train", root / "prepared/train", "--val", root / "prepared/val",
                     "--pools", root / "mine/pools.parquet", "--anchors", root / "anchors/anchors.parquet",
                     "--out-dir", out / "finetune", "--checkpoint-dir", out / "checkpoints"],
        "whiten": ["--model", model, "--train", root / "prepared/train",
                   "--manifold-knn", root / "diffuse/manifold_knn.parquet", "--out-dir", out / "whiten"],
        "evaluate": ["--model", model, "--start", "", "--whitening", whitening_file, "--prepared", root / "prepared",
                     "--features", out / "no-features", "--finetune-log", "",
                     "--report", out / "reports/evaluate.json", "--metrics", out / "metrics/evaluate.json",
                     "--proxy-report", "", "--plots-dir", out / "plots"],
        "proxy_retrieval": ["--prepared", root / "prepared", "--model", model, "--whitening", whitening_file,
                            "--report", out / "reports/proxy.json", "--plots-dir", out / "plots"],
        "pool_figure": ["--grid-dir", out / "grid", "--train", root / "prepared/train", "--out", out / "pools.png"],
        "index": ["--prepared", root / "prepared", "--features", out / "no-features", "--model", model,
                  "--whitening", whitening_file, "--out-dir", out / "index"],
    }[stage]


def invoke(command, args):
    # stage_command calls logging.basicConfig, which binds to the stderr of the
    # first call only: start each run with no handler so its lines are caught.
    logging.getLogger().handlers.clear()
    return CliRunner().invoke(command.main, [str(arg) for arg in args])


def substitute(args: tuple[str, ...], root: Path) -> list[str]:
    named = {"IMAGES": root / "images", "TEST_IMAGES": root / "test_images", "GROUND_TRUTH": root / "gt.csv"}
    return [str(named.get(arg, arg)) for arg in args]


def cases_with_marks():
    for entry in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=entry.todo)] if entry.todo else []
        yield pytest.param(entry, marks=marks, id=f"{entry.param}={' '.join(entry.args[-1:])}")


@pytest.mark.parametrize("entry", list(cases_with_marks()))
def test_invalid_value_is_one_line_naming_the_param(entry, inputs, tmp_path):
    stage, key = entry.param.split(".")
    out = tmp_path / "out"
    result = invoke(COMMANDS[stage], [*inputs_args(stage, inputs, out), *substitute(entry.args, inputs)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stderr[-2000:], result.exception)
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"{stage}: error: "), line
    assert re.search(rf"(?<![\w-])(--)?{re.escape(key)}(?!\w)", line), f"{key} not named in: {line}"
    assert ALLOWED_HINT.search(line), f"no allowed values in: {line}"
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert written == [], written


# Lists whose emptiness must reach the stage: DVC renders `[]` as no option at all.
NO_CLICK_DEFAULT = {("prepare", "train_classes"): "an empty list must be an error, not the default",
                    ("prepare", "test_classes"): "an empty list must be an error, not the default"}

STAGE_SECTIONS = ["prepare", "extract", "graph", "anchors", "diffuse", "mine", "finetune", "whiten", "evaluate",
                  "proxy_retrieval", "pool_figure", "index"]


@pytest.mark.parametrize("section", STAGE_SECTIONS)
def test_click_defaults_equal_params_yaml(section):
    """A stage run by hand (`python -m stages.<name>`) behaves like `dvc repro` with the committed params."""
    import importlib

    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())[section]
    command = importlib.import_module(f"stages.{section}").main
    defaults = {opt.lstrip("-"): option.default for option in command.params for opt in option.opts}
    for key, value in params.items():
        if (section, key) in NO_CLICK_DEFAULT:  # behaviour tested in test_prepare_fashion_mnist.py
            continue
        default = defaults[key]
        default = list(default) if isinstance(default, tuple) else default
        if default == ["auto"] and value == "auto":  # a list option given as auto (mom/autosize.py)
            default = "auto"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert float(default) == float(value), f"{section}.{key}: params.yaml {value!r}, click default {default!r}"
        else:
            assert str(default) == str(value), f"{section}.{key}: params.yaml {value!r}, click default {default!r}"
