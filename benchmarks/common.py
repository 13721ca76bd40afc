"""Shared pieces of the speed benchmarks (train_throughput, score_throughput,
incremental_vs_full): command-line flags, MovieLens loading, timing, memory, FLOP
counting and the machine's matmul peak.

The benchmarks import this as `common` (their own folder is put on sys.path), so they
run as plain scripts: `.venv/bin/python benchmarks/train_throughput.py --quick`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

from llmrec.report import render_table  # noqa: E402

# Dense bf16 tensor-core peak (FLOP/s) by GPU name; anything else is measured.
GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# ----------------------------------------------------------------------------- flags


def default_data() -> Path:
    return Path(os.environ.get("ML100K_DIR") or ROOT.parent / "shared/data/movielens-100k")


def default_cache() -> Path:
    """Frozen-encoder outputs persist here between benchmark runs (keyed by encoder
    identity and text hash, like the flow's LLMREC_HOME/cache)."""
    return Path(os.environ.get("LLMREC_BENCH_CACHE") or Path(tempfile.gettempdir()) / "llmrec-bench-cache")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data(),
                   help="MovieLens-100k folder (default: $ML100K_DIR or ../shared/data/movielens-100k)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where training and scoring run")
    p.add_argument("--quick", action="store_true", help="a small run (minutes on a 2-core CPU)")
    p.add_argument("--encoder", default="minilm",
                   help="encoder name or local path ('minilm' = the bundled all-MiniLM-L6-v2)")
    p.add_argument("--rows", type=int, default=None, help="use only the first N ratings by time (tests)")
    p.add_argument("--cache", type=Path, default=default_cache(), help="text-feature cache folder")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    return device


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    events: pd.DataFrame
    user_texts: dict[str, str]
    item_texts: dict[str, str]


def load_data(path: Path, rows: int | None = None) -> Data:
    """MovieLens-100k as the flow sees it: events in time order, and the rendered user
    and item texts the encoder reads."""
    from llmrec.data import load_movielens
    from llmrec.schema import render_text

    events, items, users = load_movielens(path)
    if rows is not None:
        events = events.iloc[:rows].reset_index(drop=True)
    return Data(events=events, user_texts=render_text(users, "user_id").to_dict(),
                item_texts=render_text(items, "item_id").to_dict())


def load_encoder(name: str):
    from llmrec.encoder import load_encoder as load

    return load(name)


# ----------------------------------------------------------------------------- timing and memory


def sync(device: str | torch.device = "cpu") -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def timed(out: dict, key: str, device: str = "cpu"):
    """Add the wall time of the block to out[key] (synchronizing CUDA at both ends)."""
    sync(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        out[key] = out.get(key, 0.0) + time.perf_counter() - start


def status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, so the next
    `peak_rss()` is the peak of what runs in between. Linux only; False elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident memory in bytes: since the last `reset_peak_rss()` where the kernel
    supports it, otherwise over the whole process."""
    kib = status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so a later
    phase's peak RSS is not the previous phase's leftovers."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def process_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_machine(device: str = "cpu") -> dict:
    info = machine(device)
    print("machine: " + "; ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    return info


def matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 4096, reps: int = 3) -> float:
    """Achieved FLOP/s of a large square matmul on `device`: the best of `reps` runs,
    measured now, in this process (the reference for "fraction of peak")."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    del a, b
    return 2 * n**3 / best


def gpu_bf16_peak() -> tuple[float, str]:
    """(FLOP/s, source) of the current GPU's dense bf16 peak: from the table by name,
    else measured with a bf16 matmul."""
    name = torch.cuda.get_device_name()
    for key, peak in GPU_BF16_PEAK.items():
        if key in name:
            return peak, f"spec sheet ({key} dense bf16)"
    return matmul_peak("cuda", torch.bfloat16, n=8192, reps=5), "measured bf16 matmul 8192^3"


# ----------------------------------------------------------------------------- FLOP counting

# torch's counter has formulas for the CUDA attention kernels but not for the CPU kernel
# that scaled_dot_product_attention runs without attention dropout (the frozen layers of
# the text cache, in eval mode); without these two, that attention (QK^T and AV) would go
# uncounted on CPU. With dropout it runs as matmuls, which torch counts. The formulas
# are torch's own.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, query, key, value, *args, out_shape=None, **kwargs:
        sdpa_backward_flop_count(grad_out, query, key, value),
}


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, silent: the matmuls and attention that run inside it, forward
    and backward, from their shapes. It intercepts every op in Python, so count FLOPs in a
    pass that is not timed."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def fmt_flops(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} "


# ----------------------------------------------------------------------------- output


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as a markdown table (llmrec's renderer) with the benchmarks' units: a
    column whose name has "FLOP/s" prints with a unit prefix, one with "of peak" or "%" as a
    percentage."""
    return render_table(rows, columns, fmt=_cell) if rows else "(no rows)"


def _cell(value, column: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value == value:
        if "FLOP/s" in column:
            return fmt_flops(value)
        if "of peak" in column or column.endswith("%"):
            return f"{value:.1%}"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.4g}"
    return str(value)


def quiet_logs() -> None:
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
