"""Progress logging (MAE-style SmoothedValue / MetricLogger), TensorBoard on rank 0, a log file."""
from __future__ import annotations

import datetime
import sys
import time
from collections import defaultdict, deque
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from utils.dist import comm_device, get_world_size, is_main_process


class SmoothedValue:
    """A series of values: median / avg over a window, global average over everything seen."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over ranks (the window stays local)."""
        if get_world_size() == 1:
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=comm_device())
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self) -> float:
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self) -> float:
        return torch.tensor(list(self.deque), dtype=torch.float64).mean().item()

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(self.deque)

    @property
    def value(self) -> float:
        return self.deque[-1]

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if v is None:
                continue
            self.meters[k].update(v.item() if torch.is_tensor(v) else float(v))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __getattr__(self, name):
        if name in self.__dict__.get("meters", {}):
            return self.meters[name]
        raise AttributeError(f"MetricLogger has no attribute {name!r}")

    def __str__(self) -> str:
        return self.delimiter.join(f"{k}: {m}" for k, m in self.meters.items() if m.deque)

    def synchronize_between_processes(self) -> None:
        for m in self.meters.values():
            m.synchronize_between_processes()

    def global_avgs(self) -> dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}

    def log_every(self, iterable, print_freq: int, header: str = "", batch_size: int | None = None):
        """Yield from ``iterable`` (which needs a len), printing every ``print_freq`` iterations and
        at the last a line with ETA, meters, iteration and data time (s, window average),
        samples/s (if ``batch_size`` is given) and max CUDA memory."""
        total = len(iterable)
        width = len(str(total))
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [header, f"[{i:>{width}}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if batch_size:
                    parts.append(f"samples/s: {batch_size / max(iter_time.avg, 1e-9):.1f}")
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                print(self.delimiter.join(p for p in parts if p))
            end = time.time()
        total_time = time.time() - start
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
              f"({total_time / max(total, 1):.4f} s / it)")


class TBWriter:
    """TensorBoard SummaryWriter on rank 0 when enabled; every method is a no-op otherwise."""

    def __init__(self, log_dir, enabled: bool = True):
        self.writer = None
        if enabled and is_main_process():
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def add_scalars(self, values: dict, step: int, prefix: str = "") -> None:
        """One scalar per numeric entry, tagged "prefix/key"; None and non-numbers are skipped."""
        if self.writer is None:
            return
        for k, v in values.items():
            if torch.is_tensor(v) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix.rstrip('/')}/{k}" if prefix else k, v, step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def add_image(self, tag: str, image, step: int, dataformats: str = "CHW") -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats=dataformats)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _Tee:
    """Writes to a stream and to a file."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, s):
        self.file.write(s)
        return self.stream.write(s)

    def flush(self):
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def setup_logging(run_dir) -> Path | None:
    """On rank 0, copy everything written to stdout and stderr into run_dir/log.txt (appended, so a
    resumed run continues the same file). Returns the log path, or None on other ranks."""
    if not is_main_process():
        return None
    path = Path(run_dir) / "log.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a", buffering=1)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, _Tee):  # called again: replace the file, do not stack tees
            stream.file.close()
            stream = stream.stream
        setattr(sys, name, _Tee(stream, f))
    return path
