"""Scale benchmark of the pipeline a user runs (issue 15): ``dvc repro`` of graph -> anchors -> diffuse -> mine.

Writes a synthetic collection (:mod:`synthetic`: ``--mode giant``, one graph
component, or ``--mode clusters``) as ``data/features/train.npy`` and a label-only
image store ``data/prepared/train`` into a throw-away DVC workspace whose
``dvc.yaml`` holds the repository's own stage definitions (taken from its
``dvc.yaml``: commands, deps, params, outs as they are) and whose ``params.yaml``
is the repository's with the retrieval settings at 1M (1,500 stationary anchors,
``diffuse.k`` = ``mine.k_neg`` = 10,000). The workspace gets copies of ``mom/``
and ``stages/``, the code deps of the stages. Then:

1. ``dvc repro --single-item <stage>`` per stage, each timed from outside (wall,
   CPU user+sys, peak RSS of DVC and the stage, load average) and split into the
   stage's own steps (its ``... in X s`` log lines) and the rest (Python start,
   DVC hashing and caching);
2. a second ``dvc repro`` (must say up to date), timed;
3. ``dvc status`` after changing ``mine.k_neg`` (must name only ``mine``; restored);
4. block CG against one scipy ``cg`` call per anchor on the workspace's graph:
   20 iterations each, full-length vectors (no reachable-rows shortcut).

    python benchmarks/pipeline.py --n 1000000 --mode giant     # the acceptance run
    python benchmarks/pipeline.py --n 50000 --mode giant       # a quick one

Prints a table and the results as JSON (``--json`` also writes them). Numbers
only, no assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: this checkout's mom

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from mom import artifacts  # noqa: E402
from mom.imagestore import write_image_store  # noqa: E402
from synthetic import MODES, mode_collection  # noqa: E402

MINING_STAGES = ("graph", "anchors", "diffuse", "mine")
RETRIEVAL = {"anchors.strategy": "stationary", "anchors.count": 1500, "diffuse.k": 10_000, "mine.k_neg": 10_000}
GIB = 2 ** 30
# run a command, then report the CPU time and peak RSS of everything it started (one fresh process per stage)
RUSAGE = ("import json, resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
          "use = resource.getrusage(resource.RUSAGE_CHILDREN); "
          "open(sys.argv[1], 'w').write(json.dumps({'returncode': code, 'cpu_seconds': use.ru_utime + use.ru_stime, "
          "'peak_rss_gib': use.ru_maxrss * 1024 / 2 ** 30}))")
STEP_LINE = re.compile(r"^\d\d:\d\d:\d\d (\w+): (.+) in ([0-9.]+) s$")


def stage_definitions(root: Path = ROOT) -> dict:
    """The mining stages exactly as the repository's ``dvc.yaml`` defines them."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {name: stages[name] for name in MINING_STAGES}


def workspace_params(overrides: dict, root: Path = ROOT) -> dict:
    """The repository's params of the mining stages with ``{"section.key": value}`` overrides."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params = {name: params[name] for name in MINING_STAGES}
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        if key not in params[section]:
            raise KeyError(f"{dotted}: not a param of params.yaml")
        params[section][key] = value
    return params


def copy_code(work: Path) -> None:
    """``mom/`` and ``stages/`` (the stages' code deps); numba's compiled cache comes along (mtimes kept)."""
    for package in ("mom", "stages"):
        shutil.copytree(ROOT / package, work / package, ignore=shutil.ignore_patterns("*.pyc"), dirs_exist_ok=True)


def make_workspace(work: Path, n: int, mode: str, overrides: dict, cache_type: str, seed: int = 0) -> dict:
    """A DVC workspace at ``work`` with the real mining stages and a synthetic collection of ``n`` items."""
    work.mkdir(parents=True, exist_ok=True)
    copy_code(work)
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": stage_definitions()}, sort_keys=False))
    (work / "params.yaml").write_text(yaml.safe_dump(workspace_params(overrides), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    dvc(work, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", work / ".dvc" / "config")
    shutil.copy(ROOT / ".dvcignore", work / ".dvcignore")
    if cache_type:
        dvc(work, "config", "cache.type", cache_type)
    start = time.perf_counter()
    features, labels = mode_collection(work / "data/features/train.npy", n, mode, seed=seed)
    write_image_store(work / "data/prepared/train", (np.zeros((1, 1), np.uint8) for _ in range(n)),
                      {"source": ["synthetic"] * n, "split": ["train"] * n, "origin": [str(i) for i in range(n)],
                       "label": labels})
    return {"items": n, "dim": int(features.shape[1]), "mode": mode, **MODES[mode],
            "generate_seconds": round(time.perf_counter() - start, 1)}


def environment() -> dict:
    """Environment of the workspace's commands: this interpreter's ``python`` and ``dvc`` first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1"}


def dvc(work: Path, *args) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=work, env=environment(),
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def timed_dvc(work: Path, name: str, *args) -> dict:
    """Run ``dvc args`` in a fresh process; wall and CPU time, peak RSS, load, and its log lines."""
    log_path, usage_path = work / "logs" / f"{name}.log", work / "logs" / f"{name}.json"
    log_path.parent.mkdir(exist_ok=True)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        subprocess.run([sys.executable, "-c", RUSAGE, str(usage_path), sys.executable, "-m", "dvc", *args],
                       cwd=work, env=environment(), stdout=log, stderr=subprocess.STDOUT, check=True)
    usage = json.loads(usage_path.read_text())
    text = log_path.read_text()
    if usage["returncode"]:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{text[-3000:]}")
    return {"seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(usage["cpu_seconds"], 1),
            "peak_rss_gib": round(usage["peak_rss_gib"], 2), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2), "log": text}


def stage_steps(log: str, stage: str) -> dict:
    """The stage's own ``<what> in <seconds> s`` log lines (``finished`` = the whole command)."""
    steps = {}
    for line in log.splitlines():
        match = STEP_LINE.match(line.strip())
        if match and match.group(1) == stage:
            steps[match.group(2)] = float(match.group(3))
    return steps


def run_stages(work: Path) -> dict:
    results = {}
    for stage in MINING_STAGES:
        print(f"-- dvc repro --single-item {stage} ...", flush=True)
        info = timed_dvc(work, stage, "repro", "--single-item", stage)
        steps = stage_steps(info.pop("log"), stage)
        own = steps.pop("finished", float("nan"))
        outs = output_sizes(work, stage)
        results[stage] = {**info, "stage_seconds": own, "outside_stage_seconds": round(info["seconds"] - own, 1),
                          "steps": steps, "outputs_mib": outs}
        print(f"   {stage}: {json.dumps(results[stage])}", flush=True)
    return results


def output_sizes(work: Path, stage: str) -> dict:
    sizes = {}
    for out in stage_definitions()[stage]["outs"]:
        path = work / (out if isinstance(out, str) else next(iter(out)))
        sizes[path.name] = round(path.stat().st_size / 2 ** 20, 1) if path.is_file() else None
    return sizes


def second_repro_and_status(work: Path) -> dict:
    """A second ``dvc repro`` (nothing to run) and what ``dvc status`` names after a ``mine.k_neg`` change."""
    again = timed_dvc(work, "repro_again", "repro")
    log = again.pop("log")
    params_path = work / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["mine"]["k_neg"] = params["mine"]["k_neg"] - 1
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = dvc(work, "status")
    finally:
        params_path.write_text(original)
    stale = sorted({line.strip().rstrip(":") for line in status.splitlines()
                    if line and not line.startswith((" ", "\t"))} & set(MINING_STAGES))
    return {"second_repro": {**again, "up_to_date": "Running stage" not in log},
            "k_neg_change_stale_stages": stale}


def cg_comparison(work: Path, block_size: int, scipy_anchors: int, max_iter: int, threads: int) -> dict:
    """Seconds per anchor: the fused block CG on one block, one scipy ``cg`` per anchor, the block CG
    with scipy's products; same graph, same iterations, full-length vectors (no shortcut)."""
    from scipy.sparse.linalg import cg

    from mom.cg import fused_block_cg
    from mom.diffusion import block_cg, diffusion_system, locality_order, normalized_adjacency

    adjacency = artifacts.load_csr(work / "data/graph/adjacency.npz")
    anchors = artifacts.load_parquet(work / "data/anchors/anchors.parquet").column("item").to_numpy()
    order = locality_order(adjacency)
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    systems = {"reordered": diffusion_system(normalized_adjacency(adjacency[order][:, order].tocsr()), 0.99),
               "original": diffusion_system(normalized_adjacency(adjacency), 0.99)}
    block = np.sort(position[anchors])[:block_size]  # the diffuse stage's first block
    rhs = np.zeros((adjacency.shape[0], len(block)), dtype=np.float32)
    rhs[block, np.arange(len(block))] = 0.01
    results = {"iterations": max_iter, "block_anchors": len(block), "threads": threads}
    fused_block_cg(systems["reordered"][:2, :2], rhs[:2, :1], 1, 0.0)  # load the compiled kernels first
    for name, solve in (("fused_block_cg", fused_block_cg), ("scipy_product_block_cg", block_cg)):
        seconds, cpu = clock(lambda: solve(systems["reordered"], rhs, max_iter, 0.0, 0.0, threads))
        results[name] = {"per_anchor_seconds": round(seconds / len(block), 4),
                         "per_anchor_cpu_seconds": round(cpu / len(block), 4)}
    for name, system in systems.items():
        chosen = block[:scipy_anchors] if name == "reordered" else order[block[:scipy_anchors]]
        seconds, cpu = clock(lambda: [scipy_cg(system, anchor, max_iter, cg) for anchor in chosen])
        results[f"scipy_cg_{name}"] = {"per_anchor_seconds": round(seconds / len(chosen), 4),
                                       "per_anchor_cpu_seconds": round(cpu / len(chosen), 4)}
    fused = results["fused_block_cg"]["per_anchor_seconds"]
    results["speedup_vs_scipy_cg_original_order"] = round(results["scipy_cg_original"]["per_anchor_seconds"] / fused, 2)
    results["speedup_vs_scipy_cg_reordered"] = round(results["scipy_cg_reordered"]["per_anchor_seconds"] / fused, 2)
    return results


def scipy_cg(system, anchor: int, max_iter: int, cg) -> None:
    rhs = np.zeros(system.shape[0], dtype=np.float32)
    rhs[anchor] = 0.01
    cg(system, rhs, x0=np.zeros_like(rhs), rtol=1e-30, atol=0, maxiter=max_iter)


def clock(function) -> tuple[float, float]:
    """Wall and CPU (user+sys) seconds of ``function()``."""
    start, cpu = time.perf_counter(), sum(os.times()[:2])
    function()
    return time.perf_counter() - start, sum(os.times()[:2]) - cpu


def summary(results: dict) -> str:
    lines = ["| stage | wall s | stage's own s | outside (start, DVC) s | CPU user+sys s | peak RSS GiB | "
             "load (before/after) | outputs MiB |", "|---|---|---|---|---|---|---|---|"]
    for stage in MINING_STAGES:
        info = results["stages"][stage]
        outs = ", ".join(f"{name} {size}" for name, size in info["outputs_mib"].items())
        lines.append(f"| {stage} | {info['seconds']} | {info['stage_seconds']} | {info['outside_stage_seconds']} | "
                     f"{info['cpu_seconds']} | {info['peak_rss_gib']} | {info['load_before']}/{info['load_after']} | "
                     f"{outs} |")
    total = results["total"]
    lines.append(f"| **total** | **{total['seconds']}** | {total['stage_seconds']} | | {total['cpu_seconds']} | "
                 f"**{total['peak_rss_gib']}** | | |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--mode", choices=sorted(MODES), default="giant")
    parser.add_argument("--anchors", type=int, default=RETRIEVAL["anchors.count"])
    parser.add_argument("--k-neg", type=int, default=RETRIEVAL["mine.k_neg"], help="mine.k_neg and diffuse.k")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="another param override (YAML value), e.g. diffuse.threads=2")
    parser.add_argument("--cache-type", default="", help="DVC cache.type (default: DVC's, reflink,copy)")
    parser.add_argument("--cg-block", type=int, default=64, help="anchors of the block CG comparison (0: skip it)")
    parser.add_argument("--scipy-anchors", type=int, default=8, help="anchors timed with scipy cg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="", help="the workspace (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workspace (a temporary one is removed)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    overrides = {**RETRIEVAL, "anchors.count": args.anchors, "diffuse.k": args.k_neg, "mine.k_neg": args.k_neg}
    overrides.update({key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)})
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    results = {"config": {**vars(args), "overrides": overrides, "cores": os.cpu_count(),
                          "load_at_start": os.getloadavg(), "workspace": str(work)}}
    print(json.dumps(results["config"]), flush=True)
    try:
        results["collection"] = make_workspace(work, args.n, args.mode, overrides, args.cache_type, args.seed)
        print(f"   collection: {results['collection']}", flush=True)
        results["stages"] = run_stages(work)
        stages = results["stages"].values()
        results["total"] = {"seconds": round(sum(s["seconds"] for s in stages), 1),
                            "stage_seconds": round(sum(s["stage_seconds"] for s in stages), 1),
                            "cpu_seconds": round(sum(s["cpu_seconds"] for s in stages), 1),
                            "peak_rss_gib": max(s["peak_rss_gib"] for s in stages)}
        results.update(second_repro_and_status(work))
        graph = artifacts.load_json(work / "data/graph/report.json")
        results["graph"] = {"search": graph["search"], "components": graph["components"], "edges": graph["edges"]}
        diffuse = artifacts.load_json(work / "data/diffuse/report.json")
        results["diffuse"] = {"anchors": diffuse["anchors"], "relative_residual": diffuse["relative_residual"],
                              "per_anchor_seconds": round(results["stages"]["diffuse"]["stage_seconds"]
                                                          / diffuse["anchors"], 4)}
        results["dvc"] = {"cache_type": dvc(work, "config", "cache.type").strip() if args.cache_type else
                          "reflink,copy (DVC's default)", "cache_mib": round(folder_size(work / ".dvc/cache") / 2 ** 20)}
        if args.cg_block:
            print("-- block CG vs scipy cg ...", flush=True)
            threads = int(overrides.get("diffuse.threads", 0)) or os.cpu_count()
            results["cg"] = cg_comparison(work, args.cg_block, args.scipy_anchors, 20, threads)
        results["load_at_end"] = os.getloadavg()
        print(json.dumps(results, indent=2), flush=True)
        print(summary(results), flush=True)
        if args.json:
            artifacts.save_json(args.json, results)
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


if __name__ == "__main__":
    main()
