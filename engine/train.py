"""One training epoch (MAE's engine_pretrain shape): AMP, gradient accumulation with ``no_sync``,
clipping, a per-iteration lr schedule, non-finite loss handling, a progress line and TensorBoard.

The engine knows nothing of the method: ``losses = model(batch)`` and ``losses["loss"]`` is optimised;
every other entry is logged.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import itertools
import math
import time

import torch
import torch.distributed as tdist

from utils import lr_sched
from utils.dist import is_main_process
from utils.logging import MetricLogger, SmoothedValue

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_amp(amp: str | torch.dtype | None, device) -> torch.dtype | None:
    """cfg.train.amp -> autocast dtype, None for fp32. auto: bf16 on a GPU that has it, else fp16; fp32 on CPU."""
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    device = torch.device(device)
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp not in AMP_DTYPES:
        raise ValueError(f"train.amp must be auto|bf16|fp16|fp32, got {amp!r}")
    return AMP_DTYPES[amp]


def autocast(device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_scaler(dtype: torch.dtype | None, device) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16)


def to_device(batch: dict, device) -> dict:
    """Tensors to ``device`` (non_blocking); lists of ids/reports stay where they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def step_seed(seed: int, rank: int, epoch: int, it: int) -> int:
    """Torch's randomness in a step (masking, dropout, in-process augmentation) is a pure function of
    (seed, rank, epoch, iteration), so a run resumed mid-epoch draws what the uninterrupted run drew
    (fairseq seeds per update the same way). DataLoader workers keep their own seeds."""
    return (seed * 1_000_003 + rank * 7_919 + epoch * 100_003 + it) % (2 ** 63)


def position_loader(loader, epoch: int, start_step: int):
    """Set the sampler's epoch (its shuffling seed) and skip the first ``start_step`` batches.

    A sampler with ``set_start(n)`` (utils.run.ResumableSampler) skips without loading; any other
    loader is iterated past the skipped batches. Returns (iterator, batches in the full epoch)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if hasattr(sampler, "set_start"):
        sampler.set_start(0)  # a previous epoch may have started part-way
    num_batches = len(loader)
    if start_step and hasattr(sampler, "set_start"):
        sampler.set_start(start_step * loader.batch_size)
        return iter(loader), num_batches
    return itertools.islice(iter(loader), start_step, None), num_batches


class _seeded:
    """Yields (iteration, batch), reseeding torch before each batch is fetched: the randomness of
    loading (in-process augmentation) and of the step is a function of the iteration. Has a length
    (the progress line's ETA needs one)."""

    def __init__(self, batches, steps: range, seed_fn):
        self.batches, self.steps, self.seed_fn = batches, steps, seed_fn

    def __iter__(self):
        for it in self.steps:
            torch.manual_seed(self.seed_fn(it))
            try:
                batch = next(self.batches)
            except StopIteration:
                return
            yield it, batch

    def __len__(self):
        return len(self.steps)


def _reduce(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (one small collective per optimizer step; no-op in one process)."""
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(values)
    return values


def _world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def train_one_epoch(model, loader, optimizer, scaler, epoch: int, cfg, device, tb=None,
                    start_step: int = 0, on_step=None, print_fn=print) -> dict:
    """Train ``epoch`` from batch ``start_step`` on (a multiple of ``cfg.optim.accum_iter``).

    The global optimizer step is ``epoch * steps_per_epoch + step in epoch`` (skipped non-finite steps
    count), so logs and checkpoints line up across resumes. ``on_step(epoch, batches_done, global_step)``
    runs after every optimizer step (mid-epoch checkpoints). Returns the epoch's averaged stats.
    """
    model.train()
    rank, world = _world()
    accum = max(1, cfg.optim.accum_iter)
    dtype = resolve_amp(cfg.train.amp, device)
    clip = cfg.optim.clip_grad if cfg.optim.clip_grad and cfg.optim.clip_grad > 0 else math.inf
    ddp = hasattr(model, "no_sync")
    base_lr = lr_sched.effective_lr(cfg, world)  # optim.lr, or blr * effective batch / 256
    params = [p for p in model.parameters() if p.requires_grad]
    if start_step % accum:
        raise ValueError(f"start_step {start_step} is not a multiple of optim.accum_iter {accum}")

    batches, num_batches = position_loader(loader, epoch, start_step)
    steps_per_epoch = num_batches // accum
    total = steps_per_epoch * accum  # a trailing partial accumulation group is dropped
    if steps_per_epoch == 0:
        raise ValueError(f"epoch has {num_batches} batches, fewer than optim.accum_iter={accum}: "
                         f"lower data.batch_size or accum_iter")

    logger = MetricLogger(delimiter="  ")
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.2e}"))
    logger.add_meter("samples/s", SmoothedValue(window_size=20, fmt="{avg:.1f}"))
    header = f"Epoch: [{epoch}]"
    agree_empty = world > 1 and cfg.data.skip_bad  # an empty batch on one rank must skip on all
    nonfinite, dropped_steps, seen = 0, 0, 0
    keys, group, micro_losses, micro_ids, dropped = None, None, [], [], False
    optimizer.zero_grad(set_to_none=True)
    t_step = time.time()

    seeded = _seeded(batches, range(start_step, total), lambda it: step_seed(cfg.seed, rank, epoch, it))
    for it, batch in logger.log_every(seeded, cfg.train.print_freq, header):
        micro = it % accum
        last = micro == accum - 1
        if micro == 0:  # per-iteration schedule at the fractional epoch
            lr_sched.adjust_learning_rate(optimizer, epoch + it / num_batches, base_lr, cfg.optim.min_lr,
                                          cfg.optim.warmup_epochs, cfg.optim.epochs)
            group, micro_losses, micro_ids, dropped = None, [], [], False
        global_step = epoch * steps_per_epoch + it // accum + 1
        # collate returns None when every sample of a batch was unreadable (data.skip_bad): that
        # accumulation group is dropped, on every rank.
        empty = batch is None
        if agree_empty and not dropped:
            empty = _reduce(torch.tensor([float(empty)], device=device)).item() > 0
        dropped = dropped or empty
        if not dropped:
            batch = to_device(batch, device)
            sync = model.no_sync() if ddp and not last else contextlib.nullcontext()
            with sync:
                with autocast(device, dtype):
                    losses = model(batch)
                loss = losses["loss"]
                # Always backward, even a non-finite loss, so that every rank runs the same collectives.
                scaler.scale(loss / accum).backward()
            keys = keys or sorted(losses)
            terms = torch.stack([losses[k].detach().float() for k in keys]) / accum
            group = terms if group is None else group + terms
            micro_losses.append(loss.detach().float())
            micro_ids.append(list(batch["id"]))
        if not last:
            continue

        lr = optimizer.param_groups[0]["lr"]
        scalars = {"train/lr": lr}
        if dropped:
            optimizer.zero_grad(set_to_none=True)
            dropped_steps += 1
            print_fn(f"WARNING: step {global_step} skipped: a batch had no readable sample (data.skip_bad)")
        else:
            scalars.update(_optimizer_step(model, optimizer, scaler, params, clip, keys, group, micro_losses,
                                           micro_ids, world, logger))
            seen += int(scalars["train/samples"])
            ids, terms = scalars.pop("ids", None), scalars.pop("terms", None)
            if scalars.pop("nonfinite_step", False):
                nonfinite += 1
                where = (f"non-finite loss at global step {global_step} (epoch {epoch}, batch {it}); "
                         f"batch ids: {ids or 'on another rank'}")
                if cfg.train.nonfinite == "stop":
                    raise FloatingPointError(f"{where}; loss terms: {terms}")
                print_fn(f"WARNING: step skipped: {where}")
                if nonfinite > cfg.train.max_nonfinite:
                    raise FloatingPointError(f"{nonfinite} non-finite steps in epoch {epoch} "
                                             f"(train.max_nonfinite={cfg.train.max_nonfinite}); last: {where}")
        now = time.time()
        samples_s = scalars.pop("train/samples", 0) / max(now - t_step, 1e-9)
        t_step = now
        logger.update(lr=lr, **{"samples/s": samples_s})
        if tb is not None:
            scalars.update({"train/samples_per_s": samples_s, "train/nonfinite": nonfinite})
            if torch.device(device).type == "cuda":
                scalars["train/gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            tb.add_scalars(scalars, global_step)
        if on_step is not None:
            on_step(epoch, it + 1, global_step)

    logger.synchronize_between_processes()
    out = {k: m.global_avg for k, m in logger.meters.items() if m.count}
    out.update(nonfinite=nonfinite, dropped_steps=dropped_steps, samples=seen,
               global_step=(epoch + 1) * steps_per_epoch, steps_per_epoch=steps_per_epoch)
    out.update(_bad_counts(getattr(loader, "dataset", None), device, print_fn))
    print_fn(f"{header} done: {logger}  non-finite steps: {nonfinite}  dropped steps: {dropped_steps}")
    return out


def _optimizer_step(model, optimizer, scaler, params, clip, keys, group, micro_losses, micro_ids, world,
                    logger) -> dict:
    """Reduce the group's loss terms over ranks (one collective that also carries the non-finite flag and
    the sample count), then clip and step, or skip a non-finite step on every rank. Returns TB scalars;
    "nonfinite_step", "ids" and "terms" describe a skipped step."""
    finite = torch.isfinite(torch.stack(micro_losses)).tolist()
    local_bad = not all(finite)
    extra = torch.tensor([float(local_bad), float(sum(len(i) for i in micro_ids))], device=group.device)
    stats = _reduce(torch.cat([group.double(), extra.double()])).tolist()
    means = {k: stats[i] / world for i, k in enumerate(keys)}
    out = {"train/samples": stats[-1]}
    if stats[-2] > 0:  # a non-finite loss on some rank: every rank skips
        optimizer.zero_grad(set_to_none=True)
        out.update({"nonfinite_step": True, "terms": means,
                    "ids": [i for ok, ids in zip(finite, micro_ids) if not ok for i in ids]})
        return out
    scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    if not math.isfinite(grad_norm) and not scaler.is_enabled():
        optimizer.zero_grad(set_to_none=True)
        out.update({"nonfinite_step": True, "terms": means, "ids": "non-finite gradient norm"})
        return out
    scaler.step(optimizer)  # with fp16 the scaler itself skips a step with inf/nan gradients
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    logger.update(**means)
    out.update({f"train/{k}": v for k, v in means.items()})
    if math.isfinite(grad_norm):
        logger.update(grad_norm=grad_norm)
        out["train/grad_norm"] = grad_norm
    if scaler.is_enabled():
        out["train/loss_scale"] = scaler.get_scale()
    return out


def _bad_counts(dataset, device, print_fn) -> dict:
    """The dataset's skipped inputs (datasets' skip_bad): load-time counts are the same on every rank,
    unreadable images are summed over ranks."""
    if not hasattr(dataset, "bad_counts"):
        return {}
    counts = dict(dataset.bad_counts())
    if "unreadable_image" in counts:
        t = _reduce(torch.tensor([float(counts["unreadable_image"])], device=device))
        counts["unreadable_image"] = int(t.item())
    if any(counts.values()):
        print_fn("skipped bad inputs: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        summary = dataset.bad_summary() if hasattr(dataset, "bad_summary") else ""
        if summary:
            print_fn(summary)
    return {f"bad_{k}": v for k, v in counts.items()}


def train_epochs(model, loader, optimizer, scaler, cfg, device, *, ckpt, tb, run_dir, start_epoch: int,
                 start_step: int, validate) -> None:
    """The epoch loop of both entry points: train, ``validate(epoch, step) -> metrics`` every
    ``train.eval_every`` epochs (and after the last), checkpoint, append to log_stats.jsonl."""
    print(f"start training at epoch {start_epoch} (batch {start_step}) of {cfg.optim.epochs}")
    t0 = time.time()
    for epoch in range(start_epoch, cfg.optim.epochs):
        stats = train_one_epoch(model, loader, optimizer, scaler, epoch, cfg, device, tb=tb,
                                start_step=start_step, on_step=ckpt.on_step)
        start_step, step = 0, stats["global_step"]
        metrics = {}
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.optim.epochs:
            metrics = validate(epoch, step)
        ckpt.end_epoch(epoch, step, metrics)
        if is_main_process():
            with open(run_dir / "log_stats.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch, "step": step, **{f"train/{k}": v for k, v in stats.items()},
                                    **metrics}) + "\n")
        tb.flush()
    print(f"training time {datetime.timedelta(seconds=int(time.time() - t0))}; "
          f"best {cfg.train.best_metric}: {ckpt.best}; checkpoints in {run_dir}")
