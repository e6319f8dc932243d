"""Device choice and seeding, shared by every stage."""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from src.cli import UserError, check_seed


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; an explicit name must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a device name; use auto, cpu, mps, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                        "use --device cuda or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple MPS is not available here; use --device auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (and thereby random weight initialisation); numpy takes seeds in [0, 2^32)."""
    check_seed("--seed", seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Run torch CPU ops on `count` threads inside the block (GPU work is unaffected)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run torch CPU ops and numpy's BLAS on one thread inside the block (GPU work is unaffected).

    For loops of many tiny ops (probe steps, k-Same steps): they gain nothing from a
    second thread, and on a busy machine waking a descheduled one costs more than the op.
    numpy's BLAS splits even a product of 5 x 768 by 256 over every core, for twice the CPU time.
    """
    with cpu_threads(1), threadpool_limits(1, user_api="blas"):
        yield
