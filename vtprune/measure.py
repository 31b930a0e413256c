"""Latency and memory measurement of VLM prefill and generation, on CPU or CUDA.

* **Time**: CUDA events on GPU (read after the run, so nothing inside the timed region waits for the host); on CPU
  ``time.perf_counter`` (CPU kernels are synchronous). Callers discard warm-up runs and report medians; variants
  should be interleaved (see :mod:`vtprune.benchmark`).
* **Prefill** = ``model(**inputs, use_cache=True, logits_to_keep=1)``: the time to first token, including vision
  encoding, the pruner's selection and the first logits.
* **Generation**: ``generate`` with a logits processor that timestamps every step: time to first token, decode
  tokens/s over the remaining steps, end to end.
* **Peak memory** (bytes added at the peak of the call): on CUDA ``max_memory_allocated`` minus what was allocated
  before. On CPU (Linux) the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the
  RSS before, after ``malloc_trim(0)`` has handed freed heap pages back to the OS (otherwise glibc would serve the
  call from pages it kept and the delta would read low). It is an approximation at page granularity that also sees
  non-tensor allocations; ``None`` where ``/proc`` is unavailable. ``tracemalloc`` is not used: it cannot see
  PyTorch's C++ allocations. Trimming makes the next allocations page-fault, so memory is measured in separate,
  untimed runs (``measure_prefill(..., memory=True)``).
* **KV cache**: bytes of the key/value tensors held by the returned cache object.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Mark = Any  # a perf_counter float on CPU, a recorded torch.cuda.Event on GPU


class Timer:
    """Timestamps on the device's timeline: CUDA events on GPU, ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def mark(self) -> Mark:
        """A timestamp at this point of the device's work queue."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Mark, end: Mark) -> float:
        """Seconds between two marks (waits for ``end`` on CUDA)."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start


def _proc_status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes, or ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so that reusing it shows up in the RSS again."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: :attr:`peak_bytes` = memory added at the peak of the block (see module docstring)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.peak_bytes: int | None = None
        self._base: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            gc.collect()
            _trim_heap()
            self._base = _proc_status_kb("VmRSS") if _reset_peak_rss() else None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            peak = _proc_status_kb("VmHWM")
            self.peak_bytes = None if peak is None else max(0, peak - self._base)


def kv_cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values held by a ``transformers`` cache (``DynamicCache``-style ``.layers``, or the
    legacy tuple of ``(key, value)`` pairs)."""
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    pairs = ([(getattr(l, "keys", None), getattr(l, "values", None)) for l in layers] if layers is not None
             else list(cache))
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair if torch.is_tensor(t))


@dataclass
class PrefillSample:
    """One timed prefill: seconds, peak memory added (bytes or ``None``), KV-cache bytes afterwards."""

    seconds: float
    peak_bytes: int | None
    kv_bytes: int


def measure_prefill(model: nn.Module, inputs: Mapping[str, Any], timer: Timer, memory: bool = False
                    ) -> PrefillSample:
    """Run and time one prefill (``use_cache=True, logits_to_keep=1``); with ``memory`` also its peak memory (such a
    run's time is perturbed by the measurement: use separate runs for the two)."""
    device = next(model.parameters()).device
    with torch.inference_mode(), (PeakMemory(device) if memory else nullcontext()) as mem:
        start = timer.mark()
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        end = timer.mark()
        seconds = timer.seconds(start, end)
    return PrefillSample(seconds=seconds, peak_bytes=mem.peak_bytes if memory else None,
                         kv_bytes=kv_cache_bytes(out.past_key_values))


@dataclass
class GenerateSample:
    """One timed ``generate``: time to first token, decode throughput after it, end-to-end seconds."""

    ttft_seconds: float
    decode_tokens_per_second: float | None
    e2e_seconds: float
    new_tokens: int


def measure_generate(model: nn.Module, inputs: Mapping[str, Any], new_tokens: int, timer: Timer) -> GenerateSample:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens, timestamping every step with a logits processor."""
    from transformers import LogitsProcessor, LogitsProcessorList

    marks: list[Mark] = []

    class StepClock(LogitsProcessor):
        """Records a timestamp when each step's logits are ready."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            marks.append(timer.mark())
            return scores

    with torch.inference_mode():
        start = timer.mark()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([StepClock()]))
        end = timer.mark()
    ttft = timer.seconds(start, marks[0])
    decode = timer.seconds(marks[0], marks[-1]) if len(marks) > 1 else 0.0
    return GenerateSample(ttft_seconds=ttft, decode_tokens_per_second=(len(marks) - 1) / decode if decode else None,
                          e2e_seconds=timer.seconds(start, end), new_tokens=len(marks))


@contextmanager
def timed_selection(pruner: Any, timer: Timer) -> Iterator[list[tuple[Mark, Mark]]]:
    """Timestamp every ``pruner.select`` call made inside the block (the pruner's own overhead). Yields the list of
    (start, end) marks; convert with :func:`selection_seconds` after the block."""
    intervals: list[tuple[Mark, Mark]] = []
    original = pruner.select

    def select(*args: Any, **kwargs: Any) -> Any:
        start = timer.mark()
        result = original(*args, **kwargs)
        intervals.append((start, timer.mark()))
        return result

    pruner.select = select
    try:
        yield intervals
    finally:
        del pruner.select  # drop the instance attribute: the class method shows through again


def selection_seconds(intervals: list[tuple[Mark, Mark]], timer: Timer) -> float:
    """Total seconds of the intervals recorded by :func:`timed_selection`."""
    return sum(timer.seconds(a, b) for a, b in intervals)


def median(values: list[float]) -> float | None:
    """Median, or ``None`` for no values."""
    return statistics.median(values) if values else None


def environment(model: nn.Module) -> dict[str, Any]:
    """What a timing depends on: device, dtype, threads, attention kernel, library versions, machine."""
    import transformers

    param = next(model.parameters())
    text = getattr(model.config, "text_config", None) or model.config
    env = {
        "device": str(param.device), "dtype": str(param.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "attn_implementation": getattr(text, "_attn_implementation", None) or "eager",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": platform.processor() or platform.machine(), "cpu": _cpu_name(),
    }
    if param.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(param.device)
    return env


def _cpu_name() -> str | None:
    """The CPU model name from ``/proc/cpuinfo`` (Linux), else ``None``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


__all__ = [
    "GenerateSample", "PeakMemory", "PrefillSample", "Timer", "environment", "kv_cache_bytes", "measure_generate",
    "measure_prefill", "median", "selection_seconds", "timed_selection",
]
