"""One-GPU benchmark of the training step: pairs/s, step time, peak memory, data wait and MFU.

For the ``base`` model (ViT-B/14 reg4 at 518 px + a 2560-wide, 32-layer GPT-2 trunk with LoRA,
random init, bf16) it times our training step — ``mama_ray.train.loop.make_engine`` (DeepSpeed) and
``micro_step``, the exact code a Ray Train worker runs, in one process through ``LocalContext``
— for ZeRO-2 and ZeRO-3, activation checkpointing off and on (both towers), in the early phase
(CLIP only, one view) and the late phase (every term, two views), and the same model, batches
and ``micro_step`` driven by a plain PyTorch engine (``torch.optim.AdamW``, bf16 weights, no
DeepSpeed, no Ray) as the baseline of each setting. MFU = pairs/s × model FLOPs per pair
(``mama_ray.models.flops``) ÷ the device's dense bf16 peak; HFU adds the recompute.

Data: in-memory micro-batches of the training-sample contract (docs/architecture.md, batch dict: uint8 gray views
broadcast to 3 channels, real structured captions with meta masking, tokenised by the pipeline's
``caption_tokens``), cycled. The Ray Data pipeline is benchmarked on its own (bench/pipeline.py); here
it would only measure the CPUs of the box. Data wait is still measured — the time ``EpochCursor``
waits for the next batch — and is ≈ 0 by construction; the host→device copy is inside the step.

Each setting runs in its own subprocess (a fresh CUDA context: an out-of-memory row cannot leak
into the next, and the peak memory is that setting's alone).

    python bench/gpu.py                    # one GPU, ≈ 3–5 min on an H100
    python bench/gpu.py --dry-run          # no GPU needed: the FLOP model per pair and the plan
    python bench/gpu.py --cpu-smoke        # tiny preset, 2 steps per phase on CPU (fp32)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mama_ray import config  # noqa: E402
from mama_ray.models.flops import DEFAULT_SENTENCES, PairFlops, mfu, pair_flops, peak_tflops  # noqa: E402

RESULT = "RESULT "  # prefix of a subprocess's one result line
PHASES = ("early", "late")


@dataclass(frozen=True)
class Setting:
    """One row group of the table: which loop, ZeRO stage (ours only), checkpointing."""

    loop: str  # "ours" (DeepSpeed engine) or "plain" (torch AdamW)
    zero: int  # ZeRO stage; ignored by the plain loop
    ckpt: bool  # activation checkpointing of both towers

    @property
    def name(self) -> str:
        return f"{self.loop} zero{self.zero} ckpt{'on' if self.ckpt else 'off'}" if self.loop == "ours" \
            else f"plain ckpt{'on' if self.ckpt else 'off'}"


def bench_config(args: argparse.Namespace, s: Setting) -> config.Config:
    """The benchmarked config: the preset with the setting, one worker, late terms from step 1."""
    from mama_ray.models import BIOMEDLM_VOCAB

    base = args.preset == "base"
    cfg = config.load("tiny_cpu") if not base else config.from_dict({"model": {"preset": "base"}})
    return config.override(cfg, {
        "deepspeed.zero_stage": s.zero, "model.vision.grad_ckpt": s.ckpt, "model.text.grad_ckpt": s.ckpt,
        # the frozen trunk + LoRA of the method; BioMedLM's vocabulary, so memory is the real model's
        "model.text.train_trunk": False, "model.text.vocab_size": BIOMEDLM_VOCAB if base else 0,
        "train.micro_batch_size": args.micro_batch, "train.grad_accum": args.grad_accum,
        "scaling.num_workers": 1, "loss.late_loss_step": 1, "optim.warmup_steps": 1,
        "deepspeed.precision": args.precision,
    })


def plan(args: argparse.Namespace) -> list[Setting]:
    ours = [Setting("ours", z, c) for z in args.stages for c in args.ckpt]
    return ours + ([Setting("plain", 0, c) for c in args.ckpt] if args.plain else [])


# ---- data: in-memory micro-batches of the batch-dict contract ----------------------------------------


def synthetic_batches(cfg: config.Config, count: int, seed: int = 0) -> list[dict]:
    """``count`` micro-batches shaped as the pipeline's collate makes them, real captions included."""
    from mama_ray.data import captions
    from mama_ray.data.pipeline import caption_tokens
    from mama_ray.data.synthetic import ETHNICITIES, RACES

    rng = np.random.default_rng(seed)
    b, s = cfg.train.micro_batch_size, cfg.data.image_size
    out = []
    for _ in range(count):
        texts = []
        for _ in range(b):
            letter = str(rng.choice(list(captions.BIRADS_LETTERS)))
            f = captions.CaptionFields(
                "MG Screening Bilateral", "screening", int(rng.integers(40, 80)), str(rng.choice(RACES)),
                str(rng.choice(ETHNICITIES)), str(rng.choice(["L", "R"])), str(rng.choice(["CC", "MLO"])),
                int(rng.integers(1, 5)), letter, *(("oval", "high density", "punctate", "grouped")
                                                   if letter in "SMK" else (None,) * 4))
            texts.append(captions.to_model_text(captions.caption_text(f, captions.sample_masked(rng, cfg.text.mask_meta))))
        tok = {k: torch.from_numpy(v) for k, v in caption_tokens(cfg, texts).items()}
        views = [torch.from_numpy(rng.integers(0, 256, (b, 1, s, s), dtype=np.uint8)) for _ in range(2)]
        out.append({"image1": views[0].expand(-1, 3, -1, -1), "image2": views[1].expand(-1, 3, -1, -1), **tok})
    return out


def padded_sentences(batches: list[dict]) -> float:
    """Mean over batches of the padded sentence slots M (the largest separator count)."""
    return float(np.mean([int(b["sep_mask"].sum(1).max()) for b in batches]))


class Cycle:
    """A BatchSource (train/loop.py) that cycles fixed batches forever."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def epoch_batches(self, epoch: int, skip_samples: int):
        while True:
            yield from self.batches


# ---- the two engines ------------------------------------------------------------------------------


class PlainEngine:
    """The baseline behind the three engine calls ``micro_step`` makes: forward, backward, step.

    torch AdamW over our parameter groups (``build_optimizer``), weights in ``dtype`` (bf16 where our
    engine runs bf16: the same matmul dtypes, without DeepSpeed's fp32 master copy); the loss is
    divided by the accumulation and the optimizer steps at the boundary, as DeepSpeed does.
    """

    def __init__(self, model: torch.nn.Module, cfg: config.Config, dtype: torch.dtype):
        from mama_ray.train.loop import TwoViews
        from mama_ray.train.optim import build_optimizer

        self.module = TwoViews(model.to(dtype))
        self.optimizer = build_optimizer(model, cfg)
        self.accum, self.micro = cfg.train.grad_accum, 0

    def __call__(self, *inputs):
        return self.module(*inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def train(self) -> None:
        self.module.train()


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _process_group(ctx, device: torch.device) -> None:
    """One-rank process group: NCCL on a GPU (DeepSpeed's collectives need it), else LocalContext's gloo."""
    from mama_ray.train.context import free_port

    if device.type == "cuda" and not torch.distributed.is_initialized():
        os.environ["DS_ACCELERATOR"] = "cuda"  # LocalContext would default it to cpu
        port = free_port()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    ctx.__enter__()
    ctx.device = device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_phase(engine, objective, cursor, cfg: config.Config, late: bool, warmup: int, steps: int,
               device: torch.device) -> dict:
    """Warm-up optimizer steps, then ``steps`` timed ones, with the loop's ``micro_step`` and ``StepMeter``."""
    from mama_ray.train.loop import micro_step
    from mama_ray.train.metrics import StepMeter, peak_memory_mb

    step = cfg.loss.late_loss_step if late else 0
    meter = StepMeter()
    for k in range(warmup + steps):
        if k == warmup:
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            meter.reset()
        for _ in range(cfg.train.grad_accum):
            batch, wait = cursor.next()
            terms, _ = micro_step(engine, objective, batch, step, device)
            meter.add_micro(terms, len(batch["image1"]), wait)
        meter.steps += 1
    _sync(device)
    m = meter.summary(world_size=1)
    return {"step_time_s": m["step_time_s"], "pairs_per_s": m["samples_per_s"], "data_wait_frac": m["data_wait_frac"],
            "peak_memory_gib": peak_memory_mb(device) / 1024, "loss": m["loss"]}


def run_setting(args: argparse.Namespace, s: Setting) -> dict:
    """Build the model and the engine of one setting and time both phases; errors are results too."""
    from mama_ray import layout
    from mama_ray.data.tokenizer import load_tokenizer
    from mama_ray.losses import MamaObjective
    from mama_ray.models import build_model
    from mama_ray.train.context import LocalContext
    from mama_ray.train.deepspeed_config import resolve_precision
    from mama_ray.train.loop import EpochCursor, make_engine, seed_everything

    device = _device()
    cfg = bench_config(args, s)
    out: dict = {"setting": asdict(s), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    batches = synthetic_batches(cfg, args.batches)
    out["sentences"] = padded_sentences(batches)
    if device.type == "cuda":
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ctx = LocalContext(tmp)
            _process_group(ctx, device)
            seed_everything(cfg.run.seed)
            with device:  # initialise on the device: 2.8B random weights are slow to draw on the host
                model = build_model(cfg, load_tokenizer(cfg))
            if s.loop == "ours":
                engine = make_engine(model, cfg, ctx)
            else:
                bf16 = resolve_precision(cfg, device.type == "cuda") == "bf16"
                engine = PlainEngine(model, cfg, torch.bfloat16 if bf16 else torch.float32)
            engine.train()
            cursor = EpochCursor(Cycle(batches), layout.TrainState(world_size=1))
            objective = MamaObjective(cfg.loss)
            out["phases"] = {}  # filled phase by phase: an OOM in the late phase keeps the early numbers
            for p in PHASES:
                out["phases"][p] = time_phase(engine, objective, cursor, cfg, p == "late", args.warmup, args.steps, device)
        bad = [p for p, m in out.get("phases", {}).items() if not np.isfinite(m["loss"])]
        if bad:  # timed, but not a step anyone would train with
            out["error"] = f"non-finite loss in the {' and '.join(bad)} phase"
    except torch.cuda.OutOfMemoryError:
        out["error"] = "OOM"
    except Exception as e:  # reported in the table; the next setting still runs
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return out


def run_isolated(args: argparse.Namespace, s: Setting) -> dict:
    """``run_setting`` in a fresh Python process (its own CUDA context and peak memory)."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(asdict(s)), *args.passthrough]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.setting_timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if lines:
        return json.loads(lines[-1][len(RESULT):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"setting": asdict(s), "error": f"exit {proc.returncode}: {tail[0][:160]}"}


# ---- printing -----------------------------------------------------------------------------------


def flop_lines(early: PairFlops, late: PairFlops) -> list[str]:
    """The FLOP model per pair and component (GFLOP), early and late."""
    lines = ["| component | early fwd | early bwd | early recompute | late fwd | late bwd | late recompute |",
             "|---|---|---|---|---|---|---|"]
    rows = [*early.components, "total"]
    for name in rows:
        e = early.total if name == "total" else early.components[name]
        lt = late.total if name == "total" else late.components[name]
        lines.append(f"| {name} | " + " | ".join(f"{x / 1e9:.4g}" for x in
                     (e.forward, e.backward, e.recompute, lt.forward, lt.backward, lt.recompute)) + " |")
    for name, p in (("early", early), ("late", late)):
        lines.append(f"{name}: model {p.total.model / 1e12:.3f} TFLOP per pair (fwd + bwd, for MFU), "
                     f"hardware {p.total.hardware / 1e12:.3f} TFLOP (+ recompute, for HFU)")
    return lines


def flops_for(args: argparse.Namespace, s: Setting, sentences: float) -> dict[str, PairFlops]:
    cfg = bench_config(args, s)
    return {p: pair_flops(cfg, p == "late", sentences=sentences) for p in PHASES}


def print_dry_run(args: argparse.Namespace) -> None:
    print(f"FLOP model per training pair, {args.preset} preset, micro-batch {args.micro_batch}, "
          f"{DEFAULT_SENTENCES} sentence slots (GFLOP; docs/training.md 'FLOP model and MFU')")
    for ckpt in args.ckpt:
        f = flops_for(args, Setting("ours", 2, ckpt), DEFAULT_SENTENCES)
        print(f"\nactivation checkpointing {'on' if ckpt else 'off'} (both towers):")
        print("\n".join(flop_lines(f["early"], f["late"])))
    print(f"\nplan: {len(plan(args))} settings, each in its own process, each phase (early, late) "
          f"{args.warmup} warm-up + {args.steps} timed optimizer steps of {args.grad_accum} × {args.micro_batch} pairs:")
    for s in plan(args):
        print(f"  {s.name}")
    peak = f"{args.peak_tflops} TFLOP/s" if args.peak_tflops else "from the device name (H100/H200: 989 TFLOP/s)"
    print(f"peak for MFU: {peak}, dense bf16")


def result_rows(args: argparse.Namespace, results: list[dict], peak: float | None) -> list[str]:
    lines = ["| loop | ZeRO | grad ckpt | phase | step time (s) | pairs/s | data wait | peak mem (GiB) | "
             "TFLOP/pair | MFU | HFU | vs plain |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    plain = {(r["setting"]["ckpt"], p): m["pairs_per_s"] for r in results
             if r["setting"]["loop"] == "plain" for p, m in r.get("phases", {}).items()}
    for r in results:
        s = Setting(**r["setting"])
        head = f"| {s.loop} | {s.zero if s.loop == 'ours' else '-'} | {'on' if s.ckpt else 'off'} |"
        fl = flops_for(args, s, r.get("sentences", DEFAULT_SENTENCES))
        for p in PHASES:
            if p not in r.get("phases", {}):
                lines.append(f"{head} {p} | {r.get('error')} | | | | | | | |")
                continue
            m, f = r["phases"][p], fl[p].total
            rate = m["pairs_per_s"]
            util = [f"{100 * mfu(rate, x, peak):.1f}%" if peak else "n/a" for x in (f.model, f.hardware)]
            ref = plain.get((s.ckpt, p))
            lines.append(f"{head} {p} | {m['step_time_s']:.3f} | {rate:.1f} | {100 * m['data_wait_frac']:.1f}% | "
                         f"{m['peak_memory_gib']:.1f} | {f.model / 1e12:.4g} | {util[0]} | {util[1]} | "
                         f"{f'{rate / ref:.2f}' if ref else '-'} |")
    return lines


# ---- entry point --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the FLOP model and the plan; no GPU needed")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny preset, 1 + 1 steps per phase on CPU, fp32")
    ap.add_argument("--preset", choices=["base", "tiny"], default=None, help="default: base (tiny with --cpu-smoke)")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3], help="ZeRO stages of our loop")
    ap.add_argument("--ckpt", choices=["off", "on"], nargs="+", default=["off", "on"], help="activation checkpointing")
    ap.add_argument("--no-plain", dest="plain", action="store_false", help="skip the plain PyTorch baseline")
    ap.add_argument("--micro-batch", type=int, default=None, help="pairs per micro-batch (default 36, the paper's; 4 smoke)")
    ap.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 2; 1 smoke)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps per phase (default 2; 1 smoke)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per phase (default 3; 1 smoke)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="both loops' weights (deepspeed.precision); auto = bf16 on a GPU, fp32 on CPU")
    ap.add_argument("--batches", type=int, default=2, help="distinct in-memory micro-batches cycled")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: from the device name)")
    ap.add_argument("--in-process", action="store_true", help="run every setting in this process (tests; no isolation)")
    ap.add_argument("--setting-timeout", type=float, default=600, help="seconds one isolated setting may take")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    defaults = {"preset": "tiny" if smoke else "base", "micro_batch": 4 if smoke else 36,
                "grad_accum": 1 if smoke else 2, "warmup": 1 if smoke else 2, "steps": 1 if smoke else 3}
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--in-process"]
    args.passthrough = [a for i, a in enumerate(given) if a != "--worker" and (i == 0 or given[i - 1] != "--worker")]
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.ckpt = [c == "on" for c in args.ckpt]
    return args


def run_plan(args: argparse.Namespace) -> list[dict]:
    """Every setting of the plan, one after the other; prints a line as each ends."""
    started, results = time.perf_counter(), []
    for s in plan(args):
        results.append(run_setting(args, s) if args.in_process else run_isolated(args, s))
        print(f"  {s.name}: {results[-1].get('error') or 'done'} ({time.perf_counter() - started:.0f} s)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated collectives, per step
    if args.worker:
        print(RESULT + json.dumps(run_setting(args, Setting(**json.loads(args.worker)))), flush=True)
        return 0
    if args.dry_run:
        print_dry_run(args)
        return 0
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run (FLOP model and plan) or --cpu-smoke (tiny run on CPU)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results = run_plan(args)
    device = next((r["device"] for r in results if "device" in r), "cpu")
    peak = args.peak_tflops or peak_tflops(device)
    print(f"\n{args.preset} preset at {bench_config(args, plan(args)[0]).data.image_size} px on {device} "
          f"(peak {peak or 'unknown: pass --peak-tflops'} TFLOP/s), micro-batch {args.micro_batch} × accumulation "
          f"{args.grad_accum}, {args.warmup} warm-up + {args.steps} timed steps per phase, "
          f"in-memory batch dicts, {time.perf_counter() - started:.0f} s in all")
    print("\n".join(result_rows(args, results, peak)))
    for r in results:
        if r.get("error") and r.get("phases"):
            print(f"note: {Setting(**r['setting']).name}: {r['error']}")
    return 1 if any("error" in r and r["error"] != "OOM" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
