"""The epoch plan's read amplification and same-study duplicates, against the old plan and a global shuffle.

    python bench/data_plan.py [--studies 20000] [--micro-batch 36] [--window 512] [--worlds 1,2,4,8,32,64]

Planning only (no pixels, seconds): builds an EMBED-like index — ``--studies`` training studies
with 1–8 usable images (mean ≈ 4.1), 64 studies per Parquet row group, 690 studies per file
(29 files, 315 row groups at 20,000 studies) — and for each world size W compares

* **ours**: :func:`mama_ray.data.plan.epoch_plan` (row groups dealt whole to ranks, spread order);
* **old**: the previous plan (files permuted, a windowed shuffle of 64 positions, position p to
  rank p % W: every rank reads nearly every row group);
* **shuffle**: a global random permutation of the same images, position p to rank p % W (what
  the original trained with; its reads are every row group holding one of a rank's samples).

Read amplification = row groups read summed over ranks ÷ row groups holding a sample.
Duplicates = micro-batch size − distinct studies in a micro-batch (mean over the epoch's full
micro-batches); per global batch the same over the W micro-batches of one step (grad_accum 1).
Prints one table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import numpy as np  # noqa: E402

from mama_ray.data.plan import PlanParams, SplitIndex, epoch_plan  # noqa: E402

STUDIES_PER_GROUP, STUDIES_PER_FILE = 64, 690
IMAGES_P = np.array([0.05, 0.08, 0.07, 0.60, 0.07, 0.06, 0.04, 0.03])  # P(1..8 usable images per study)
OLD_BUFFER = 64  # the old plan's data.shuffle_buffer default


def embed_like_index(n_studies: int, seed: int = 0) -> SplitIndex:
    """A synthetic training index shaped like EMBED's (see the module doc)."""
    counts = np.random.default_rng(seed).choice(np.arange(1, 9), n_studies, p=IMAGES_P)
    return SplitIndex.laid_out(counts, STUDIES_PER_GROUP, STUDIES_PER_FILE)


def duplicates(streams: list[np.ndarray], study: np.ndarray, mbs: int) -> tuple[float, float]:
    """Mean (per micro-batch, per global batch) of size − distinct studies; streams = per rank sample ids."""
    steps = min(len(s) for s in streams) // mbs
    per_micro, per_global = [], []
    for m in range(steps):
        batches = [study[s[m * mbs : (m + 1) * mbs]] for s in streams]
        per_micro += [mbs - len(np.unique(b)) for b in batches]
        both = np.concatenate(batches)
        per_global.append(len(both) - len(np.unique(both)))
    return float(np.mean(per_micro)), float(np.mean(per_global))


def amplification(streams: list[np.ndarray], unit: np.ndarray) -> float:
    return sum(len(np.unique(unit[s])) for s in streams) / len(np.unique(unit))


def old_streams(index: SplitIndex, world: int, seed: int = 42, epoch: int = 0) -> list[np.ndarray]:
    """The previous plan: per rank, its sample ids in its order (positions p % W == rank)."""
    rng = np.random.default_rng([seed, epoch, 1])
    order = rng.permutation(len(index.files))
    first = np.concatenate(([0], np.cumsum([c.sum() for c in index.counts])))
    stream = np.concatenate([np.arange(first[f], first[f + 1]) for f in order])  # q in read order
    n = len(stream)
    pos = np.empty(n, np.int64)
    for start in range(0, n, OLD_BUFFER):
        stop = min(n, start + OLD_BUFFER)
        pos[start:stop] = start + np.random.default_rng([seed, epoch, 2, start]).permutation(stop - start)
    by_pos = np.empty(n, np.int64)
    by_pos[pos] = stream
    per_rank = n // world
    return [by_pos[r::world][:per_rank] for r in range(world)]


def shuffle_streams(n: int, world: int, seed: int = 42) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[r::world][: n // world] for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=20_000)
    ap.add_argument("--micro-batch", type=int, default=36)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--worlds", default="1,2,4,8,32,64")
    args = ap.parse_args()
    index = embed_like_index(args.studies)
    flat, mbs, n = index.flat, args.micro_batch, index.num_samples
    print(f"{args.studies} studies, {n} images ({n / args.studies:.2f} per study), {len(index.files)} files, "
          f"{len(flat.unit_file)} row groups of {STUDIES_PER_GROUP} studies; micro-batch {mbs}, "
          f"plan window {args.window}")
    print("| W | read amp. ours | old | shuffle | dup/micro ours | old | shuffle | ours/shuffle "
          "| dup/global ours | old | shuffle | ours/shuffle | dropped ours | plan s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for world in (int(w) for w in args.worlds.split(",")):
        t0 = time.perf_counter()
        ranks, _ = epoch_plan(index, PlanParams(42, 0, mbs, mbs * world, args.window), world)
        seconds = time.perf_counter() - t0
        ours = [np.concatenate([w.samples for w in windows]) for windows in ranks]
        old, shuffled = old_streams(index, world), shuffle_streams(n, world)
        amp = [amplification(s, flat.sample_unit) for s in (ours, old, shuffled)]
        dups = [duplicates(s, flat.sample_study, mbs) for s in (ours, old, shuffled)]
        ratio = [d[k] / dups[2][k] if dups[2][k] else float("nan") for d in dups[:1] for k in (0, 1)]
        dropped = 1 - sum(len(s) for s in ours) / n
        print(f"| {world} | {amp[0]:.3f}× | {amp[1]:.2f}× | {amp[2]:.2f}× | {dups[0][0]:.3f} | {dups[1][0]:.2f} | "
              f"{dups[2][0]:.3f} | {ratio[0]:.2f} | {dups[0][1]:.2f} | {dups[1][1]:.1f} | {dups[2][1]:.1f} | "
              f"{ratio[1]:.2f} | {100 * dropped:.2f} % ({n - sum(len(s) for s in ours)}) | {seconds:.1f} |")


if __name__ == "__main__":
    main()
