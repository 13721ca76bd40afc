"""Data-parallel fine-tuning on torch.distributed: `training.workers` processes, each
running the one training loop (`train.train_loop`) over its share of every batch, with
DistributedDataParallel averaging the gradients (gloo on CPU, NCCL on CUDA).

The fine-tune stage calls `train.train`, which comes here when `training.workers` > 1:
the workers are started with torch.multiprocessing (spawn), rendezvous over TCP at
`training.master_addr` (127.0.0.1 by default, so nothing leaves the machine), and rank 0
hands the trained weights and optimizer moments back through safetensors files in a
temporary folder; the calling process loads them into the checkpoint it passed in. The
checkpoint is therefore the same object, in the same format, whatever the number of
workers: a model trained with 2 resumes with 1 and the other way round.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from llmrec.config import TrainingConfig
from llmrec.encoder import TextFeatures
from llmrec.errors import LlmrecError
from llmrec.model import Checkpoint

log = logging.getLogger(__name__)

# How often the caller looks at the workers while they train (seconds): a dead worker is
# noticed within this time.
POLL_SECONDS = 0.5


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def worker_device(requested: str, rank: int) -> torch.device:
    from llmrec.train import pick_device

    device = pick_device(requested)
    if device.type == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return device


def train_data_parallel(checkpoint: Checkpoint, user_features: TextFeatures, item_features: TextFeatures,
                        user_rows: np.ndarray, item_rows: np.ndarray, ratings: np.ndarray, config: TrainingConfig,
                        on_epoch: Callable[[int, float], None] | None = None):
    """Run `train.train_loop` in `config.workers` processes and load the result into
    `checkpoint` (in place, like the in-process loop). Returns rank 0's TrainResult."""
    from safetensors.torch import load_file

    world = config.workers
    port = config.master_port or free_port(config.master_addr)
    context = torch.multiprocessing.get_context("spawn")
    messages = context.Queue()
    with tempfile.TemporaryDirectory(prefix="llmrec-ddp-") as out:
        log.info("data-parallel fine-tune: %d workers, rendezvous tcp://%s:%d", world, config.master_addr, port)
        processes = torch.multiprocessing.start_processes(
            worker, args=(world, port, checkpoint, user_features, item_features, user_rows, item_rows, ratings,
                          config, out, messages),
            nprocs=world, join=False, start_method="spawn")
        result = None
        while result is None:
            try:
                kind, payload = messages.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if processes.join(timeout=0):
                    break
                continue
            if kind == "epoch" and on_epoch is not None:
                on_epoch(*payload)
            elif kind == "done":
                result = payload
        while not processes.join():
            pass
        if result is None:
            raise LlmrecError(f"training.workers={world}: the workers ended without a result")
        model = checkpoint.model
        model.load_state_dict(load_file(str(Path(out) / "model.safetensors")))
        moments: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in load_file(str(Path(out) / "optimizer.safetensors")).items():
            name, moment = key.split("::")
            moments.setdefault(name, {})[moment] = value
    checkpoint.model = model.cpu().eval()
    checkpoint.optimizer_state = moments
    checkpoint.global_step += result.steps
    checkpoint.loss_kind = config.loss
    return result


def worker(rank: int, world: int, port: int, checkpoint: Checkpoint, user_features: TextFeatures,
           item_features: TextFeatures, user_rows: np.ndarray, item_rows: np.ndarray, ratings: np.ndarray,
           config: TrainingConfig, out: str, messages) -> None:
    """One data-parallel process: join the group, run the loop on this rank's share, and
    (rank 0) write the weights and optimizer moments for the caller."""
    import copy

    import torch.distributed as dist
    from safetensors.torch import save_file

    from llmrec.train import Shard, train_loop

    # The arguments arrive in shared memory. The features and rows are only read, but the
    # weights and moments are updated in place: each worker trains its own copy, or every
    # worker's optimizer step would land on the same memory.
    checkpoint = copy.deepcopy(checkpoint)

    if config.master_addr in ("127.0.0.1", "localhost"):
        # gloo picks its data-plane interface from the hostname unless told: keep it on loopback.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # The processes share the cores: one thread pool each of its share, not each of all.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = worker_device(config.device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://{config.master_addr}:{port}", rank=rank, world_size=world)
    try:
        def report(epoch: int, loss: float) -> None:
            if rank == 0:
                messages.put(("epoch", (epoch, loss)))

        result = train_loop(checkpoint, user_features, item_features, user_rows, item_rows, ratings, config, report,
                            device, Shard(rank, world))
        if rank == 0:
            state = {k: v.detach().cpu().contiguous() for k, v in checkpoint.model.state_dict().items()}
            save_file(state, str(Path(out) / "model.safetensors"))
            moments = {f"{name}::{key}": value.contiguous() for name, entry in checkpoint.optimizer_state.items()
                       for key, value in entry.items()}
            save_file(moments, str(Path(out) / "optimizer.safetensors"))
            messages.put(("done", result))
        dist.barrier()
    finally:
        dist.destroy_process_group()
