"""Kaggle Digit Recognizer (MNIST): a 10-model CNN ensemble in one PyTorch file.

Two CNNs (a compact ResNet and a wide VGG-style net) x 5 stratified folds, trained with batched on-device
augmentation, AdamW + cosine, label smoothing and early stopping; the submission averages softmax probabilities
over 10 models x 4 fixed test-time views. Measured results and speeds: BENCHMARKS.md.

    python digit_recognizer.py                                         # on Kaggle: the competition's data
    python digit_recognizer.py --data DIR --out runs/full              # train.csv, test.csv -> submission.csv
    python digit_recognizer.py --demo                                  # no download, a few CPU minutes
    python digit_recognizer.py --data DIR --archs wide --folds 2 --epochs 6 --out runs/quick
    python digit_recognizer.py --data DIR --processes 2                # jobs over 2 processes (default: one per GPU)
    python digit_recognizer.py --predict year.jpg --out runs/quick     # read the digits in your own pictures

On Kaggle, paste this file into a script kernel and run it as it is: with no --data it reads the competition's
folder under /kaggle/input and writes to the working directory. An interrupted run continues where it stopped
when the same command is run again in the same --out.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import difflib
import functools
import glob
import hashlib
import importlib.metadata
import io
import itertools
import json
import linecache
import logging
import math
import os
import pathlib
import platform
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch
import torch.fx.experimental.optimization
import torch.nn as nn
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold

KAGGLE_INPUT = "/kaggle/input"  # where Kaggle mounts a kernel's data
# The competition's folder under it: where 2026 kernels mount it, then where older ones did.
KAGGLE_COMPETITION = ("competitions/digit-recognizer", "digit-recognizer")
IMAGE_SIZE = 28
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE
NUM_CLASSES = 10


class InputError(Exception):
    """Something wrong with what the user gave us: reported as one line, exit code 2."""


# -----------------------------------------------------------------------------------------------------------------
# Config: the recipe's numbers, each one also a command-line option with its help and its check


def option(default, help, valid=None, **argparse_options):
    """A Config field and its --option. valid: (what a value must be, test), checked after parsing."""
    return dataclasses.field(default=default, metadata=dict(help=help, valid=valid, argparse=argparse_options))


AT_LEAST_1 = ("at least 1", lambda value: value >= 1)


def between(low, high):
    return (f"from {low} to {high}", lambda value: low <= value <= high)


def arch_list(text):
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in ARCHITECTURES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown architecture {unknown[0]!r} (choose from "
                                         f"{', '.join(ARCHITECTURES)})" if unknown else "no architecture given")
    return names


def fold_list(text):
    try:
        return tuple(sorted({int(k) for k in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fold numbers like 0 or 0,3, got {text!r}") from None


@dataclasses.dataclass
class Config:
    data: str | None = option(None, "directory with train.csv and test.csv (default: Kaggle's, found in /kaggle/input)",
                              metavar="DIR")
    out: str = option(".", "where submission.csv, oof.csv, metrics.json, pictures, checkpoints/ go", metavar="DIR")
    limit: int | None = option(None, "use only the first N rows of train.csv", AT_LEAST_1, type=int, metavar="N")
    demo: bool = option(False, "no download: train and test on scikit-learn's bundled digits, with a short schedule")
    archs: tuple[str, ...] = option(("resnet", "wide"), "comma list of resnet, wide", type=arch_list, metavar="LIST")
    folds: int = option(5, "stratified folds, i.e. models per architecture", ("at least 2", lambda k: k >= 2))
    epochs: int = option(30, "training epochs per job", between(1, 10_000))
    batch_size: int = option(128, "training batch size", between(2, 65_536))
    lr: float = option(1e-3, "AdamW learning rate, cosine-annealed over the epochs", ("positive", lambda lr: lr > 0))
    weight_decay: float = option(1e-4, "AdamW weight decay", ("not negative", lambda decay: decay >= 0))
    label_smoothing: float = option(0.1, "cross-entropy label smoothing", ("in [0, 1)", lambda eps: 0 <= eps < 1))
    patience: int = option(10, "stop a job after this many epochs without a better validation accuracy", AT_LEAST_1)
    seed: int = option(42, "seeds the folds and every job's initialisation, shuffling and augmentation",
                       between(0, 2**32 - 1))
    device: str = option("auto", "auto picks cuda, then mps, then cpu", choices=["auto", "cpu", "cuda", "mps"])
    precision: str = option("auto", "auto: bfloat16 autocast on GPUs with bfloat16 units, on CPUs with AMX and on AMD "
                                    "CPUs with AVX512-BF16; float16 with loss scaling on older GPUs; float32 elsewhere",
                            choices=["auto", "float32", "bfloat16", "float16"])
    tta: bool = option(True, "predict the plain images only, not the 4 test-time views", flags=["--no-tta"])
    fold: tuple[int, ...] = option((), "train only these folds (numbered from 0, as in checkpoints/<arch>_fold<k>.pt)",
                                   type=fold_list, metavar="K[,K...]")
    predict_only: bool = option(False, "no training: build the outputs from the finished checkpoints in --out")
    fresh: bool = option(False, "discard the checkpoints and saved states of the jobs this command trains, no others")
    processes: int | None = option(None, "spread the jobs over N processes, process k on GPU k modulo their number "
                                         "(default: one per GPU)", AT_LEAST_1, type=int, metavar="N")
    predict: tuple[str, ...] = option((), "read the digit, or the number in a row, in each image with the checkpoints "
                                          "in --out; draws predictions.png there", nargs="+", metavar="IMAGE")
    verbose: bool = option(False, "with --predict: also print the top 3 digits")


DEMO = dict(out="demo_run", epochs=4, folds=2, batch_size=32)  # --demo: a schedule that shows it all on a laptop CPU


# -----------------------------------------------------------------------------------------------------------------
# Data: the CSVs as pixels / 255 in one tensor on the training device, and the stratified folds (read_digits_csv, under
# Input checks, checks every cell)


@dataclasses.dataclass
class Digits:
    images: torch.Tensor  # (N, 1, 28, 28) float32 in [0, 1] on the training device
    labels: torch.Tensor  # (N,) int64 on the training device
    label_array: np.ndarray  # (N,) the same labels on the host
    test_images: torch.Tensor  # (M, 1, 28, 28) uint8 on the host: predicted chunk by chunk
    folds: list  # per fold: (train indices, validation indices) on the training device
    submission: tuple  # (id column name, id values, label column name)
    digest: str  # fingerprint of the training rows, part of the recipe


def load_data(cfg, device):
    """Read and validate everything before any training: a bad cell fails in a second, not after an hour."""
    data_dir = resolve_data_dir(cfg)
    train_path = os.path.join(data_dir, "train.csv")
    train_pixels, labels, _ = read_digits_csv(train_path, "train")
    test_pixels, _, test_ids = read_digits_csv(os.path.join(data_dir, "test.csv"), "test")
    submission = submission_columns(data_dir, test_ids, len(test_pixels))
    if cfg.limit is not None:
        train_pixels, labels = train_pixels[:cfg.limit], labels[:cfg.limit]
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    for digit in np.flatnonzero(counts):
        if counts[digit] < cfg.folds:
            raise InputError(f"{train_path}: digit {digit} has {counts[digit]} images, fewer than --folds {cfg.folds}")
    folds = list(StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed).split(train_pixels, labels))
    if min(len(train) for train, _ in folds) < 2:  # BatchNorm cannot train on one image
        raise InputError(f"{train_path}: {len(labels)} rows leave a fold fewer than 2 training images: use more rows "
                         "or fewer --folds")
    fold_rows = [(torch.from_numpy(train).to(device), torch.from_numpy(val).to(device)) for train, val in folds]
    return Digits(images=to_image_tensor(train_pixels, device), labels=torch.from_numpy(labels).to(device),
                  label_array=labels, test_images=torch.from_numpy(test_pixels).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE),
                  folds=fold_rows, submission=submission,
                  digest=hashlib.sha256(train_pixels.tobytes() + labels.tobytes()).hexdigest()[:16])


def to_image_tensor(pixels, device):
    """uint8 (N, 784) -> float32 (N, 1, 28, 28) in [0, 1] on the device."""
    images = torch.from_numpy(pixels).to(device)
    return images.view(-1, 1, IMAGE_SIZE, IMAGE_SIZE).float().div_(255)


# -----------------------------------------------------------------------------------------------------------------
# Augmentation: the reference's torchvision RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10),
# then RandomPerspective(0.2, p=0.5), with torchvision's draws and resampling (the tests compare them). Not
# torchvision's own, which draws once per call for one image on the host: here each image has its own draw, on the
# device, in two grid_sample calls that a CUDA graph can capture. A map sends an output pixel to the input position it
# reads; pixel i spans [i, i + 1), as in torchvision.


def augment(images, generator):
    """f(images, generator) -> images, each with its own draw, resampled as torchvision does: RandomAffine's nearest
    neighbour, then RandomPerspective's bilinear (one bilinear pass of the composed map would blur every digit)."""
    size = images.shape[-1]
    p = draw_augment_params(images.shape[0], generator, images.device, size)
    affine = affine_maps(p["angle"], p["translate_x"], p["translate_y"], p["scale"], p["shear_x"], size)
    moved = warp(images, affine, mode="nearest")
    warped = warp(moved, perspective_maps(p["endpoints"], size))
    return torch.where(p["perspective"].view(-1, 1, 1, 1), warped, moved)


def draw_augment_params(n, generator, device, size=IMAGE_SIZE):
    """n independent draws of RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10) and
    RandomPerspective(distortion_scale=0.2, p=0.5), with torchvision's distributions, as (n,)-shaped tensors."""
    u = torch.rand(n, 5, generator=generator, device=device)
    max_shift = 0.1 * size
    params = dict(angle=u[:, 0] * 30 - 15, scale=0.9 + 0.2 * u[:, 3], shear_x=u[:, 4] * 20 - 10,
                  translate_x=torch.round(u[:, 1] * 2 * max_shift - max_shift),  # whole pixels, as torchvision rounds
                  translate_y=torch.round(u[:, 2] * 2 * max_shift - max_shift))
    # RandomPerspective moves each corner (top-left, top-right, bottom-right, bottom-left) inward by a whole number of
    # pixels in [0, int(0.2 * (size // 2)) + 1), along these directions, made on the device: a graph cannot copy them.
    bound = int(0.2 * (size // 2)) + 1
    inward = torch.randint(0, bound, (n, 4, 2), generator=generator, device=device).float()
    params["perspective"] = torch.rand(n, generator=generator, device=device) < 0.5  # (n,) bool
    direction = torch.ones(4, 2, device=device)
    direction[1:3, 0] = -1  # the right-hand corners move left
    direction[2:4, 1] = -1  # the bottom corners move up
    corners = (size - 1.0) * (direction < 0)  # each corner's pixel: 0 or size - 1
    params["endpoints"] = corners + direction * inward * params["perspective"].view(n, 1, 1)  # (n, 4, 2)
    return params


def affine_maps(angle, translate_x, translate_y, scale, shear_x, size=IMAGE_SIZE):
    """(B,) degrees and pixels -> (B, 3, 3) inverse maps equal to torchvision's F.affine (about the centre, x shear)."""
    rot, shear = torch.deg2rad(angle), torch.deg2rad(shear_x)
    # torchvision's _get_inverse_affine_matrix with shear_y = 0: inverse of rotation * scale * shear.
    a, b = torch.cos(rot), -torch.cos(rot) * torch.tan(shear) - torch.sin(rot)
    c, d = torch.sin(rot), -torch.sin(rot) * torch.tan(shear) + torch.cos(rot)
    m00, m01, m10, m11 = d / scale, -b / scale, -c / scale, a / scale
    centre = size / 2
    shift_x, shift_y = -centre - translate_x, -centre - translate_y
    zeros, ones = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([
        torch.stack([m00, m01, m00 * shift_x + m01 * shift_y + centre], -1),
        torch.stack([m10, m11, m10 * shift_x + m11 * shift_y + centre], -1),
        torch.stack([zeros, zeros, ones], -1),
    ], -2)


def perspective_maps(endpoints, size=IMAGE_SIZE):
    """(B, 4, 2) endpoints of the corners -> (B, 3, 3) inverse maps equal to torchvision's F.perspective from them."""
    to_start = torch.ones(3, device=endpoints.device)
    to_start[:2] = size - 1.0
    return to_start.diag() @ adjugate(square_to_quad(endpoints))


def square_to_quad(quads):
    """(B, 4, 2) corners from top-left, clockwise -> (B, 3, 3) homographies of the unit square onto them (Heckbert)."""
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = [quads[:, i].unbind(-1) for i in range(4)]
    dx1, dx2, dx3 = x1 - x2, x3 - x2, x0 - x1 + x2 - x3
    dy1, dy2, dy3 = y1 - y2, y3 - y2, y0 - y1 + y2 - y3
    den = dx1 * dy2 - dx2 * dy1
    g = (dx3 * dy2 - dx2 * dy3) / den
    h = (dx1 * dy3 - dx3 * dy1) / den
    return torch.stack([
        torch.stack([x1 - x0 + g * x1, x3 - x0 + h * x3, x0], -1),
        torch.stack([y1 - y0 + g * y1, y3 - y0 + h * y3, y0], -1),
        torch.stack([g, h, torch.ones_like(g)], -1),
    ], -2)


def adjugate(maps):
    """(B, 3, 3) -> (B, 3, 3) adjugates: the inverses times the determinants, which is the same map in homogeneous
    coordinates, without linalg.inv's error check (a device sync that a CUDA graph cannot capture)."""
    r0, r1, r2 = maps.unbind(-2)
    return torch.stack([torch.linalg.cross(r1, r2), torch.linalg.cross(r2, r0), torch.linalg.cross(r0, r1)], -1)


def warp(images, maps, mode="bilinear"):
    """Resample each image (B, C, H, W) through its map (B, 3, 3), or one (1, 3, 3) for all, from output to input."""
    batch, _, height, width = images.shape
    maps = maps.expand(batch, 3, 3)
    ys, xs = torch.meshgrid(torch.arange(height, device=images.device) + 0.5,
                            torch.arange(width, device=images.device) + 0.5, indexing="ij")
    pixels = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, height * width, 3)
    points = pixels @ maps.to(images.dtype).transpose(1, 2)  # (B, H*W, 3) input pixel positions, homogeneous
    x, y = (points[..., :2] / points[..., 2:]).unbind(-1)
    grid = torch.stack([x * (2 / width) - 1, y * (2 / height) - 1], -1).view(batch, height, width, 2)  # to [-1, 1]
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


# -----------------------------------------------------------------------------------------------------------------
# Models: the reference's two CNNs


class ResidualBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetMNIST(nn.Module):
    """Compact ResNet: 32-channel stem, three stages of two residual blocks (64, 128, 256), GAP, dropout, FC."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.stages = nn.Sequential(
            ResidualBlock(32, 64), ResidualBlock(64, 64),  # (B, 64, 28, 28)
            ResidualBlock(64, 128, stride=2), ResidualBlock(128, 128),  # (B, 128, 14, 14)
            ResidualBlock(128, 256, stride=2), ResidualBlock(256, 256),  # (B, 256, 7, 7)
        )
        self.dropout = nn.Dropout(0.4)
        self.fc = nn.Linear(256, NUM_CLASSES)

    def forward(self, x):
        x = self.stages(self.stem(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 256)
        return self.fc(self.dropout(x))


def conv_bn_relu(in_channels, out_channels):
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU()]


class WideConvNet(nn.Module):
    """VGG-style: three conv-conv-pool-dropout blocks (64, 128, 256), then 4096 -> 512 -> 10."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(1, 64), *conv_bn_relu(64, 64), nn.MaxPool2d(2), nn.Dropout(0.25),  # (B, 64, 14, 14)
            *conv_bn_relu(64, 128), *conv_bn_relu(128, 128), nn.MaxPool2d(2), nn.Dropout(0.25),  # (B, 128, 7, 7)
            *conv_bn_relu(128, 256), *conv_bn_relu(256, 256), nn.MaxPool2d(2, padding=1), nn.Dropout(0.25),
        )  # (B, 256, 4, 4)
        self.classifier = nn.Sequential(nn.Linear(256 * 4 * 4, 512), nn.BatchNorm1d(512), nn.ReLU(),
                                        nn.Dropout(0.5), nn.Linear(512, NUM_CLASSES))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


ARCHITECTURES = {"resnet": ResNetMNIST, "wide": WideConvNet}


# -----------------------------------------------------------------------------------------------------------------
# Training: one (architecture, fold) job


def job_seed(seed, arch, fold):
    """A job's seed depends on (seed, architecture, fold) alone, never on which jobs ran before it."""
    return int(np.random.SeedSequence([seed, zlib.crc32(arch.encode()), fold]).generate_state(1)[0])


def train_step(model, optimizer, scaler, images, labels, batch_idx, generator, amp_dtype, cfg, totals):
    """One optimizer step on the batch images[batch_idx]; adds its loss and correct count into totals (device)."""
    batch = augment(images[batch_idx], generator).contiguous(memory_format=memory_format_for(images.device))
    batch_labels = labels[batch_idx]
    # No autocast weight cache: a CUDA graph must cast the weights inside every replay.
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=False):
        logits = model(batch)
    loss = F.cross_entropy(logits.float(), batch_labels, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    with onednn_enabled(not (images.device.type == "cpu" and amp_dtype == torch.float16)):
        scaler.scale(loss).backward()  # float16's loss scaling; the identity in other precisions
    scaler.step(optimizer)  # optimizer.step(), which float16 skips where the gradients overflowed
    scaler.update()
    totals["loss_sum"] += loss.detach() * len(batch_idx)
    totals["correct"] += (logits.argmax(1) == batch_labels).sum()


def train_job(cfg, arch, fold, data, device, progress, recipe):
    """Train one (architecture, fold) job and write its finished checkpoint: the best epoch's weights. The machinery
    (resume, the CUDA graph, the saving thread) is in the helpers named below, under "Resume" and "CUDA graphs"."""
    train_idx, val_idx = data.folds[fold]
    train_images, train_labels = data.images[train_idx], data.labels[train_idx]
    val_images, val_labels = data.images[val_idx], data.label_array[val_idx.cpu().numpy()]
    seed = job_seed(cfg.seed, arch, fold)
    torch.manual_seed(seed)  # model init (on the CPU, so the same on every device) and dropout
    generator = torch.Generator(device=device).manual_seed(seed)  # shuffling and augmentation
    amp_dtype = autocast_dtype(device, cfg.precision)
    graphed = cuda_graphs(device) and len(train_idx) >= cfg.batch_size  # a graph replays full batches only
    say = functools.partial(progress.say, arch, fold)  # a line about this job

    model = ARCHITECTURES[arch]().to(device, memory_format=memory_format_for(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  **adamw_implementation(amp_dtype, graphed))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # float16 only: loss scaling
    state_path = checkpoint_path(cfg.out, arch, fold, in_progress=True)
    parts = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)  # what a resume restores
    job = resume_job(state_path, parts, generator, device, seed, say)
    totals = {"loss_sum": torch.zeros((), device=device), "correct": torch.zeros((), dtype=torch.long, device=device)}

    def step(batch_idx):
        train_step(model, optimizer, scaler, train_images, train_labels, batch_idx, generator, amp_dtype, cfg, totals)
    if graphed:
        step = graph_full_batches(step, cfg.batch_size, parts, generator, say)
    n_train = len(train_images)
    n_used = n_train - 1 if n_train % cfg.batch_size == 1 else n_train  # BatchNorm cannot train on a batch of one

    with StateSaver(state_path) as saver:
        while job["epoch"] < cfg.epochs and job["stale"] < cfg.patience:
            job["epoch"] += 1
            epoch_start = time.perf_counter()
            model.train()
            for total in totals.values():
                total.zero_()
            order = torch.randperm(n_train, generator=generator, device=device)[:n_used]  # shuffle
            for batch_idx in order.split(cfg.batch_size):
                step(batch_idx)  # augment, forward, loss with label smoothing, backward, AdamW
            lr = float(optimizer.param_groups[0]["lr"])
            scheduler.step()  # the cosine schedule moves once an epoch
            train_loss = totals["loss_sum"].item() / n_used
            check_finite(model, train_loss, f"{arch}_fold{fold}", job["epoch"])
            # Validated as the ensemble predicts: BatchNorm folded (into a copy: training goes on), the plain images.
            val_probs = predict_probs(fold_batchnorm(model), val_images, tta_views(tta=False), amp_dtype)
            val_acc = float((val_probs.argmax(1).numpy() == val_labels).mean())
            if val_acc > job["best_acc"]:  # keep the best epoch's weights
                job.update(best_acc=val_acc, best_epoch=job["epoch"], stale=0, best_state=host_copy(model.state_dict()))
            else:  # early stopping counts the epochs without a better one
                job["stale"] += 1
            seconds = time.perf_counter() - epoch_start
            record = dict(epoch=job["epoch"], train_loss=train_loss, train_acc=totals["correct"].item() / n_used,
                          val_acc=val_acc, lr=lr, seconds=seconds, precision=precision_name(amp_dtype))
            job["history"].append(record)
            job["train_seconds"] += seconds
            saver.save(job_state(job, parts, generator, recipe))
            progress(arch, fold, record)
    progress.epochs_left -= cfg.epochs - job["epoch"]

    finished = {"model": job["best_state"], "arch": arch, "fold": fold, "epoch": job["best_epoch"],
                "val_acc": job["best_acc"], "config": dataclasses.asdict(cfg), "recipe": recipe, "finished": True,
                "history": job["history"], "train_seconds": job["train_seconds"],
                "images_trained": n_used * len(job["history"]), "precision": ", then ".join(dict.fromkeys(
                    h.get("precision", "unknown") for h in job["history"]))}  # each epoch's, in order
    write_atomic(checkpoint_path(cfg.out, arch, fold), functools.partial(torch_save, finished))
    os.remove(state_path)


def check_finite(model, train_loss, job_name, epoch):
    """A job whose loss or weights are no longer finite stops the command (float16's skipped steps leave both finite).
    The weights are checked with one device sync, not one per tensor."""
    weights_finite = torch.stack([t.isfinite().all() for t in model.state_dict().values()]).all().item()
    if not (math.isfinite(train_loss) and weights_finite):
        raise InputError(f"{job_name}: training diverged in epoch {epoch} (loss {train_loss:g}, weights no longer "
                         "finite), so nothing is written from it: lower --lr or --weight-decay (a new recipe: another "
                         "--out, or --fresh)")


@contextlib.contextmanager
def onednn_enabled(enabled):
    """float16 on the CPU runs the T4's arithmetic for the tests, but oneDNN's float16 convolution backward is 8x
    slower than PyTorch's own: that backward runs without oneDNN."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = before and enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


# -----------------------------------------------------------------------------------------------------------------
# The ensemble: every finished model on 4 fixed test-time views, softmax probabilities averaged


def tta_views(size=IMAGE_SIZE, tta=True):
    """Fixed test-time views as (name, (1, 3, 3) inverse map or None for the untouched image). The reference draws
    its views at random (RandomAffine(degrees=5, translate=(0.05, 0.05)), scale=(0.95, 1.05)); fixed ones give the
    same submission every time."""
    def view(angle=0.0, scale=1.0):
        no_shift, no_shear = torch.zeros(1), torch.zeros(1)
        return affine_maps(torch.tensor([angle]), no_shift, no_shift, torch.tensor([scale]), no_shear, size=size)
    views = [("identity", None)]
    if tta:
        views += [("rotate+5", view(angle=5.0)), ("rotate-5", view(angle=-5.0)), ("scale1.05", view(scale=1.05))]
    return views


def fold_batchnorm(model):
    """An inference copy with each BatchNorm folded into the conv or linear layer before it (torch.fx finds them)."""
    folded = torch.fx.experimental.optimization.fuse(copy.deepcopy(model).eval(), inplace=True)
    return folded.to(memory_format=memory_format_for(next(model.parameters()).device))


@torch.no_grad()
def predict_probs(model, images, views, amp_dtype=None):
    """Softmax probabilities (N, 10) on the CPU, averaged over the views, computed in chunks."""
    model.eval()
    device = next(model.parameters()).device
    memory_format = memory_format_for(device)
    chunk = 1024 if device.type == "cuda" else 64  # small batches stay in the CPU's caches, large ones fill a GPU
    chunks = []
    for start in range(0, len(images), chunk):
        batch = images[start:start + chunk].to(device)
        if not batch.is_floating_point():  # uint8 test pixels stay on the host until their chunk is needed
            batch = batch.float().div_(255)
        probs = torch.zeros(len(batch), NUM_CLASSES, device=device)
        for _, view_map in views:
            viewed = batch if view_map is None else warp(batch, view_map.to(device))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(viewed.contiguous(memory_format=memory_format))
            probs += logits.float().softmax(1)
        chunks.append((probs / len(views)).cpu())
    return torch.cat(chunks)


def predict_jobs(cfg, data, device):
    """Each finished checkpoint predicts its validation rows and the test set -> (jobs' records, out-of-fold probs
    {(arch, fold): (n_val, 10)}, test probs (N, 10) summed model by model, so memory does not grow, test seconds)."""
    views, amp_dtype = tta_views(tta=cfg.tta), autocast_dtype(device, cfg.precision)
    results, val_probs, missing, test_seconds = [], {}, [], 0.0
    test_sum = torch.zeros(len(data.test_images), NUM_CLASSES, dtype=torch.float64)
    for arch in cfg.archs:
        for fold in range(cfg.folds):
            path = checkpoint_path(cfg.out, arch, fold)
            if not os.path.exists(path):
                missing.append(f"{arch}_fold{fold}")
                continue
            model, state = load_checkpoint(path, device)
            model = fold_batchnorm(model.to(device))
            val_probs[arch, fold] = predict_probs(model, data.images[data.folds[fold][1]], views, amp_dtype)
            start = time.perf_counter()
            test_sum += predict_probs(model, data.test_images, views, amp_dtype)
            test_seconds += time.perf_counter() - start
            seconds, images = state["train_seconds"], state["images_trained"]
            results.append({"arch": arch, "fold": fold, "best_val_acc": state["val_acc"], "best_epoch": state["epoch"],
                            "epochs_run": len(state["history"]), "train_seconds": seconds, "images_trained": images,
                            "train_images_per_second": images / max(seconds, 1e-9),
                            "precision": state.get("precision", "unknown"),  # its own: a job may come from elsewhere
                            "history": state["history"]})
    if not results:
        raise InputError(f"{os.path.join(cfg.out, 'checkpoints')}: no finished checkpoints for --archs "
                         f"{','.join(cfg.archs)}; train first")
    if missing:
        print(f"missing jobs, left out of the ensemble: {', '.join(missing)}", flush=True)
    return results, val_probs, (test_sum / len(results)).numpy(), test_seconds


# -----------------------------------------------------------------------------------------------------------------
# Outputs: submission.csv, oof.csv, metrics.json and a summary


def write_outputs(cfg, data, device, wall_start, setup_seconds, demo_labels=None):
    """The ensemble from the finished checkpoints: submission.csv, oof.csv, pictures, metrics.json."""
    predict_start = time.perf_counter()
    results, val_probs, test_probs, test_seconds = predict_jobs(cfg, data, device)
    labels = data.label_array

    # Ensemble: softmax averaged over every model and view. OOF: per architecture with all folds, then their mean.
    oof_by_arch = {}
    for arch in cfg.archs:
        if all((arch, fold) in val_probs for fold in range(cfg.folds)):
            oof = np.zeros((len(labels), NUM_CLASSES), dtype=np.float32)
            for fold in range(cfg.folds):
                oof[data.folds[fold][1].cpu().numpy()] = val_probs[arch, fold].numpy()
            oof_by_arch[arch] = oof
    if not np.isfinite(test_probs).all():  # a checkpoint from elsewhere, trained to NaN
        raise InputError(f"{os.path.join(cfg.out, 'checkpoints')}: the models predict NaN; no submission written")
    predictions = test_probs.argmax(1)
    id_name, ids, label_name = data.submission
    write_csv(os.path.join(cfg.out, "submission.csv"), pd.DataFrame({id_name: ids, label_name: predictions}))
    oof_acc = {}
    if oof_by_arch:
        oof_probs = np.mean(list(oof_by_arch.values()), axis=0)
        oof_acc = {arch: float((p.argmax(1) == labels).mean()) for arch, p in oof_by_arch.items()}
        oof_acc["ensemble"] = float((oof_probs.argmax(1) == labels).mean())
        oof_frame = pd.DataFrame({"index": np.arange(len(labels)), "label": labels, "pred": oof_probs.argmax(1),
                                  **{f"p{digit}": oof_probs[:, digit] for digit in range(NUM_CLASSES)}})
        write_csv(os.path.join(cfg.out, "oof.csv"), oof_frame, float_format="%.6f")
        write_pictures(cfg, results, labels, oof_probs, data.images,
                       torch.Generator(device=device).manual_seed(cfg.seed))
    else:  # nor an earlier run's: they would describe other models
        for path in [os.path.join(cfg.out, name) for name in ("oof.csv", *PICTURES)]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        print("no architecture has all its folds: no out-of-fold report and no pictures", flush=True)

    train_seconds, end = sum(r["train_seconds"] for r in results), time.perf_counter()
    metrics = {
        "config": dataclasses.asdict(cfg),
        "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
        "precision": precision_name(autocast_dtype(device, cfg.precision)),
        "versions": {"python": platform.python_version(), **{  # torchvision is the tests' reference alone
            name: next((package.version for package in importlib.metadata.distributions(name=name)), "not installed")
            for name in ("torch", "torchvision", "numpy", "pandas", "scikit-learn")}},
        "jobs": results,
        "oof_accuracy": oof_acc,
        "wall_seconds": end - wall_start,  # this session: the three parts below, the jobs' starts and their saving
        "setup_seconds": setup_seconds,  # the device, reading and checking the data
        "train_seconds": train_seconds,  # the jobs' epochs with their validation, over every session that ran them
        "predict_seconds": end - predict_start,  # out-of-fold and test predictions, the files, the pictures
        "train_images_per_second": sum(r["images_trained"] for r in results) / max(train_seconds, 1e-9),
        "test_tta_images_per_second": len(data.test_images) * len(results) * len(tta_views(tta=cfg.tta)) / test_seconds,
    }
    if device.type == "cuda":
        metrics["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if demo_labels is not None:
        metrics["demo_test_accuracy"] = float((predictions == demo_labels).mean())
    # A run that learned nothing (one epoch: BatchNorm's running statistics are not yet the data's) says so at the end.
    accuracy = oof_acc.get("ensemble", np.mean([r["best_val_acc"] for r in results]))
    share = np.bincount(predictions, minlength=NUM_CLASSES).max() / len(predictions)  # of the commonest digit
    if accuracy < 2 / NUM_CLASSES:
        metrics["warning"] = (f"these models learned nothing: validation accuracy {accuracy:.2f} (chance: 0.10), and "
                              f"{share:.0%} of submission.csv is one digit. Do not submit it: train longer")
    elif share > 0.5:  # the models read train.csv's digits: test.csv's images are not like them
        metrics["warning"] = (f"{share:.0%} of submission.csv is one digit, though the models learned (validation "
                              f"accuracy {accuracy:.2f}): test.csv's images are unlike train.csv's. Do not submit it: "
                              "check test.csv's columns (their order, an extra one)")
    write_atomic(os.path.join(cfg.out, "metrics.json"),
                 lambda tmp: pathlib.Path(tmp).write_text(json.dumps(metrics, indent=1) + "\n"))
    print_summary(cfg, results, oof_acc, metrics)
    return metrics


def print_summary(cfg, results, oof_acc, metrics):
    print(f"\n{'arch':<8}{'fold':>5}{'best epoch':>12}{'val acc':>10}{'seconds':>10}")
    for r in results:
        print(f"{r['arch']:<8}{r['fold']:>5}{r['best_epoch']:>12}{r['best_val_acc']:>10.4f}{r['train_seconds']:>10.1f}")
    views = "4-view TTA" if cfg.tta else "no TTA"
    if oof_acc:
        print("out-of-fold accuracy (" + views + "): " + "  ".join(f"{k} {v:.4f}" for k, v in oof_acc.items()))
    print(f"trained {metrics['train_images_per_second']:.0f} images/s, wall time "
          f"{datetime.timedelta(seconds=round(metrics['wall_seconds']))}; outputs in {os.path.abspath(cfg.out)}")
    if "demo_test_accuracy" in metrics:
        print(f"demo held-out test accuracy: {metrics['demo_test_accuracy']:.4f}")
    print(f"submission: {os.path.abspath(os.path.join(cfg.out, 'submission.csv'))}", flush=True)
    if "warning" in metrics:
        print(f"WARNING: {metrics['warning']}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------------------------------------------
# The whole run: this process's jobs, then the ensemble's outputs


def training_jobs(cfg):
    """The (architecture, fold) jobs this command trains: none with --predict-only."""
    folds = cfg.fold or range(cfg.folds)
    return [] if cfg.predict_only else [(arch, fold) for arch in cfg.archs for fold in folds]


def run(cfg, launched=False):
    """Train every (architecture, fold) job this process owns, then (rank 0) predict and write the outputs."""
    rank, world, local_rank = start_distributed()
    try:
        return train_and_predict(cfg, rank, world, local_rank, claim=rank == 0 and not launched)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def train_and_predict(cfg, rank, world, local_rank, claim):
    wall_start, demo_labels = time.perf_counter(), None
    device = resolve_device(cfg.device, local_rank)
    amp_dtype = autocast_dtype(device, cfg.precision)  # may refuse --precision: before anything is written
    if cfg.demo:  # made and checked aside first: a demo that is refused writes nothing in --out
        aside = tempfile.TemporaryDirectory()  # (removed when the run ends)
        cfg.data, demo_labels = aside.name, make_demo_data(aside.name, seed=cfg.seed)
    data, recipe = check_inputs(cfg, device)
    with claim_out(cfg) if claim else contextlib.nullcontext():  # the command's first write in --out comes after
        if cfg.demo:  # the same files, for the user to look at
            cfg.data = os.path.join(cfg.out, "demo_data")
            make_demo_data(cfg.data, seed=cfg.seed)
        if world > 1:  # rank 0 has claimed --out
            torch.distributed.barrier()
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True  # same seed, same GPU kernels
        mine = training_jobs(cfg)[rank::world]  # every job seeds itself, so the split cannot change any result
        if mine:
            print(f"{'[rank %d] ' % rank if world > 1 else ''}device {device} ({precision_name(amp_dtype)}), "
                  f"{len(data.labels)} training images, {len(data.test_images)} test images, jobs: {len(mine)}, "
                  f"epochs: {cfg.epochs}", flush=True)
        setup_seconds = time.perf_counter() - wall_start  # device, data, checks: before the first job
        progress = Progress(cfg, len(mine), rank, world)
        for arch, fold in mine:
            if os.path.exists(checkpoint_path(cfg.out, arch, fold)):
                progress.say(arch, fold, "finished earlier: skipped", cfg.epochs)
            else:
                train_job(cfg, arch, fold, data, device, progress, recipe)
        if world > 1:  # rank 0 writes the outputs once every job is done
            torch.distributed.barrier()
        if rank == 0:
            return write_outputs(cfg, data, device, wall_start, setup_seconds, demo_labels)


class Progress:
    """A line per epoch, with an ETA for this process's epochs still to run from the mean epoch time so far."""

    def __init__(self, cfg, jobs, rank=0, world=1):
        self.cfg, self.epochs_left, self.seconds, self.timed = cfg, jobs * cfg.epochs, 0.0, 0
        self.prefix = f"[rank {rank}] " if world > 1 else ""

    def say(self, arch, fold, text, epochs_done=0):  # early stopping and resumes leave epochs that will never run
        self.epochs_left -= epochs_done
        print(f"{self.prefix}{f'{arch}_fold{fold}':<12} {text}", flush=True)  # as checkpoints/ and --fold say

    def __call__(self, arch, fold, r):
        self.seconds, self.timed = self.seconds + r["seconds"], self.timed + 1
        eta = datetime.timedelta(seconds=round(self.seconds / self.timed * (self.epochs_left - 1)))
        self.say(arch, fold, f"epoch {r['epoch']:>2}/{self.cfg.epochs}  loss {r['train_loss']:.4f}  train "
                 f"{r['train_acc']:.4f}  val {r['val_acc']:.4f}  lr {r['lr']:.2e}  {r['seconds']:.1f}s  eta {eta}", 1)


# -----------------------------------------------------------------------------------------------------------------
# Pictures of the run (matplotlib's object API: no pyplot, so no global backend switch inside a notebook)


PICTURES = ("curves.png", "confusion.png", "mistakes.png", "samples.png")
TILE_GAP, TILE_INCHES = 4, 1.1 / 32  # white pixels between tiles; inches per pixel of a tile picture


def write_png(fig, path):
    write_atomic(path, functools.partial(fig.savefig, format="png"))


def tiles_figure(pictures, columns, titles=None):
    """A figure of (N, H, W) pictures in [0, 1], in rows of `columns` on one axes with white between them, and
    titles[k] over picture k. One imshow of them all: an axes per picture took most of a picture's drawing time."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    count, height, width = pictures.shape
    rows = max(1, math.ceil(count / columns))
    top = TILE_GAP + (12 if titles is not None else 0)  # white above each row, for its titles
    canvas = np.full((rows * (height + top), columns * (width + TILE_GAP) - TILE_GAP), np.nan)
    corners = [(k // columns * (height + top) + top, k % columns * (width + TILE_GAP)) for k in range(count)]
    for (y, x), picture in zip(corners, pictures):
        canvas[y:y + height, x:x + width] = picture
    fig = Figure(figsize=(canvas.shape[1] * TILE_INCHES, canvas.shape[0] * TILE_INCHES + 0.5), layout="constrained",
                 dpi=110)
    ax = fig.subplots()
    ax.imshow(canvas, cmap=colormaps["gray"].with_extremes(bad="white"), vmin=0, vmax=1, interpolation="nearest")
    for (y, x), title in zip(corners, titles or []):
        ax.text(x + width / 2, y - 1, title, ha="center", va="bottom", fontsize=8)
    ax.set(xticks=[], yticks=[])
    ax.set_frame_on(False)
    return fig, ax


def write_pictures(cfg, results, labels, oof_probs, images, generator):
    """curves.png, confusion.png, mistakes.png and samples.png in --out; skipped in one line without matplotlib."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print(f"matplotlib is not installed: skipping {', '.join(PICTURES)}", flush=True)
        return
    predictions = oof_probs.argmax(1)

    # Training curves: a column per architecture, loss above validation accuracy, the kept epoch starred.
    fig = Figure(figsize=(5 * len(cfg.archs), 7), layout="constrained", dpi=110)
    axes = fig.subplots(2, len(cfg.archs), squeeze=False)
    for column, arch in enumerate(cfg.archs):
        loss_ax, acc_ax = axes[0, column], axes[1, column]
        for r in [r for r in results if r["arch"] == arch]:
            epochs, label = [h["epoch"] for h in r["history"]], f"fold {r['fold']}"
            dot = "o" if len(epochs) == 1 else None  # a line of one point draws nothing
            (line,) = loss_ax.plot(epochs, [h["train_loss"] for h in r["history"]], label=label, marker=dot)
            acc_ax.plot(epochs, [h["val_acc"] for h in r["history"]], color=line.get_color(), label=label)
            acc_ax.plot(r["best_epoch"], r["best_val_acc"], marker="*", markersize=13, color=line.get_color())
        loss_ax.set(title=f"{arch}: training loss", xlabel="epoch", ylabel="loss (augmented, smoothed labels)")
        acc_ax.set(title=f"{arch}: validation accuracy (* = kept epoch)", xlabel="epoch", ylabel="accuracy")
        for ax in (loss_ax, acc_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if np.ptp(ax.get_xlim()) < 1:  # every job ran one epoch: an axis around it, not around 0.95-1.05
                ax.set_xlim(0.5, 1.5)
        if loss_ax.lines:
            loss_ax.legend(fontsize=8)
            acc_ax.legend(fontsize=8, loc="lower right")
    write_png(fig, os.path.join(cfg.out, "curves.png"))

    # Confusion matrix of the ensemble's out-of-fold predictions, every count written in its cell.
    from sklearn.metrics import ConfusionMatrixDisplay
    fig = Figure(figsize=(7.5, 6.5), layout="constrained", dpi=110)
    ax = fig.subplots()
    ConfusionMatrixDisplay.from_predictions(labels, predictions, labels=range(NUM_CLASSES), ax=ax, cmap="Blues")
    errors = int((predictions != labels).sum())
    ax.set(xlabel="predicted digit", ylabel="true digit",
           title=f"Out-of-fold confusion, ensemble: {errors} errors in {len(labels)} images")
    write_png(fig, os.path.join(cfg.out, "confusion.png"))

    # The out-of-fold mistakes, most confident first.
    wrong = np.flatnonzero(predictions != labels)
    wrong = wrong[np.argsort(-oof_probs[wrong, predictions[wrong]], kind="stable")][:40]
    titles = [f"true {labels[i]}, pred {predictions[i]}\np = {oof_probs[i, predictions[i]]:.2f}" for i in wrong]
    fig, ax = tiles_figure(images[wrong, 0].cpu().numpy(), columns=8, titles=titles)
    fig.suptitle(f"Out-of-fold mistakes, most confident first ({len(wrong)} of {errors} shown)")
    if len(wrong) == 0:
        ax.text(0, IMAGE_SIZE / 2, "no out-of-fold mistakes", fontsize=12)
    write_png(fig, os.path.join(cfg.out, "mistakes.png"))

    # What the augmentation does: the first image of each digit, then augmented draws of it.
    firsts = [int(np.flatnonzero(labels == d)[0]) for d in range(NUM_CLASSES) if (labels == d).any()]
    draws = 7
    originals = images[firsts]
    augmented = torch.stack([augment(originals, generator) for _ in range(draws)], 1)  # (digits, draws, 1, H, W)
    rows = torch.cat([originals[:, None], augmented], 1)  # (digits, 1 + draws, 1, H, W)
    fig, ax = tiles_figure(rows.flatten(0, 2).cpu().numpy(), columns=draws + 1)
    fig.suptitle("Training augmentation: original, then random affine + perspective draws")
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_xticks([(IMAGE_SIZE + TILE_GAP) * k + IMAGE_SIZE / 2 for k in range(draws + 1)],
                  ["original"] + [f"draw {k}" for k in range(1, draws + 1)], fontsize=8)
    write_png(fig, os.path.join(cfg.out, "samples.png"))
    print(f"wrote {', '.join(PICTURES)}", flush=True)


# -----------------------------------------------------------------------------------------------------------------
# Devices and precision


def resolve_device(name, local_rank=0):
    """auto: cuda, then mps, then cpu. Process k takes GPU k modulo their number, made the current CUDA device."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        try:  # a card this build has no kernels for (Kaggle's P100 under CUDA 12.8) fails its first one
            torch.cuda.set_device(device)  # first: else the check below may open a context on GPU 0 too
            with warnings.catch_warnings(action="ignore"):  # torch's own paragraph about such a card: our line says it
                torch.ones(1, device=device).add_(1).item()
        except (RuntimeError, AssertionError):
            major, minor = torch.cuda.get_device_capability(device)
            raise InputError(f"--device {name}: {torch.cuda.get_device_name(device)} (compute capability "
                             f"{major}.{minor}) cannot run this PyTorch {torch.__version__} (built for "
                             f"{' '.join(torch.cuda.get_arch_list())}): choose Kaggle's GPU T4 x2, or pass "
                             "--device cpu") from None
        return device  # the current CUDA device: graph capture and side streams work on it
    if name == "auto":
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name != "cpu" and not (torch.cuda.is_available() if name == "cuda" else torch.backends.mps.is_available()):
        raise InputError(f"--device {name}: not available on this machine (try --device auto)")
    return torch.device(name)


def memory_format_for(device):
    """channels_last pays on CUDA (tensor cores) and on the CPU (oneDNN) alike (BENCHMARKS.md)."""
    return torch.channels_last if device.type in ("cuda", "cpu") else torch.contiguous_format


def cpu_vendor(cpuinfo="/proc/cpuinfo"):
    """'GenuineIntel', 'AuthenticAMD', ...: from /proc/cpuinfo on Linux, platform.processor() on Windows, or ''."""
    try:
        with open(cpuinfo) as f:
            return next((line.partition(":")[2].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return next((vendor for vendor in ("GenuineIntel", "AuthenticAMD") if vendor in platform.processor()), "")


def cpu_bfloat16_pays():
    """Whether bfloat16 beats float32 on this CPU's oneDNN (BENCHMARKS.md): with AMX (Xeon 4th generation on), or
    AVX512-BF16 on AMD (Zen 4, 5; Intel's runs at a quarter of its FMA rate), as ONEDNN_MAX_CPU_ISA lets it."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    amx_allowed = cap in ("ALL", "DEFAULT") or "AMX" in cap
    bf16_allowed = amx_allowed or cap in ("AVX512_CORE_BF16", "AVX512_CORE_FP16") or cap.startswith("AVX10")
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return (amx_allowed and bool(amx and amx())) or (
        bf16_allowed and bool(avx512_bf16 and avx512_bf16()) and cpu_vendor() == "AuthenticAMD")


def autocast_dtype(device, precision="auto"):
    """The forward passes' autocast dtype, or None for float32 (weights and optimizer stay float32). auto: bfloat16 on
    cards from compute capability 8.0, float16 (loss-scaled) on older ones (T4), bfloat16 on CPUs where it pays."""
    if precision == "float32" or device.type == "mps":
        return None
    if precision == "float16":
        return torch.float16
    if device.type == "cuda":
        has_bf16 = torch.cuda.get_device_capability(device)[0] >= 8
        if precision == "bfloat16" and not has_bf16:
            raise InputError(f"--precision bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 units "
                             "(use auto, which picks float16, or float32)")
        return torch.bfloat16 if has_bf16 else torch.float16
    return torch.bfloat16 if precision == "bfloat16" or cpu_bfloat16_pays() else None


def precision_name(amp_dtype):
    return {None: "float32", torch.bfloat16: "bfloat16 autocast", torch.float16: "float16 autocast"}[amp_dtype]


# -----------------------------------------------------------------------------------------------------------------
# Resume: each epoch saves a job's whole state, so a run killed anywhere continues to the weights of one never stopped


def job_state(job, parts, generator, recipe):
    """The job's progress, every part's state_dict and the random streams, copied to the host: the next epoch can
    train while a thread writes this."""
    device = generator.device
    return host_copy({**job, **{name: part.state_dict() for name, part in parts.items()},
                      "rng": rng_states(generator, device), "recipe": recipe})


def resume_job(path, parts, generator, device, seed, say):
    """A job's progress (epoch, best so far, history): a fresh one, or the saved state's, loaded into parts and the
    random streams. An unreadable state (a disk fault: writes are atomic) redoes at most the epochs it held."""
    job = dict(epoch=0, best_acc=-1.0, best_epoch=0, best_state=None, stale=0, history=[], train_seconds=0.0)
    try:
        saved = torch.load(path, map_location=device, weights_only=True) if os.path.exists(path) else None
    except Exception as e:
        print(f"warning: {path}: unreadable ({type(e).__name__}); that job starts over", file=sys.stderr)
        saved = None
    if saved is None:
        return job
    optimizer = parts["optimizer"]
    implementation = {key: optimizer.defaults[key] for key in ("foreach", "fused", "capturable")
                      if key in optimizer.defaults}  # (SGD has no capturable)
    for name, part in parts.items():
        if saved[name]:  # the scaler's is {} from a run without loss scaling (another precision): ours starts afresh
            part.load_state_dict(saved[name])
    # How AdamW runs is this session's choice, whatever kind of run saved the state: a graphed GPU run's capturable
    # AdamW with a device-tensor learning rate fails on the CPU (graph_full_batches makes its own).
    for group in optimizer.param_groups:
        group.update(implementation, lr=float(group["lr"]))
    job = {key: saved[key] for key in job}
    same_streams = set_rng_states(saved["rng"], generator, device, seed + job["epoch"])
    say(f"resumes after epoch {job['epoch']}" + ("" if same_streams else " (saved on another kind of device: its "
        "random streams start afresh)"), job["epoch"])
    return job


class StateSaver(ThreadPoolExecutor):
    """Writes each epoch's state on a second thread while the next epoch trains: one write at a time, in epoch order;
    a failed write raises at the next save or at the end. Leaving waits for the last write, Ctrl-C included."""

    def __init__(self, path):
        super().__init__(max_workers=1)
        self.path, self.writing = path, None

    def save(self, state):
        if self.writing is not None:
            self.writing.result()
        self.writing = self.submit(write_atomic, self.path, functools.partial(torch_save, state))

    def __exit__(self, error_type, error, traceback):
        super().__exit__(error_type, error, traceback)
        if error_type is None and self.writing is not None:
            self.writing.result()


def rng_states(generator, device):
    states = {"cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type != "cpu":  # torch.cuda or torch.mps: the current device's default generator
        states[device.type] = getattr(torch, device.type).get_rng_state()
    return states


def host_copy(state):
    """state with every tensor copied to the CPU: a snapshot that training can no longer change."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: host_copy(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(host_copy(value) for value in state)
    return state


def set_rng_states(states, generator, device, seed):
    """Continue the saved random streams (True), or, saved on another kind of device, start afresh from seed (False)."""
    states = {k: v.cpu() for k, v in states.items()}  # generator states are CPU byte tensors on every device
    saved_on = "cuda" if "cuda" in states else "mps" if "mps" in states else "cpu"
    if saved_on != device.type:
        torch.manual_seed(seed)  # the CPU's and every accelerator's default generators
        generator.manual_seed(seed)
        return False
    torch.set_rng_state(states["cpu"])
    generator.set_state(states["generator"])
    if device.type != "cpu":
        getattr(torch, device.type).set_rng_state(states[device.type])
    return True


# -----------------------------------------------------------------------------------------------------------------
# CUDA graphs: on a GPU a full batch's whole step (augmentation, forward, backward, AdamW) is one graph replay, as a
# batch of 128 digits is some 470 kernels, too small to keep a GPU busy when launched one by one


def cuda_graphs(device):
    """Whether to capture steps on this device: a CUDA one, with a torch whose graphs can hold our own generator."""
    return device.type == "cuda" and hasattr(torch.cuda.CUDAGraph, "register_generator_state")


def adamw_implementation(amp_dtype, graphed=False):
    """AdamW's options for this run: capturable in a graph (its step count and learning rate live on the device), and
    with float16 the fused one, which skips an overflowed step on the device (where a graph can)."""
    return dict(capturable=graphed, fused=amp_dtype == torch.float16 or None)


def graph_full_batches(step, batch_size, parts, generator, say):
    """step, with each full batch replayed from one CUDA graph of it; the last, smaller batch runs as it is. Where the
    capture fails (an operation this card or driver cannot capture), capture_step put all back: step runs eagerly."""
    device, optimizer = generator.device, parts["optimizer"]
    eager_lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:  # capturable AdamW reads its learning rate on the device
        group["lr"] = torch.tensor(group["lr"], device=device)
    static_idx = torch.arange(batch_size, device=device)  # the graph's input: a batch's indices
    parts["model"].train()
    try:
        graph = capture_step(step, static_idx, parts["model"], optimizer, parts["scaler"], generator)
    except Exception as e:
        first_line = str(e).partition("\n")[0]
        say(f"cannot capture a CUDA graph on {device} ({type(e).__name__}: {first_line}): training eagerly")
        for group, lr in zip(optimizer.param_groups, eager_lrs):  # AdamW as an eager run has it
            group.update(capturable=False, lr=lr)
        return step

    def replay_or_step(batch_idx):
        if len(batch_idx) == batch_size:
            static_idx.copy_(batch_idx)
            graph.replay()
        else:
            step(batch_idx)
    return replay_or_step


def capture_step(step, static_idx, model, optimizer, scaler, generator):
    """Record step(static_idx) as a CUDA graph. As PyTorch's notes advise, a few real steps on a side stream come
    first (what is set up lazily, AdamW's state among it, cannot be set up inside a capture). They would train the
    model: all they change is put back, also when the capture fails, so a graphed job trains an eager job's steps."""
    device = static_idx.device
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {p: {k: v.clone() for k, v in state.items()} for p, state in optimizer.state.items()}
    scaling = scaler.state_dict()  # float16's loss scale and growth count ({} for the disabled scaler)
    random_states = rng_states(generator, device)
    streams = getattr(torch, device.type)  # torch.cuda (torch.cpu's streams do nothing: a failed capture's test)
    try:
        side = streams.Stream(device)
        side.wait_stream(streams.current_stream(device))
        with streams.stream(side):
            for _ in range(3):
                step(static_idx)
        streams.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(generator)
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            step(static_idx)
        return graph
    finally:
        model.load_state_dict(weights)  # in place, as the graph reads these tensors
        with torch.no_grad():
            for p, state in optimizer.state.items():
                for k, v in state.items():
                    if p in moments:
                        v.copy_(moments[p][k])
                    else:  # a new job: AdamW's fresh state is all zeros, its step count too
                        v.zero_()
        scaler.load_state_dict(scaling)  # in place, into the tensors the graph reads
        set_rng_states(random_states, generator, device, seed=None)


# -----------------------------------------------------------------------------------------------------------------
# Files: each written whole or not at all, checkpoints and their recipes, and --out held by one command at a time


def write_atomic(path, write):
    """write(tmp), then rename tmp to path: the file is whole or absent; a full disk is one line to continue from."""
    tmp = os.path.abspath(f"{path}.tmp{os.getpid()}")  # absolute, as pandas reads ~ as $HOME (read_digits_csv)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"{path}: cannot be written ({e.strerror or e}); once it can be, run the same command "
                         "again to continue") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def torch_save(obj, path):
    """torch.save through memory: a full disk then raises OSError, not torch's RuntimeError('unexpected pos')."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def write_csv(path, frame, float_format=None):
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False, float_format=float_format))


def checkpoint_path(out, arch, fold, in_progress=False):
    """checkpoints/<arch>_fold<k>.pt once a job is finished; <arch>_fold<k>.state.pt while it trains."""
    return os.path.join(out, "checkpoints", f"{arch}_fold{fold}{'.state' if in_progress else ''}.pt")


def load_checkpoint(path, device="cpu"):
    """Checkpoints are data, never code: weights_only refuses anything but tensors and plain containers."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model = ARCHITECTURES[state["arch"]]()
        model.load_state_dict(state["model"])
    except Exception as e:  # torch.load raises many kinds on a truncated or foreign file
        raise InputError(f"{path}: not a readable checkpoint ({type(e).__name__}); delete it to retrain it") from None
    return model, state


CHECKPOINT_NAME = rf"({'|'.join(ARCHITECTURES)})_fold\d+(\.state)?\.pt"  # as checkpoint_path names them


def checkpoint_files(out, name=CHECKPOINT_NAME):
    """--out/checkpoints' files whose whole name matches the regular expression, sorted: listed, never globbed, so
    --out x[1] is not x1; and only names this script writes (a user's wide_fold0.backup.pt is not one)."""
    folder = os.path.join(out, "checkpoints")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join(folder, found) for found in names if re.fullmatch(name, found)]


def finished_checkpoints(out):
    """Paths of the finished jobs' checkpoints in --out (in-progress states left out), sorted."""
    return [path for path in checkpoint_files(out) if not path.endswith(".state.pt")]


def own_checkpoints(cfg):
    """The checkpoints and saved states of the jobs this command trains: all that --fresh discards."""
    return [checkpoint_path(cfg.out, *job, state) for job in training_jobs(cfg) for state in (False, True)]


RECIPE_KEYS = ("seed", "folds", "epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "patience", "limit")


def check_inputs(cfg, device):
    """Read and check the data and --out's checkpoints before anything is written. Returns (data, this run's recipe)."""
    if cfg.predict_only:
        adopt_saved_recipe(cfg)
    data = load_data(cfg, device)
    recipe = {**{key: getattr(cfg, key) for key in RECIPE_KEYS}, "data": data.digest}
    check_saved_recipes(cfg, recipe)
    return data, recipe


def check_saved_recipes(cfg, recipe):
    """Refuse to mix checkpoints of another recipe (seed, schedule, folds, data) into this run, those --fresh keeps."""
    own = own_checkpoints(cfg)
    for path in checkpoint_files(cfg.out):
        if cfg.fresh and path in own:
            continue
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("recipe", {})
        except Exception:
            if path.endswith(".state.pt"):
                continue  # train_job reports it and starts that job over
            load_checkpoint(path)  # raises the one-line error naming the file
        changed = [key for key in recipe if saved.get(key) != recipe[key]]
        if changed:
            what = ", ".join(f"{key} {saved.get(key)!r} -> {recipe[key]!r}" for key in changed)
            how = "pass --fresh to retrain it" if path in own else "delete it (not a job this command trains)"
            raise InputError(f"{path}: made with a different recipe ({what}); {how}, or choose another --out")


def adopt_saved_recipe(cfg):
    """--predict-only: take seed, folds and the rest from the finished checkpoints instead of the flags."""
    paths = finished_checkpoints(cfg.out)
    if not paths:
        raise InputError(f"{os.path.join(cfg.out, 'checkpoints')}: no finished checkpoints to predict from; train "
                         f"first, e.g. python digit_recognizer.py --data DIR --out {cfg.out}")
    _, state = load_checkpoint(paths[0])
    for key in RECIPE_KEYS:
        setattr(cfg, key, state["recipe"][key])
    if cfg.archs == Config.archs:  # --archs not given: the architectures there are checkpoints of
        cfg.archs = tuple(arch for arch in ARCHITECTURES if any(os.path.basename(path).startswith(f"{arch}_fold")
                                                                for path in paths))


def claim_out(cfg):
    """Before the command's first write: lock --out for its life (a second command exits 2 before writing; the lock
    dies with the process, SIGKILL included), probe that it can be written, apply --fresh, clear killed writes. A
    refusal leaves no folder it made."""
    folder = os.path.join(cfg.out, "checkpoints")
    outputs = [os.path.join(cfg.out, name) for name in ("submission.csv", "oof.csv", "metrics.json", *PICTURES)]
    if taken := next((path for path in outputs + own_checkpoints(cfg) if os.path.isdir(path)), None):
        raise InputError(f"{taken}: a directory, where this command writes a file")
    made = []
    try:
        for directory in (os.path.join(cfg.out, "demo_data"), folder) if cfg.demo else (folder,):
            path = pathlib.Path(directory).absolute()
            made += [str(new) for new in (path, *path.parents) if not new.exists()]
            os.makedirs(directory, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "a+")
        try:
            import fcntl  # Linux and macOS: on Windows nothing locks --out
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except BlockingIOError:
            lock.seek(0)
            raise InputError(f"{cfg.out}: another command (pid {lock.read().strip()}) is running in this --out; wait "
                             "for it to end, or choose another --out") from None
        for place in (cfg.out, folder):  # a writable checkpoints/ in a read-only --out would fail after training
            open(os.path.join(place, ".write-test"), "w").close()
            os.remove(os.path.join(place, ".write-test"))
    except OSError as e:
        at_fault = e.filename or cfg.out
        if os.path.basename(at_fault) in (".lock", ".write-test"):
            at_fault = os.path.dirname(at_fault)
        for top in [directory for directory in made if os.path.dirname(directory) not in made]:
            shutil.rmtree(top, ignore_errors=True)  # folders this command made, with at most its .lock in them
        raise InputError(f"{at_fault}: output directory cannot be written ({e.strerror or e})") from None
    lock.truncate(0)
    print(os.getpid(), file=lock, flush=True)  # for the message of a command that finds --out taken
    for path in checkpoint_files(cfg.out, CHECKPOINT_NAME + r"\.tmp\d+"):  # killed writes (write_atomic's names)
        os.remove(path)
    if cfg.fresh:
        discarded = [path for path in own_checkpoints(cfg) if os.path.exists(path)]
        if any(not path.endswith(".state.pt") for path in discarded):  # the outputs were made from a model now gone
            discarded += [path for path in outputs if os.path.exists(path)]
        for path in discarded:
            os.remove(path)
        names = ", ".join(os.path.relpath(path, cfg.out) for path in discarded)
        print(f"--fresh: discarded {names or 'nothing: none of its jobs had a checkpoint'}", flush=True)
    return lock


# -----------------------------------------------------------------------------------------------------------------
# Input checks: where the data is, and Kaggle's CSVs read with every cell checked before any training starts


def resolve_data_dir(cfg):
    if cfg.data is not None:
        if not os.path.isdir(cfg.data):
            raise InputError(f"{cfg.data}: {'a file, not a' if os.path.exists(cfg.data) else 'no such'} directory "
                             "(--data is the folder that holds train.csv and test.csv)")
        return cfg.data
    for folder in (os.path.join(KAGGLE_INPUT, name) for name in KAGGLE_COMPETITION):
        if os.path.isdir(folder):
            print(f"data: {folder} (the competition's folder)", flush=True)
            return folder
    # Else the folders four levels down that hold both CSVs: another competition's mount (Kannada-MNIST), a dataset.
    found = sorted(os.path.dirname(path) for depth in range(5) for path in glob.glob(os.path.join(
        glob.escape(KAGGLE_INPUT), *["*"] * depth, "train.csv")) if os.path.isfile(os.path.dirname(path) + "/test.csv"))
    if len(found) == 1:
        print(f"data: {found[0]} (the only folder under {KAGGLE_INPUT} with train.csv and test.csv)", flush=True)
        return found[0]
    how = ("in a cell before this one, write sys.argv[1:] = ['--data', 'DIR'] (or ['--demo'])" if in_notebook()
           else "pass --data DIR (holding them), or try --demo")
    raise InputError(f"no --data given and {len(found)} folders under {KAGGLE_INPUT} hold train.csv and test.csv "
                     f"({', '.join(found)}): choose one: {how}" if found else f"no --data given and no folder under "
                     f"{KAGGLE_INPUT} holds train.csv and test.csv: add the competition's data, or {how}")


SUBMISSION_LABEL = {"ImageId": "Label", "id": "label"}  # test.csv's id column -> the label's: Digit Recognizer, Kannada
PIXEL_NAMES = [[f"pixel{k}" for k in range(first, first + NUM_PIXELS)] for first in (0, 1)]  # Kaggle's, Fashion's


def read_digits_csv(path, role):
    """A Kaggle-layout CSV ('train': label + 784 pixels; 'test': 784 pixels, maybe an id), pixels by name (PIXEL_NAMES)
    or else by position -> (pixels uint8 (N, 784), labels int64 (N,) or None, id column (name, values) or None)."""
    try:  # files that pandas would misread, or name in its own words: say what they are
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise InputError(f"{path}: {'file not found' if isinstance(e, FileNotFoundError) else e.strerror}") from None
    first_line = head.split(b"\n")[0]
    kinds = {"gzip-compressed": head[:2] == b"\x1f\x8b", "zip-compressed": head[:4] == b"PK\x03\x04",
             "UTF-16 (or binary)": b"\x00" in head, "tab-separated": b"\t" in first_line and b"," not in first_line,
             "semicolon-separated": b";" in first_line and b"," not in first_line}
    if kind := next((kind for kind, found in kinds.items() if found), None):
        raise InputError(f"{path}: {kind}; expected a comma-separated UTF-8 CSV, as Kaggle's")
    width = _row_cells(path, -1)[1]  # the header's
    _row_cells(path, 0, width)  # pandas would take a longer first row's extra cells for an index
    try:
        # The whole file at once: in chunks, pandas warns of a column's "mixed types" before our one line. No NA
        # parsing, so that a cell reading NA is named as written; a byte that is not UTF-8 reads as U+FFFD. Absolute
        # paths, as pandas takes a name starting ~ for $HOME's and one like http://x for an address: a path is a path.
        frame = pd.read_csv(os.path.abspath(path), low_memory=False, na_filter=False, encoding_errors="replace")
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, ValueError) as e:
        if longer := re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e)):  # a row past the first
            raise InputError(f"{path}: line {longer[2]}: {longer[3]} cells, where the header has {longer[1]}") from None
        raise InputError(f"{path}: not a readable CSV ({str(e).strip().splitlines()[-1]})") from None
    ends_empty = [] if pd.api.types.is_numeric_dtype(frame.iloc[:, -1]) else np.flatnonzero(frame.iloc[:, -1] == "")
    if len(ends_empty):  # the first row that may be short: pandas reads the cells missing from one as empty
        _row_cells(path, ends_empty[0], width)
    columns = [str(c).strip() for c in frame.columns]
    if not any(char.isalpha() for c in columns for char in c):
        raise InputError(f"{path}: the first line is a row of numbers, not a header; Kaggle's files start with "
                         f"{'label,' if role == 'train' else ''}pixel0,pixel1,...")
    if len(frame) == 0:
        raise InputError(f"{path}: no data rows, only a header")
    if columns[0] == "Unnamed: 0":  # a nameless first column: the index a pandas to_csv wrote
        frame, columns = frame.iloc[:, 1:], columns[1:]
    frame.columns = columns
    labels, ids, pixel_columns = None, None, columns
    named = None  # the pixel columns in pixel order, where the header names them all (Pixel0 is pixel0)
    by_lower_case = {column.lower(): column for column in columns}
    for names in PIXEL_NAMES:
        if set(names) <= by_lower_case.keys():
            named = [by_lower_case[name] for name in names]
            break
    if role == "train":
        if "label" not in columns:
            raise InputError(f"{path}: no 'label' column (expected label followed by {NUM_PIXELS} pixel columns)")
        repeated = [c for c in columns if c.startswith("label.") and c[6:].isdigit()]  # pandas' name for a repeat
        if repeated:
            raise InputError(f"{path}: {1 + len(repeated)} 'label' columns, expected one followed by {NUM_PIXELS} "
                             "pixel columns")
        labels = _integers(path, frame[["label"]], NUM_CLASSES - 1)[:, 0].astype(np.int64)
        pixel_columns = [c for c in columns if c != "label"]
    elif "label" in columns:
        raise InputError(f"{path}: has a 'label' column; test images must be unlabelled "
                         f"(expected {NUM_PIXELS} pixel columns, optionally after an id column)")
    elif len(columns) == NUM_PIXELS + 1:  # the id column: the one that is not a named pixel, else the first
        id_name = next(c for c in columns if c not in named) if named else columns[0]
        if id_name not in SUBMISSION_LABEL or frame[id_name].duplicated().any():  # Kaggle refuses a repeat
            raise InputError(f"{path}: column {columns.index(id_name) + 1} of {len(columns)}, {id_name!r}, is not an "
                             f"id column of Kaggle's ({' or '.join(SUBMISSION_LABEL)}, one id a row)")
        pixel_columns = [c for c in columns if c != id_name]
        ids = (id_name, frame[id_name].to_numpy())
    if len(pixel_columns) != NUM_PIXELS:
        raise InputError(f"{path}: {len(pixel_columns)} pixel columns, expected {NUM_PIXELS} (28x28)")
    return _integers(path, frame[named or pixel_columns], 255).astype(np.uint8), labels, ids


def _row_cells(path, row, width=None):
    """(line number, cells) of data row `row` (from 0; -1 is the header), or (None, 1) past the end: pandas skips blank
    lines, so the line is counted in the file. Kaggle's files quote nothing: a cell is what lies between commas. With
    width, a row of another length is refused: one line with both counts, at any row's size."""
    with open(path, "rb") as f:
        lines = ((number, line) for number, line in enumerate(f, 1) if line.strip())
        number, line = next(itertools.islice(lines, row + 1, None), (None, b""))
    cells = line.count(b",") + 1
    if width is not None and number is not None and cells != width:
        raise InputError(f"{path}: line {number}: {cells} cell{'s' if cells > 1 else ''}, where the header has {width}")
    return number, cells


def _integers(path, frame, high):
    """The frame's values (N, C), or an InputError naming the file's first cell that is not an integer in 0-high."""
    text = frame.select_dtypes(exclude="integer").columns  # where a cell is not a whole number, or is empty
    if len(text) == 0:  # the usual case: pandas read integers everywhere
        values = frame.to_numpy()
        bad = (values < 0) | (values > high)
    else:
        values = frame.assign(**{c: pd.to_numeric(frame[c], errors="coerce") for c in text}).to_numpy(np.float64)
        bad = np.isnan(values) | (values < 0) | (values > high) | (values != np.floor(values))
    if not bad.any():
        return values
    row, col = np.argwhere(bad)[0]
    cell = str(frame.iat[row, col])
    if cell.strip() == "":
        problem = "empty cell"
    elif "\ufffd" in cell:
        problem = "not UTF-8 text"
    elif np.isnan(values[row, col]):
        problem = f"{cell!r} is not a number"
    else:
        problem = f"value {cell.strip()} is not an integer in 0-{high}"
    raise InputError(f"{path}: line {_row_cells(path, row)[0]}, column {frame.columns[col]}: {problem}")


def submission_columns(data_dir, test_ids, n_test):
    """(id column, its values, label column): Kaggle's layout for test.csv's id column, or sample_submission.csv's."""
    id_name, ids = test_ids if test_ids is not None else ("ImageId", np.arange(1, n_test + 1))
    label_name = SUBMISSION_LABEL[id_name]
    sample_path = os.path.join(data_dir, "sample_submission.csv")
    if not os.path.isfile(sample_path):
        return id_name, ids, label_name
    try:
        sample = pd.read_csv(os.path.abspath(sample_path))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError):
        raise InputError(f"{sample_path}: not a readable CSV") from None
    if len(sample.columns) != 2:
        raise InputError(f"{sample_path}: {len(sample.columns)} columns, expected 2 (an id and a label)")
    if len(sample) != n_test:
        raise InputError(f"{sample_path}: {len(sample)} rows, but test.csv has {n_test}")
    return str(sample.columns[0]), ids, str(sample.columns[1])


# -----------------------------------------------------------------------------------------------------------------
# Processes: one per GPU, started by launch() or by torchrun


def processes_for(cfg):
    """--processes, or one per GPU (Kaggle's "T4 x2"), at most one per job; one under torchrun, which started them."""
    if "WORLD_SIZE" in os.environ or cfg.demo:
        return 1
    gpus = torch.cuda.device_count() if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else 1
    return max(1, min(cfg.processes or gpus, len(training_jobs(cfg))))


@contextlib.contextmanager
def importable_copy():
    """This file's text as a module in a folder on sys.path, which the processes import (spawn pickles a function as
    its module's name and its own): the file's text, or in a Jupyter kernel, where __main__ is no file, the cell's,
    which IPython keeps in linecache. None where there is no text (code run by exec, say)."""
    lines = linecache.getlines(train_process.__code__.co_filename)
    if not lines:
        yield None
        return
    name = f"digit_recognizer_{os.getpid()}"  # not a module that the kernel or a test has imported
    with tempfile.TemporaryDirectory() as folder:
        pathlib.Path(folder, f"{name}.py").write_text("".join(lines), encoding="utf-8")
        sys.path.insert(0, folder)
        try:
            yield importlib.import_module(name)
        finally:
            sys.path.remove(folder)
            del sys.modules[name]


def launch(cfg, processes, module):
    """Train in processes that run module.train_process with torchrun's environment: inputs checked once here, one
    line for bad input. torch.multiprocessing stops the others when one fails, and all with SIGINT when this dies."""
    if module is None:
        print(f"{processes} processes wanted, but this code has no text for them to import: one process trains all",
              flush=True)
        run(cfg)
        return 0
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # no "Terminating process" lines
    fields = dataclasses.asdict(cfg)  # a Config of the processes' module: the launcher's may be a kernel's
    if cfg.device != "cpu" and torch.cuda.is_available():  # the card, in a process of its own
        try:
            torch.multiprocessing.start_processes(module.train_process, (fields, 1, None), 1)
        except torch.multiprocessing.ProcessExitedException as e:
            return e.exit_code
    else:
        autocast_dtype(resolve_device(cfg.device), cfg.precision)
    check_inputs(cfg, torch.device("cpu"))  # the data itself is the processes' to hold, not ours
    with socket.socket() as probe:  # a free port for the processes to meet on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with claim_out(cfg):  # the processes are one command: --out is claimed for them, and --fresh done here
        print(f"spreading the jobs over {processes} processes", flush=True)
        args = ({**fields, "fresh": False}, processes, port)
        context = torch.multiprocessing.start_processes(module.train_process, args, processes, join=False)
        try:
            while not context.join():
                pass
        except KeyboardInterrupt:  # Ctrl-C (which reached the processes too) or SIGTERM: each saves its state
            for process in context.processes:
                process.terminate()
            for process in context.processes:
                process.join()
            raise
        except torch.multiprocessing.ProcessExitedException as e:
            if e.exit_code in (130, 143):  # a process was interrupted or terminated, and the others stopped with it
                raise (Terminated if e.exit_code == 143 else KeyboardInterrupt) from None
            if e.exit_code >= 0:  # it said why (exit code 2: its one line)
                return e.exit_code
            print(f"error: process {e.error_index} of {processes} was killed by {signal.Signals(-e.exit_code).name}; "
                  "the others stopped and saved their state: run the same command again to continue", file=sys.stderr)
            return 128 - e.exit_code  # killed by signal k: 128 + k, as shells say
    return 0


def train_process(rank, fields, world, port):
    """Process `rank` of launch()'s, exiting as main() would: run() with torchrun's environment, or with no port, the
    launcher's check of the card and --precision (a CUDA context in the launcher would hold GPU memory all along)."""
    cfg = Config(**fields)
    if port is not None:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if "OMP_NUM_THREADS" not in os.environ:  # the cores, shared among the processes
            torch.set_num_threads(max(1, torch.get_num_threads() // world))
        signal.signal(signal.SIGTERM, _interrupt)
    if port is not None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started with SIGINT ignored (a shell's background job, nohup), which we inherit: yet torch has Linux send
        # SIGINT when the launching process dies. Heed that one, from a dead launcher, and ignore a Ctrl-C as asked.
        launcher = os.getppid()

        def interrupt_once_orphaned(signum, frame):
            if os.getppid() != launcher:  # Linux has given us to another parent
                _interrupt(signum, frame)
        signal.signal(signal.SIGINT, interrupt_once_orphaned)
    try:
        run(cfg, launched=True) if port is not None else autocast_dtype(resolve_device(cfg.device), cfg.precision)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BrokenPipeError:  # `| head` has gone: the launcher exits with this code, as main() would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except KeyboardInterrupt as interrupt:
        sys.exit(143 if isinstance(interrupt, Terminated) else 130)


def start_distributed():
    """(rank, world size, local rank): several processes under torchrun or launch(), one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # gloo on GPUs too: they only meet at barriers (NCCL refuses two on one GPU), with no time-out for long jobs
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), world, local_rank


# -----------------------------------------------------------------------------------------------------------------
# Command line, and a Jupyter kernel's


OPTION_GROUPS = {"data": "data and outputs", "archs": "recipe", "device": "run", "fold": "long runs, several processes",
                 "predict": "predict your own digits"}  # the first field of each group


def in_notebook():  # a Jupyter kernel: sys.argv holds its own arguments, and a SystemExit prints a traceback
    return "ipykernel" in sys.modules


class CellFailed(Exception):
    """A failed command's end in a Jupyter kernel: its cell fails, so "Run All" stops there and Kaggle marks the
    version failed. IPython shows _render_traceback_() in place of a traceback: nothing under the command's line."""

    def _render_traceback_(self):
        return []


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, not argparse's usage block
        raise InputError(message)


CONFLICTS = {("fresh", "predict_only"): "--fresh would discard the checkpoints it needs", ("fresh", "predict"):
             "--fresh would discard the checkpoints it reads", ("predict_only", "predict"): "one or the other",
             ("fold", "predict_only"): "it trains no fold", ("demo", "data"): "--demo makes its own data"}


def without_kernel_arguments(argv, known):
    """A Jupyter kernel's sys.argv[1:] less the kernel's own words: -f kernel.json, --Session.key=... and the like."""
    kept = []
    for before, arg in zip([None, *argv], argv):
        kernels = "-f" in (before, arg) or (arg.startswith("--") and "=" in arg and arg.partition("=")[0] not in known)
        if not kernels:
            kept.append(arg)
    return kept


def parse_args(argv=None):
    """The Config of a command line (by default sys.argv's, less a Jupyter kernel's own arguments inside one): its
    options are Config's fields, with --demo's shorter schedule. Options are exact: no unknown ones, no prefixes."""
    parser = ArgumentParser(description="Kaggle Digit Recognizer: a 10-model CNN ensemble in one file.",
                            allow_abbrev=False)
    known = []
    for field in dataclasses.fields(Config):
        group = parser.add_argument_group(OPTION_GROUPS[field.name]) if field.name in OPTION_GROUPS else group
        options = dict(field.metadata["argparse"])
        flags = options.pop("flags", [f"--{field.name.replace('_', '-')}"])
        known += flags
        if isinstance(field.default, bool):
            options["action"] = "store_false" if field.default else "store_true"
        elif "type" not in options and "nargs" not in options and "choices" not in options:
            options["type"] = str if field.default is None else type(field.default)
            options.setdefault("metavar", "N" if options["type"] is int else None)
        shown = ",".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
        default = "" if shown in (None, False, True, "") else f" (default: {shown}" + (
            f"; {DEMO[field.name]} with --demo)" if field.name in DEMO else ")")
        group.add_argument(*flags, dest=field.name, default=argparse.SUPPRESS, help=field.metadata["help"] + default,
                           **options)
    if argv is None:
        argv = sys.argv[1:]
        if in_notebook():
            argv = without_kernel_arguments(argv, known)
    given, unknown = parser.parse_known_args(argv)
    if unknown:
        near = difflib.get_close_matches(unknown[0].partition("=")[0], known, n=1)
        what = "option" if unknown[0].startswith("-") else "argument"
        raise InputError(f"unknown {what} {unknown[0]!r}" + (f": did you mean {near[0]}?" if near else
                                                              " (python digit_recognizer.py --help lists them)"))
    given = {name: tuple(value) if isinstance(value, list) else value for name, value in vars(given).items()}
    for (first, second), why in CONFLICTS.items():
        if first in given and second in given:
            raise InputError(f"--{first} and --{second} do not go together: {why}".replace("_", "-"))
    cfg = Config(**{**(DEMO if given.get("demo") else {}), **given})
    for field in dataclasses.fields(Config):
        value, valid, name = getattr(cfg, field.name), field.metadata["valid"], f"--{field.name.replace('_', '-')}"
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{name} must be a finite number")
        if valid is not None and value is not None and not valid[1](value):
            raise InputError(f"{name} must be {valid[0]}")
    if not all(0 <= k < cfg.folds for k in cfg.fold):
        raise InputError(f"--fold: folds are numbered 0 to {cfg.folds - 1} (--folds {cfg.folds})")
    return cfg


class Terminated(KeyboardInterrupt):
    """SIGTERM (a killed Kaggle session, a scheduler) stops as cleanly as Ctrl-C, with exit code 143 as shells say."""


def _interrupt(signum, frame):
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def main(argv=None):
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is printed escaped, not a traceback
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        cfg = None
        cfg = parse_args(argv)
        if cfg.predict:
            return predict_files(cfg)
        if (processes := processes_for(cfg)) > 1:
            with importable_copy() as module:
                return launch(cfg, processes, module)
        run(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head` took what it wanted: stop quietly, as a Unix tool does (the state is saved)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the flush at exit raises again
        return 141  # 128 + SIGPIPE, what a shell reports of a tool that SIGPIPE stopped
    except torch.multiprocessing.ProcessRaisedException as e:  # a bug in a process: its traceback, then one line
        trace = e.msg.strip()
        print(trace, file=sys.stderr)
        print(f"error: process {e.error_index} of {processes} failed: {trace.splitlines()[-1]}", file=sys.stderr)
        return 1  # as Python's for an uncaught exception
    except KeyboardInterrupt as interrupt:
        if os.environ.get("RANK", "0") == "0":  # one line for all torchrun's processes
            how = ("without --fresh to continue (with it, its jobs start over)" if cfg is not None and cfg.fresh
                   else "to continue (add --fresh to start over)")
            print(f"interrupted: every job saves its state after each epoch; run the same command again {how}",
                  file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
    return 0


# -----------------------------------------------------------------------------------------------------------------
# Demo data: scikit-learn's 1,797 real 8x8 digits, brought to MNIST's form


def to_mnist_frame(image):
    """A digit (H, W) in [0, 1], light on dark -> (28, 28) as MNIST: the ink fitted to 20x20, centred by its mass."""
    image = torch.as_tensor(image, dtype=torch.float32)
    ink = image > 0.1 * image.max()
    if not ink.any():
        return torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    rows, cols = torch.nonzero(ink.any(1)).flatten(), torch.nonzero(ink.any(0)).flatten()
    crop = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    factor = 20 / max(crop.shape)
    height, width = max(1, round(crop.shape[0] * factor)), max(1, round(crop.shape[1] * factor))
    box = F.interpolate(crop[None, None], size=(height, width), mode="bilinear", align_corners=False,
                        antialias=factor < 1)[0, 0].clamp(0, 1)
    ys, xs = torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32)
    mass = box.sum()
    centre_y, centre_x = (box.sum(1) @ ys) / mass, (box.sum(0) @ xs) / mass
    top = int(min(max(round(IMAGE_SIZE / 2 - 0.5 - centre_y.item()), 0), IMAGE_SIZE - height))
    left = int(min(max(round(IMAGE_SIZE / 2 - 0.5 - centre_x.item()), 0), IMAGE_SIZE - width))
    frame = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    frame[top:top + height, left:left + width] = box
    return frame


def make_demo_data(directory, seed=0, test_fraction=0.2):
    """Write Kaggle-shaped train.csv and test.csv (and the held-out test labels) from scikit-learn's digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    frames = torch.stack([to_mnist_frame(torch.from_numpy(d / 16.0)) for d in digits.images])
    pixels = (frames.view(-1, NUM_PIXELS) * 255).round().to(torch.uint8).numpy()
    train_pixels, test_pixels, train_labels, test_labels = train_test_split(
        pixels, digits.target, test_size=test_fraction, stratify=digits.target, random_state=seed)
    columns = [f"pixel{i}" for i in range(NUM_PIXELS)]
    os.makedirs(directory, exist_ok=True)
    train = pd.DataFrame(train_pixels, columns=columns)
    train.insert(0, "label", train_labels)
    write_csv(os.path.join(directory, "train.csv"), train)
    write_csv(os.path.join(directory, "test.csv"), pd.DataFrame(test_pixels, columns=columns))
    labels = pd.DataFrame({"ImageId": np.arange(1, len(test_labels) + 1), "Label": test_labels})
    write_csv(os.path.join(directory, "test_labels.csv"), labels)
    return labels["Label"].to_numpy()


# -----------------------------------------------------------------------------------------------------------------
# Reading photos: find the digits on a photographed page and frame each one as MNIST was framed (scipy.ndimage)


READ_SIZE = 400  # photos are read with their longer side at this many pixels


def find_digits(photo):
    """A grayscale photo (H, W) in [0, 1] of digits in a row -> [((top, left, bottom, right), (28, 28) frame)]. Paper,
    light and shadow change slowly, ruled lines cross the page; the rest is ink, a digit per group sharing columns."""
    from scipy import ndimage
    smooth = ndimage.gaussian_filter(photo, 1.0)  # sensor noise and JPEG blocks
    wide = max(photo.shape) // 6  # wider than any stroke
    # Paper surrounds the writing, so the picture's edge is mostly ground, and the ink lies far from it: dark ink if
    # the ground is nearer the lightest level than the darkest, as a ratio (light and shadow multiply levels alike).
    band = max(1, min(photo.shape) // 20)
    edge = np.ones(photo.shape, dtype=bool)
    edge[band:-band, band:-band] = False
    darkest, lightest = np.maximum(np.percentile(smooth, [0.5, 99.5]), 1e-3)
    if np.median(smooth[edge]) > np.sqrt(darkest * lightest):
        paper = ndimage.uniform_filter(ndimage.grey_closing(smooth, size=wide), wide // 2)
        ink = 1 - smooth / np.maximum(paper, 0.02)  # the ink's own darkness: light and shadow divide out
    else:  # light ink on a dark ground (a board, a negative, MNIST itself)
        ink = smooth - ndimage.uniform_filter(ndimage.grey_opening(smooth, size=wide), wide // 2)
    # Ruled or squared paper: a line runs straight across much of the page and is thin. A stroke as long (the bar of
    # a 7, the stem of a 1 filling the picture) belongs to a digit that large, and is as thick as its pen: it stays.
    thin = max(2, max(ink.shape) // 50)
    for run, across in (((1, ink.shape[1] // 2), (thin, 1)), ((ink.shape[0] // 2, 1), (1, thin))):
        lines = ndimage.grey_opening(ink, size=run)
        ink = ink - (lines - ndimage.grey_opening(lines, size=across))
    # The paper's level and noise, from the lower quantiles (a close-up digit can cover nearly half the picture).
    p10, p25 = np.percentile(ink, [10, 25])
    noise = p25 + 6.7 * (p25 - p10) / 0.61  # 6 standard deviations above the paper's level, for Gaussian noise
    peak = np.percentile(ink, 99.5)
    if peak < max(0.08, 2 * noise):
        return []
    mask = ndimage.binary_closing(ink > max(0.4 * peak, noise), np.ones((3, 3)))  # rejoin strokes a line cut
    labels, count = ndimage.label(mask)
    if count == 0:  # the closing took it all: ink one or two pixels across (a picture a few pixels thin)
        return []
    areas = ndimage.sum_labels(mask, labels, np.arange(1, count + 1))
    parts = [(box, k + 1) for k, box in enumerate(ndimage.find_objects(labels)) if areas[k] >= 0.1 * areas.max()]
    groups = []  # [rows, columns, labels] (scipy's order), left to right
    for (rows, cols), label in sorted(parts, key=lambda part: part[0][1].start):
        if groups:
            last_rows, last_cols, members = groups[-1]
            overlap = min(cols.stop, last_cols.stop) - max(cols.start, last_cols.start)  # columns in common
            beside = min(rows.stop, last_rows.stop) - max(rows.start, last_rows.start)  # rows in common
            shared_columns = overlap > 0.3 * min(cols.stop - cols.start, last_cols.stop - last_cols.start)
            stacked = beside < 0.2 * min(rows.stop - rows.start, last_rows.stop - last_rows.start) and \
                -overlap < 0.3 * max(rows.stop - rows.start, last_rows.stop - last_rows.start)
            if shared_columns or stacked:  # one digit's parts, e.g. a stroke cut by a ruled line
                groups[-1] = [slice(min(rows.start, last_rows.start), max(rows.stop, last_rows.stop)),
                              slice(min(cols.start, last_cols.start), max(cols.stop, last_cols.stop)),
                              members + [label]]
                continue
        groups.append([rows, cols, [label]])
    tallest = max(rows.stop - rows.start for rows, _, _ in groups)
    digits = []
    for rows, cols, members in groups:
        if rows.stop - rows.start < 0.4 * tallest:  # a dot or a dash beside the digits
            continue
        own = ndimage.binary_dilation(np.isin(labels[rows, cols], members), iterations=2)  # with soft edges
        digit = np.where(own, ink[rows, cols].clip(min=0), 0)
        frame = to_mnist_frame(torch.from_numpy(digit / digit.max()).float())
        digits.append(((rows.start, cols.start, rows.stop, cols.stop), frame))
    return digits


def read_photo(path):
    """An image file -> (H, W) grayscale float32 in [0, 1], upright, its longer side READ_SIZE pixels."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    if not os.path.isfile(path):
        raise InputError(f"{path}: {'a directory, not an image file' if os.path.isdir(path) else 'file not found'}")
    try:
        quiet = warnings.catch_warnings(action="ignore", category=Image.DecompressionBombWarning)  # read to 179 MP
        with quiet, Image.open(path) as picture:
            picture = ImageOps.exif_transpose(picture)  # phones store the rotation apart from the pixels
            deep = picture.mode.startswith("I")  # 16-bit grayscale: "L" would clip every level above 255 to white
            transparent = "A" in picture.getbands() or "transparency" in picture.info
            picture = picture.convert("F" if deep else "RGBA" if transparent else "L")
            scale = READ_SIZE / max(picture.size)
            size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
            picture = picture.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0 if scale < 1 else None)
            photo = np.asarray(picture, dtype=np.float32) / (65535 if deep else 255)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        reason = "not an image file" if isinstance(e, UnidentifiedImageError) else str(e) or type(e).__name__
        raise InputError(f"{path}: cannot read image ({reason})") from None
    if photo.ndim == 3:  # a drawing app's ink on a transparent ground: lay it on a ground it stands out from
        gray, alpha = photo[..., :3] @ np.float32([0.299, 0.587, 0.114]), photo[..., 3]
        ink_is_dark = (gray * alpha).sum() < 0.5 * alpha.sum()
        photo = gray * alpha + float(ink_is_dark) * (1 - alpha)
    return photo


def read_digits(path):
    """An image file -> (photo, [(box, frame)]); a page with no digit on it is an InputError."""
    photo = read_photo(path)
    digits = find_digits(photo)
    if not digits:
        raise InputError(f"{path}: no digit found (a blank page, or ink too faint to tell from the paper)")
    return photo, digits


def number_read(probs):
    """The number that (digits, 10) probabilities read, left to right: '7', '2026'."""
    return "".join(str(d) for d in probs.argmax(1).tolist())


PICTURED_FILES = 24  # predictions.png shows the first files only: a taller picture is slow to draw and to read


def write_predictions_picture(out, readings):
    """predictions.png: per file, the photo with the boxes found, then each 28x28 frame the ensemble classified."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError:
        print("matplotlib is not installed: skipping predictions.png", flush=True)
        return
    shown = readings[:PICTURED_FILES]
    columns = 1 + max(len(digits) for _, _, digits, _ in shown)
    fig = Figure(figsize=(2.2 + 1.3 * (columns - 1), 2.3 * len(shown)), layout="constrained", dpi=100)
    axes = fig.subplots(len(shown), columns, squeeze=False, gridspec_kw={"width_ratios": [2.2] + [1.3] * (columns - 1)})
    for ax in axes.flat:
        ax.axis("off")
    for row, (path, photo, digits, probs) in enumerate(shown):
        axes[row, 0].imshow(photo, cmap="gray", vmin=0, vmax=1)
        for (top, left, bottom, right), _ in digits:
            axes[row, 0].add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                                             edgecolor="red", linewidth=1.5))
        name = os.fsencode(os.path.basename(path)).decode("utf-8", "replace")  # bytes that are not UTF-8 as U+FFFD
        axes[row, 0].set_title(f"{name}: {number_read(probs)}", fontsize=9, parse_math=False)  # no $math$ in names
        for col, ((_, frame), p) in enumerate(zip(digits, probs), start=1):
            axes[row, col].imshow(frame.numpy(), cmap="gray", vmin=0, vmax=1)
            axes[row, col].set_title(f"{p.argmax().item()}  ({p.max().item():.2f})", fontsize=9)
    with warnings.catch_warnings(action="ignore", category=UserWarning):  # a glyph the font lacks: drawn as a box
        write_png(fig, os.path.join(out, "predictions.png"))
    print(f"wrote {os.path.join(out, 'predictions.png')}"
          + (f" (the first {len(shown)} of {len(readings)} files)" if len(shown) < len(readings) else ""), flush=True)


def predict_files(cfg):
    """Print each file's digit or number and probabilities, draw predictions.png; an unreadable file is one line."""
    device, paths = resolve_device(cfg.device), finished_checkpoints(cfg.out)
    if not paths:
        raise InputError(f"{os.path.join(cfg.out, 'checkpoints')}: no checkpoints; train first, e.g. "
                         f"python digit_recognizer.py --data DIR --out {cfg.out}")
    models = [fold_batchnorm(load_checkpoint(path, device)[0].to(device)) for path in paths]
    views, amp_dtype = tta_views(tta=cfg.tta), autocast_dtype(device, cfg.precision)
    readings = []
    for path in cfg.predict:
        try:
            photo, digits = read_digits(path)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        frames = torch.stack([frame for _, frame in digits]).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE).to(device)
        probs = torch.stack([predict_probs(m, frames, views, amp_dtype) for m in models]).mean(0)  # (digits, 10)
        top, sure = probs.topk(3), probs.max(1).values.tolist()
        line = f"{path}: {number_read(probs)} ({' '.join(f'{p:.{3 if len(sure) == 1 else 2}f}' for p in sure)})"
        if cfg.verbose:
            line += "   top 3: " + " | ".join(", ".join(f"{d} {p:.3f}" for d, p in zip(ds, ps))
                                             for ds, ps in zip(top.indices.tolist(), top.values.tolist()))
        print(line, flush=True)
        readings.append((path, photo, digits, probs))
    if readings:
        write_predictions_picture(cfg.out, readings)
    return 2 if len(readings) < len(cfg.predict) else 0


if __name__ == "__main__":
    exit_code = main()
    if exit_code and in_notebook():  # no SystemExit: IPython prints its traceback and a warning under the line
        raise CellFailed(f"exit code {exit_code}")
    if exit_code:
        raise SystemExit(exit_code)
