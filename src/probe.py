"""Linear probe on frozen embeddings: z-scoring, training with early stopping, prediction.

The probe is one nn.Linear trained as the reference does (Adam, cross-entropy,
ReduceLROnPlateau and early stopping on validation loss, best weights restored).
All data sits on the device as tensors and mini-batches are gathered by index, so
an epoch costs a few kernel launches per batch instead of per-sample collation.
Shuffling uses a seeded CPU generator, so the batch order is the same on every device.

The training set is either fixed tensors or a callable `epoch -> (x, y)` that draws
fresh samples each epoch (the online CVAE). Trained probes are cached under a key
hashed from the training settings, seed and data fingerprints, so a changed input never
reuses a stale checkpoint.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from src.cli import UserError, brief_reason
from src.io import atomic_path, provenance, settings_key
from src.runtime import one_cpu_thread
from src.settings import ProbeTraining

Batch = tuple[torch.Tensor, torch.Tensor]
TrainSource = Union[Batch, Callable[[int], Batch]]


def zscore_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of `x`; a constant feature gets std 1 so it maps to 0, not NaN."""
    x = np.asarray(x, dtype=np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std < 1e-12] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def zscore(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return ((np.asarray(x, dtype=np.float32) - mean) / std).astype(np.float32)


# The reference's fixed probe hyperparameters (the flags are src.settings.ProbeTraining).
WEIGHT_DECAY = 0.0
LR_PATIENCE = 5  # ReduceLROnPlateau on validation loss
MIN_LR = 1e-5
EARLY_STOPPING_PATIENCE = 5  # epochs without a new best validation loss


def probe_checkpoint_path(ckpt_dir: Path, training: ProbeTraining, seed: int, num_classes: int,
                          key_material: dict) -> Path:
    """Checkpoint file named by a hash of everything that determines the trained probe.

    `key_material` holds fingerprints of the data (src.io.array_fingerprint) or, for a
    callable source, whatever identifies the generator that feeds it.
    """
    key = settings_key({"training": asdict(training), "seed": seed, "num_classes": num_classes, "data": key_material})
    return Path(ckpt_dir) / f"probe-{key}.pt"


@torch.no_grad()
def validation_loss(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, block_size: int = 65536) -> float:
    model.eval()
    total = sum(F.cross_entropy(model(x[i:i + block_size]), y[i:i + block_size], reduction="sum")
                for i in range(0, len(x), block_size))
    return float(total) / len(x)


def train_probe(train_source: TrainSource, val_x: torch.Tensor, val_y: torch.Tensor, num_classes: int,
                training: ProbeTraining, device: torch.device, seed: int,
                checkpoint: Path | None = None) -> tuple[nn.Linear, dict]:
    """Train a linear probe; return it in eval mode with the best validation weights, and its history
    (with "train_s", the seconds its training took, and "from_checkpoint").

    With `checkpoint` set, an existing file is loaded instead of training, and a new probe is saved
    there; a file without "train_s" (older code) is trained again, so that every result can report its
    probe's training time. Everything stays float32: the layer is too small for bf16 to pay.
    """
    val_x, val_y = val_x.to(device, torch.float32), val_y.to(device, torch.long)
    model = seeded_linear(val_x.shape[1], num_classes, seed).to(device)
    if checkpoint is not None and Path(checkpoint).is_file():
        try:
            saved = torch.load(checkpoint, map_location=device, weights_only=True)
            model.load_state_dict(saved["state_dict"])
            history = saved["history"]
            best_epoch = history["best_epoch"]
        except Exception as err:  # a damaged file can fail inside the unpickler with almost any type
            raise UserError(f"cannot read probe checkpoint {checkpoint} ({brief_reason(err)}); "
                            "delete it to retrain") from err
        if best_epoch < 0:  # written before untrained probes were refused
            raise UserError(f"probe checkpoint {checkpoint} holds a probe that never reached a finite validation "
                            "loss; delete it to retrain")
        if "train_s" in history:
            return model.eval(), {**history, "from_checkpoint": True}
        model = seeded_linear(val_x.shape[1], num_classes, seed).to(device)  # trained again from the seed's init

    with one_cpu_thread():
        model, history = _fit(model, train_source, val_x, val_y, training, device, seed)
    if checkpoint is not None:
        with atomic_path(Path(checkpoint)) as tmp:
            torch.save({"state_dict": model.state_dict(), "history": history, **provenance()}, tmp)
    return model.eval(), {**history, "from_checkpoint": False}


def _fit(model: nn.Linear, train_source: TrainSource, val_x: torch.Tensor, val_y: torch.Tensor,
         training: ProbeTraining, device: torch.device, seed: int) -> tuple[nn.Linear, dict]:
    """The training loop: Adam, ReduceLROnPlateau and early stopping on validation loss, best weights kept."""
    optimizer = torch.optim.Adam(model.parameters(), lr=training.lr, weight_decay=WEIGHT_DECAY, fused=True)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=LR_PATIENCE, min_lr=MIN_LR)
    shuffle_generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    history: dict = {"train_loss": [], "val_loss": [], "lr": []}
    best_loss, best_state, best_epoch = float("inf"), copy.deepcopy(model.state_dict()), -1
    for epoch in (bar := tqdm(range(training.epochs), desc="probe", leave=False, disable=None)):
        x, y = train_source(epoch) if callable(train_source) else train_source
        x, y = x.to(device, torch.float32), y.to(device, torch.long)
        history["lr"].append(optimizer.param_groups[0]["lr"])
        history["train_loss"].append(_train_epoch(model, optimizer, x, y, training.batch_size, shuffle_generator))
        loss = validation_loss(model, val_x, val_y)
        history["val_loss"].append(loss)
        scheduler.step(loss)
        if math.isfinite(loss) and loss < best_loss:
            best_loss, best_state, best_epoch = loss, copy.deepcopy(model.state_dict()), epoch
        bar.set_postfix(val_loss=f"{loss:.4f}")
        if epoch - best_epoch >= EARLY_STOPPING_PATIENCE:
            break
    if best_epoch < 0:  # the initial weights were never validated as a model: there is no result to report
        raise UserError(f"the probe's validation loss was never finite (last {loss:g}) with -l/--lr {training.lr:g}; "
                        "lower -l/--lr or check the embeddings for extreme values")
    model.load_state_dict(best_state)
    history["best_epoch"] = best_epoch
    history["train_s"] = time.perf_counter() - start
    return model, history


def seeded_linear(in_features: int, num_classes: int, seed: int) -> nn.Linear:
    """nn.Linear with torch's default init drawn from `seed`, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_features, num_classes)


def cross_entropy_gradients(weight: torch.Tensor, bias: torch.Tensor, inputs: torch.Tensor,
                            targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of a linear layer on a batch, and the gradients of its mean.

    Written out instead of taken from autograd: d mean-loss / d logits = (softmax - onehot) / batch.
    For a layer this small autograd's bookkeeping costs as much as the arithmetic itself.
    The logits are laid out classes x batch because CPU sgemm runs that shape about twice as
    fast as batch x classes. Returns (loss sum, d/d weight, d/d bias).
    """
    log_probs = torch.log_softmax(torch.addmm(bias[:, None], weight, inputs.T), dim=0)
    columns = torch.arange(len(targets), device=inputs.device)
    loss_sum = -log_probs[targets, columns].sum()
    grad_logits = log_probs.exp_()
    grad_logits[targets, columns] -= 1.0
    grad_logits /= len(targets)
    return loss_sum, grad_logits @ inputs, grad_logits.sum(dim=1)


def _train_epoch(model: nn.Linear, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int, generator: torch.Generator) -> float:
    """One pass over (x, y) in shuffled mini-batches; returns the mean training loss.

    Each batch is gathered into one reused buffer and the gradients are set by hand
    (cross_entropy_gradients) before torch's Adam applies them.
    """
    model.train()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    buffer = torch.empty(batch_size, x.shape[1], device=x.device)
    total = torch.zeros((), device=x.device)
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            index = order[start:start + batch_size]
            inputs = torch.index_select(x, 0, index, out=buffer[:len(index)])
            loss_sum, model.weight.grad, model.bias.grad = cross_entropy_gradients(
                model.weight, model.bias, inputs, y[index])
            optimizer.step()
            total += loss_sum
    return float(total) / len(x)


@torch.no_grad()
def predict_proba(model: nn.Linear, x: torch.Tensor, block_size: int = 65536) -> np.ndarray:
    """Softmax class probabilities, N x C, as float64 numpy for the metrics."""
    model.eval()
    device = next(model.parameters()).device
    probs = [F.softmax(model(x[i:i + block_size].to(device, torch.float32)), dim=1).cpu()
             for i in range(0, len(x), block_size)]
    return torch.cat(probs).double().numpy()
