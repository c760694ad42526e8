"""Training (MAE's engine_pretrain shape): one epoch of AMP steps with gradient accumulation under
``no_sync``, clipping, a per-iteration lr schedule and non-finite loss handling; and the epoch loop.

The engine knows the model only as ``losses = model(batch)``: ``losses["loss"]`` is optimised and
every other entry is logged.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import math
import time
from dataclasses import dataclass, field

import torch

from datasets.loaders import empty_on_any_rank, skipped_counts, to_device
from engine.optim import autocast, clip_grad_norm, resolve_amp
from utils import lr_sched
from utils.dist import all_reduce_sum, get_rank, get_world_size, is_main_process
from utils.logging import MetricLogger, SmoothedValue
from utils.seed import sample_keys, step_seed


def position_loader(loader, epoch: int, start_step: int):
    """Set the sampler's epoch (its shuffling seed) and skip the first ``start_step`` batches.

    A sampler with ``set_start(n)`` (datasets.loaders.ResumableSampler) skips without loading; any
    other loader is iterated past the skipped batches. Returns (iterator, batches in the full
    epoch)."""
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


class _Seeded:
    """Yields (iteration, batch), reseeding torch before each batch is fetched, so that loading and
    the step draw from utils.seed.step_seed. Has a length (the progress line's ETA needs one)."""

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


class AccumulationGroup:
    """The micro-batches of one optimizer step: their loss terms (summed / accum), losses and
    ids."""

    def __init__(self):
        self.keys, self.terms, self.losses, self.ids, self.dropped = None, None, [], [], False

    def add(self, losses: dict, ids: list, accum: int) -> None:
        self.keys = self.keys or sorted(losses)
        terms = torch.stack([losses[k].detach().float() for k in self.keys]) / accum
        self.terms = terms if self.terms is None else self.terms + terms
        self.losses.append(losses["loss"].detach().float())
        self.ids.append(list(ids))


@dataclass
class StepResult:
    """One optimizer step: loss terms averaged over ranks, samples summed over ranks, and why it was
    skipped ("" when it stepped)."""

    losses: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    skipped: str = ""
    bad_ids: list | str = field(default_factory=list)
    grad_norm: float | None = None
    loss_scale: float | None = None

    def meters(self) -> dict[str, float]:
        """What the progress line and TensorBoard show of a step that was taken."""
        out = dict(self.losses) if not self.skipped else {}
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        if self.loss_scale is not None:
            out["loss_scale"] = self.loss_scale
        return out


def optimizer_step(optimizer, scaler, params, clip: float, group: AccumulationGroup) -> StepResult:
    """Reduce the group's loss terms over ranks (one collective that also carries the non-finite
    flag and the sample count), then unscale, clip and step; or skip a non-finite step on every
    rank."""
    finite = torch.isfinite(torch.stack(group.losses)).tolist()
    extra = torch.tensor(
        [float(not all(finite)), float(sum(map(len, group.ids)))], device=group.terms.device
    )
    stats = all_reduce_sum(torch.cat([group.terms.double(), extra.double()])).tolist()
    result = StepResult(
        {k: stats[i] / get_world_size() for i, k in enumerate(group.keys)}, int(stats[-1])
    )
    if stats[-2] > 0:  # a non-finite loss on some rank: every rank skips
        optimizer.zero_grad(set_to_none=True)
        result.skipped = "non-finite loss"
        result.bad_ids = [
            i for ok, ids in zip(finite, group.ids) if not ok for i in ids
        ] or "on another rank"
        return result
    scaler.unscale_(optimizer)
    grad_norm = float(clip_grad_norm(params, clip))
    if not math.isfinite(grad_norm) and not scaler.is_enabled():
        optimizer.zero_grad(set_to_none=True)
        result.skipped, result.bad_ids = "non-finite gradient norm", "all"
        return result
    scaler.step(optimizer)  # with fp16 the scaler itself skips a step with inf/nan gradients
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    result.grad_norm = grad_norm if math.isfinite(grad_norm) else None
    result.loss_scale = scaler.get_scale() if scaler.is_enabled() else None
    return result


def train_one_epoch(model, loader, optimizer, scaler, epoch: int, cfg, device, tb=None,
                    start_step: int = 0, on_step=None, print_fn=print) -> dict:
    """Train ``epoch`` from batch ``start_step`` on (a multiple of ``cfg.optim.accum_iter``).

    The global optimizer step is ``epoch * steps_per_epoch + step in epoch`` (skipped steps count),
    so logs and checkpoints line up across resumes. ``on_step(epoch, batches_done, global_step)``
    runs after every optimizer step (mid-epoch checkpoints). Returns the epoch's averaged stats."""
    model.train()
    accum, dtype = max(1, cfg.optim.accum_iter), resolve_amp(cfg.train.amp, device)
    o = cfg.optim
    clip = o.clip_grad if o.clip_grad > 0 else math.inf
    base_lr = lr_sched.effective_lr(cfg, get_world_size())
    params = [p for p in model.parameters() if p.requires_grad]
    batches, num_batches = position_loader(loader, epoch, start_step)
    steps_per_epoch = _steps_per_epoch(num_batches, accum, start_step)
    logger, header = _progress_logger(), f"Epoch: [{epoch}]"
    counts, t_step = {"nonfinite": 0, "dropped_steps": 0, "samples": 0}, time.time()
    seeded = _Seeded(batches, range(start_step, steps_per_epoch * accum),
                     lambda it: step_seed(cfg.seed, get_rank(), epoch, it))

    for it, batch in logger.log_every(seeded, cfg.train.print_freq, header):
        if it % accum == 0:  # per-iteration schedule at the fractional epoch
            lr_sched.adjust_learning_rate(optimizer, epoch + it / num_batches, base_lr, o.min_lr,
                                          o.warmup_epochs, o.epochs)
            group = AccumulationGroup()
        last = it % accum == accum - 1
        if cfg.data.skip_bad:  # a dataset that drops bad samples may give None
            group.dropped = group.dropped or empty_on_any_rank(batch, device)
        if not group.dropped:
            batch = to_device(batch, device)
            batch["noise_key"] = sample_keys(cfg.seed, epoch, batch["index"])  # per-sample draws
            no_sync = hasattr(model, "no_sync") and not last
            with model.no_sync() if no_sync else contextlib.nullcontext():
                with autocast(device, dtype):
                    losses = model(batch)
                # backward even a non-finite loss: every rank runs the same collectives
                scaler.scale(losses["loss"] / accum).backward()
            group.add(losses, batch["id"], accum)
        if not last:
            continue

        global_step = epoch * steps_per_epoch + it // accum + 1
        if group.dropped:
            optimizer.zero_grad(set_to_none=True)
            result = StepResult(skipped="a batch had no readable sample (data.skip_bad)")
        else:
            result = optimizer_step(optimizer, scaler, params, clip, group)
        where = f"global step {global_step} (epoch {epoch}, batch {it})"
        _account(result, counts, cfg.train, where, print_fn)
        lr, now = optimizer.param_groups[0]["lr"], time.time()
        samples_s, t_step = result.samples / max(now - t_step, 1e-9), now
        logger.update(lr=lr, **{"samples/s": samples_s}, **result.meters())
        if tb is not None:
            scalars = {**result.meters(), "lr": lr, "samples_per_s": samples_s,
                       "nonfinite": counts["nonfinite"], **_gpu_memory(device)}
            tb.add_scalars({f"train/{k}": v for k, v in scalars.items()}, global_step)
        if on_step is not None:
            on_step(epoch, it + 1, global_step)

    logger.synchronize_between_processes()
    out = {k: m.global_avg for k, m in logger.meters.items() if m.count}
    out.update(counts, global_step=(epoch + 1) * steps_per_epoch, steps_per_epoch=steps_per_epoch)
    out.update(_bad_counts(getattr(loader, "dataset", None), device, print_fn))
    print_fn(f"{header} done: {logger}  non-finite steps: {counts['nonfinite']}  "
             f"dropped steps: {counts['dropped_steps']}")
    return out


def _progress_logger() -> MetricLogger:
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.2e}"))
    logger.add_meter("samples/s", SmoothedValue(window_size=20, fmt="{avg:.1f}"))
    return logger


def _steps_per_epoch(num_batches: int, accum: int, start_step: int) -> int:
    """Optimizer steps in an epoch (a trailing partial accumulation group is dropped)."""
    if start_step % accum:
        raise ValueError(f"start_step {start_step} is not a multiple of optim.accum_iter {accum}")
    if num_batches < accum:
        raise ValueError(f"epoch has {num_batches} batches, fewer than optim.accum_iter={accum}: "
                         f"lower data.batch_size or accum_iter")
    return num_batches // accum


def _account(result: StepResult, counts: dict, train_cfg, where: str, print_fn) -> None:
    """Count the step's samples and skips; a non-finite step stops the run under
    train.nonfinite=stop or after train.max_nonfinite of them in one epoch."""
    counts["samples"] += result.samples
    if not result.skipped:
        return
    if not result.skipped.startswith("non-finite"):
        counts["dropped_steps"] += 1
        print_fn(f"WARNING: {where} skipped: {result.skipped}")
        return
    counts["nonfinite"] += 1
    what = f"{result.skipped} at {where}; batch ids: {result.bad_ids}"
    if train_cfg.nonfinite == "stop":
        raise FloatingPointError(f"{what}; loss terms: {result.losses}")
    print_fn(f"WARNING: step skipped: {what}")
    if counts["nonfinite"] > train_cfg.max_nonfinite:
        raise FloatingPointError(f"{counts['nonfinite']} non-finite steps in one epoch "
                                 f"(train.max_nonfinite={train_cfg.max_nonfinite}); last: {what}")


def _gpu_memory(device) -> dict[str, float]:
    if torch.device(device).type != "cuda":
        return {}
    return {"gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def _bad_counts(dataset, device, print_fn) -> dict:
    """The dataset's skipped inputs so far (data.skip_bad), over every rank, as bad_<kind>."""
    counts = skipped_counts(dataset, device)
    if any(counts.values()):
        print_fn("skipped bad inputs: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        if dataset.bad_summary():
            print_fn(dataset.bad_summary())
    return {f"bad_{k}": v for k, v in counts.items()}


def train_epochs(run, cfg, device, tb, run_dir, validate) -> None:
    """The epoch loop of every entry point over a ``engine.setup.TrainingRun``: train, checkpoint,
    ``validate(epoch, step) -> metrics`` every ``train.eval_every`` epochs (and after the last),
    record them (best checkpoint), and append the epoch's stats to log_stats.jsonl."""
    print(
        f"start training at epoch {run.start_epoch} (batch {run.start_step}) of {cfg.optim.epochs}"
    )
    t0, start_step = time.time(), run.start_step
    for epoch in range(run.start_epoch, cfg.optim.epochs):
        stats = train_one_epoch(
            run.model,
            run.train_loader,
            run.optimizer,
            run.scaler,
            epoch,
            cfg,
            device,
            tb=tb,
            start_step=start_step,
            on_step=run.checkpointer.on_step,
        )
        start_step, step = 0, stats["global_step"]
        run.checkpointer.end_epoch(epoch, step)  # before validation, which may fail
        metrics = {}
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.optim.epochs:
            metrics = validate(epoch, step)
            run.checkpointer.validated(epoch, step, metrics)
        if is_main_process():
            with open(run_dir / "log_stats.jsonl", "a") as f:
                train_stats = {f"train/{k}": v for k, v in stats.items()}
                f.write(json.dumps({"epoch": epoch, "step": step, **train_stats, **metrics}) + "\n")
        tb.flush()
    print(f"training time {datetime.timedelta(seconds=int(time.time() - t0))}; "
          f"best {cfg.train.best_metric}: {run.checkpointer.best}; checkpoints in {run_dir}")
