"""train_cifar.py's promises, each one a test, on a tiny network and tiny synthetic data.

1. A run writes its settings, metrics, checkpoints and final results; cutmix trains; a series
   of seeds reports the mean and standard deviation of every seed's final result.
2. Exact resume: an interrupted run continues to exactly the metrics of an uninterrupted one, in
   fp32, bf16 and fp16 (loss scale included), with its data where it was saved, and with the
   config changes (--set) it was started with.
3. Errors a user can fix are one line with exit status 2: no data, image folders that are not
   CIFAR-10's, a bad --set, a damaged checkpoint or one of another network, a run from another
   device, a device that is not there, a folder that holds a run, an output folder that cannot be
   made, a full disk (the old file is kept), a NaN loss (the last good checkpoint is kept), running
   out of GPU memory.
4. The parts: device and precision choice, the learning-rate schedule, augmentation, cutmix,
   BatchNorm's recalibration, the untimed warm-up, the data layouts, and (slow) a compiled run
   that matches the plain one.
"""
import builtins
import copy
import errno
import importlib.util
import json
import math
import os
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gmf
import train_cifar

# One stage of width 40 on a 4 x 4 grid: a GroupMixFormer with every part, small enough that a
# run of 3 steps takes a fraction of a second.
TINY = dict(dims=(40,), depths=(1,), mlp_ratios=(2,), stem_strides=(2, 2), stage_strides=(2,),
            num_classes=10, img_size=32)
TINY_RUN = ["--model", "groupmixformer_tiny", "--synthetic", "--subset", "96", "--val-size", "48",
            "--batch-size", "32", "--epochs", "2", "--warmup-epochs", "1", "--device", "cpu"]
seeds = st.integers(0, 2**32 - 1)


@pytest.fixture(autouse=True)
def tiny_variant(monkeypatch):
    monkeypatch.setitem(gmf.VARIANTS, "groupmixformer_tiny", TINY)
    # 200 test images instead of 500: the test set is evaluated once per run
    synthetic = train_cifar.synthetic_cifar
    monkeypatch.setattr(train_cifar, "synthetic_cifar", lambda seed: synthetic(seed, n_train=1000, n_test=200))


def train(argv, capsys=None):
    """Exit status and, with capsys, what the run printed."""
    status = train_cifar.main(argv)
    return status, (capsys.readouterr() if capsys else None)


def read_json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_second")} for row in rows]


def resume(out, monkeypatch):
    """--resume OUT: its exit status and the epochs this process trained (a run that ignored its
    last.pt and started again would train them all, and on the CPU end with the same metrics)."""
    trained, train_one_epoch = [], train_cifar.Trainer.train_one_epoch

    def recording(self):
        row = train_one_epoch(self)
        trained.append(row["epoch"])
        return row

    monkeypatch.setattr(train_cifar.Trainer, "train_one_epoch", recording)
    status = train_cifar.main(["--resume", out])
    monkeypatch.setattr(train_cifar.Trainer, "train_one_epoch", train_one_epoch)
    return status, trained


def interrupt_after_first_checkpoint(monkeypatch):
    """Make the next run stop as if Ctrl-C came right after epoch 1's last.pt was written."""
    save = train_cifar.save

    def save_then_interrupt(path, content):
        save(path, content)
        if path.endswith("last.pt"):
            monkeypatch.setattr(train_cifar, "save", save)
            raise KeyboardInterrupt

    monkeypatch.setattr(train_cifar, "save", save_then_interrupt)


# ==============================================================================================
# 1. A run and its outputs
# ==============================================================================================

def test_a_run_writes_settings_metrics_checkpoints_and_final_results(tmp_path, monkeypatch, capsys):
    """config.json, one metrics line per epoch, loadable last.pt and best.pt, and final.json;
    BatchNorm's statistics are recomputed on training images before each evaluation."""
    out, recalibrated, recalibrate = str(tmp_path / "run"), [], train_cifar.recalibrate_batchnorm

    def recording(model, images, autocast, batch_size):
        recalibrated.append(len(images))
        recalibrate(model, images, autocast, batch_size)

    monkeypatch.setattr(train_cifar, "recalibrate_batchnorm", recording)
    status, printed = train(TINY_RUN + ["--out", out], capsys)
    assert status == 0, printed.err
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                            "epoch_seconds", "images_per_second"}
    final = read_json(out, "final.json")
    assert 0 <= final["test_acc"] <= 100 and final["epochs"] == 2 and final["parameters"] > 0
    assert {"val_acc", "train_seconds", "wall_seconds", "device", "torch", "command", "seed"} <= set(final)
    settings = read_json(out, "config.json")
    assert settings["subset"] == 96 and settings["device"] == "cpu" and settings["precision"] == "fp32"
    for name in ("last.pt", "best.pt"):
        gmf.create_model("groupmixformer_tiny").load_state_dict(
            torch.load(os.path.join(out, name), weights_only=True)["model"])
    assert "test accuracy" in printed.out and train_cifar.CPU_FIRST_RUN in printed.err
    assert "note: 6 steps in all" in printed.out  # a run this short says it is one
    assert recalibrated == [96, 96]  # all 96 training images (at most BATCHNORM_IMAGES), each epoch


def test_a_run_with_cutmix_trains_and_draws_its_curves_if_it_can(tmp_path, monkeypatch, capsys):
    """--cutmix 1 mixes every batch, and the mixed targets reach the loss; curves.png is drawn when
    matplotlib is installed and skipped quietly when it is not."""
    out, mixed, soft = str(tmp_path / "run"), [], []
    cutmix, loss_function = train_cifar.cutmix, train_cifar.loss_function

    def recording_cutmix(images, targets):
        mixed.append(len(images))
        return cutmix(images, targets)

    def recording_loss(logits, targets, smoothing):
        soft.append(bool(((targets > 0) & (targets < 1)).any()))
        return loss_function(logits, targets, smoothing)

    monkeypatch.setattr(train_cifar, "cutmix", recording_cutmix)
    monkeypatch.setattr(train_cifar, "loss_function", recording_loss)
    status, printed = train(TINY_RUN + ["--out", out, "--epochs", "1", "--cutmix", "1.0"], capsys)
    assert status == 0, printed.err
    assert mixed == [32, 32, 32]  # all 3 batches
    assert len(soft) == 3 and any(soft)  # a box may be empty, or an image pasted onto itself
    curves = os.path.join(out, "curves.png")
    if importlib.util.find_spec("matplotlib"):
        assert os.path.getsize(curves) > 0
        os.remove(curves)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    train_cifar.plot_curves(out, metrics(out))
    assert not os.path.exists(curves) and capsys.readouterr().err == ""


def test_a_series_reports_mean_and_std_of_every_seeds_final_result(tmp_path, monkeypatch, capsys):
    """--seeds 2 runs seeds 0 and 1 into their own folders; the summary is their mean and sample
    std, with nothing selected. An interrupted series continues where it stopped and ends with the
    same summary; each seed's folder is a run that can be continued on its own."""
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    assert train(TINY_RUN + ["--seeds", "2", "--out", straight]) == (0, None)
    summary = read_json(straight, "summary.json")
    finals = [read_json(straight, f"seed{seed}", "final.json") for seed in (0, 1)]
    assert summary["seeds"] == [0, 1] and [f["seed"] for f in finals] == [0, 1]
    accuracies = [f["test_acc"] for f in finals]
    assert summary["test_acc"]["values"] == accuracies
    assert summary["test_acc"]["mean"] == pytest.approx(sum(accuracies) / 2)
    assert summary["test_acc"]["std"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / math.sqrt(2))

    interrupt_after_first_checkpoint(monkeypatch)  # in seed 0, after its first epoch
    assert train(TINY_RUN + ["--seeds", "2", "--out", interrupted])[0] == 130
    assert resume(interrupted, monkeypatch) == (0, [2, 1, 2])  # seed 0's epoch 2, then seed 1
    assert read_json(interrupted, "summary.json")["test_acc"] == summary["test_acc"]

    seed1 = os.path.join(interrupted, "seed1")
    os.remove(os.path.join(seed1, "final.json"))  # as if stopped while testing seed 1
    status, printed = train(["--resume", seed1], capsys)
    assert status == 0 and read_json(seed1, "final.json")["test_acc"] == accuracies[1]


# ==============================================================================================
# 2. Exact resume
# ==============================================================================================

def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_metrics(tmp_path, monkeypatch, capsys):
    """Resuming restores weights, optimizer, schedule, step and every random stream."""
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    assert train(TINY_RUN + ["--out", straight]) == (0, None)
    interrupt_after_first_checkpoint(monkeypatch)
    status, printed = train(TINY_RUN + ["--out", interrupted], capsys)
    assert status == 130 and f"--resume {interrupted}" in printed.err
    assert [r["epoch"] for r in metrics(interrupted)] == [1]
    assert resume(interrupted, monkeypatch) == (0, [2])
    assert without_timing(metrics(interrupted)) == without_timing(metrics(straight))
    finals = [read_json(d, "final.json") for d in (straight, interrupted)]
    assert (finals[0]["test_acc"], finals[0]["test_loss"]) == (finals[1]["test_acc"], finals[1]["test_loss"])
    # The whole run's time counts both processes, so it is never less than its training time.
    epoch_seconds = sum(r["epoch_seconds"] for r in metrics(interrupted))
    assert finals[1]["wall_seconds"] >= finals[1]["train_seconds"] == epoch_seconds

    status, printed = train(["--resume", interrupted], capsys)  # once more: nothing is redone
    assert status == 0 and "finished run" in printed.out
    assert read_json(interrupted, "final.json") == finals[1]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs_and_resumes_exactly_loss_scale_included(precision, tmp_path, monkeypatch):
    """The logits come out in bf16 or fp16 under autocast, and the run resumes exactly. The loss
    scaler (on for fp16 on CUDA) is made here on the CPU too, with a scale that doubles after
    every step, so that only a restored scale gives the same run."""
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    run = TINY_RUN + ["--precision", precision]
    dtypes, loss_function = set(), train_cifar.loss_function

    def recording_dtype(logits, targets, smoothing):
        dtypes.add(logits.dtype)
        return loss_function(logits, targets, smoothing)

    monkeypatch.setattr(train_cifar, "loss_function", recording_dtype)
    if precision == "fp16":
        monkeypatch.setattr(train_cifar, "make_scaler", lambda device, precision: torch.amp.GradScaler(
            "cpu", init_scale=2.0 ** 10, growth_interval=1))
    assert train(run + ["--out", straight]) == (0, None)
    assert dtypes == {train_cifar.AUTOCAST_DTYPES[precision]}
    assert read_json(straight, "final.json")["precision"] == precision
    interrupt_after_first_checkpoint(monkeypatch)
    assert train(run + ["--out", interrupted])[0] == 130
    assert resume(interrupted, monkeypatch) == (0, [2])
    assert without_timing(metrics(interrupted)) == without_timing(metrics(straight))
    scalers = [torch.load(os.path.join(d, "last.pt"), weights_only=True)["scaler"]
               for d in (straight, interrupted)]
    assert scalers[0] == scalers[1]
    if precision == "fp16":
        assert scalers[0]["scale"] == 2.0 ** 16  # 2 ** 10, doubled after each of the 6 steps


def test_config_overrides_build_the_model_are_recorded_and_survive_resume(tmp_path, monkeypatch, capsys):
    """--set changes the config of the network trained; config.json records it, and a resumed run
    (given no --set) rebuilds the same network and ends as an uninterrupted one."""
    overrides = ["--set", "group_sizes=1,1,1,1", "--set", "use_crpe=false", "--set", "use_non_attention_branch=false"]
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    status, printed = train(TINY_RUN + overrides + ["--out", straight], capsys)
    expected = gmf.create_model("groupmixformer_tiny", group_sizes=(1, 1, 1, 1), use_crpe=False,
                                use_non_attention_branch=False)
    assert status == 0 and f"{sum(p.numel() for p in expected.parameters()):,} parameters" in printed.out
    assert read_json(straight, "config.json")["set"] == {"group_sizes": [1, 1, 1, 1], "use_crpe": False,
                                                         "use_non_attention_branch": False}
    interrupt_after_first_checkpoint(monkeypatch)
    assert train(TINY_RUN + overrides + ["--out", interrupted])[0] == 130
    assert resume(interrupted, monkeypatch) == (0, [2])
    weights = torch.load(os.path.join(interrupted, "last.pt"), weights_only=True)["model"]
    assert weights.keys() == expected.state_dict().keys()
    assert without_timing(metrics(interrupted)) == without_timing(metrics(straight))


def test_a_resumed_run_reads_its_data_where_it_was_saved(tmp_path, monkeypatch, capsys):
    """--resume without --data-dir uses the run's own data folder (offline: no download tried)."""
    from PIL import Image

    for split in ("train", "test"):
        for label in range(10):
            os.makedirs(tmp_path / "data" / split / f"class{label}")
            for i in range(4):
                pixels = torch.full((32, 32, 3), 20 * label + i, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "data" / split / f"class{label}" / f"{i}.png")
    run = [a for a in TINY_RUN if a != "--synthetic"] + [
        "--data-dir", str(tmp_path / "data"), "--val-size", "8", "--batch-size", "8", "--subset", "32"]
    out = str(tmp_path / "run")
    interrupt_after_first_checkpoint(monkeypatch)
    assert train(run + ["--out", out])[0] == 130
    import torchvision

    def no_download(*args, **kwargs):
        raise AssertionError("a resumed run looked for CIFAR-10 in ./data")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_download)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no ./data here
    status, printed = train(["--resume", out], capsys)
    assert status == 0, printed.err
    assert [r["epoch"] for r in metrics(out)] == [1, 2]


# ==============================================================================================
# 3. Errors a user can fix
# ==============================================================================================

def one_error_line(printed):
    errors = [line for line in printed.err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in printed.err
    return errors[0]


def test_without_data_the_script_says_what_to_do_in_one_line(tmp_path, monkeypatch, capsys):
    """No data and a download that fails: status 2 and one line naming --data-dir, --synthetic
    and the cause."""
    import torchvision

    def offline(root, train, download):
        raise RuntimeError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    argv = ["--data-dir", str(tmp_path), "--device", "cpu", "--model", "groupmixformer_tiny",
            "--out", str(tmp_path / "o")]
    status, printed = train(argv, capsys)
    line = one_error_line(printed)
    assert status == 2 and "--data-dir" in line and "--synthetic" in line and "network is unreachable" in line


def test_an_unknown_model_is_named_before_any_data_is_read(tmp_path, monkeypatch, capsys):
    """A mistyped --model stops the run at once, not after minutes of loading images."""
    def no_loading(args):
        raise AssertionError("data was read before the model was checked")

    monkeypatch.setattr(train_cifar, "load_data", no_loading)
    argv = ["--model", "groupmixformer_tinny", "--device", "cpu", "--out", str(tmp_path)]
    status, printed = train(argv, capsys)
    assert status == 2 and "groupmixformer_tinny" in one_error_line(printed)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A NaN loss in epoch 2 stops the run in one line; last.pt still holds epoch 1."""
    out, losses, loss_function = str(tmp_path / "run"), [], train_cifar.loss_function

    def nan_in_epoch_2(logits, targets, smoothing):
        losses.append(loss_function(logits, targets, smoothing))
        return losses[-1] * float("nan") if len(losses) > 3 else losses[-1]  # 3 steps per epoch

    monkeypatch.setattr(train_cifar, "loss_function", nan_in_epoch_2)
    status, printed = train(TINY_RUN + ["--out", out], capsys)
    assert status == 2 and "nan" in one_error_line(printed) and "last.pt" in printed.err
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["epoch"] == 1


def test_bad_checkpoints_and_folders_are_named_in_one_line(tmp_path, monkeypatch, capsys):
    """A folder with no run, a mistyped data folder, a new run asked to write over an existing
    one, a run made on another device, a damaged checkpoint: status 2, one line naming the path
    and what to do."""
    status, printed = train(["--resume", str(tmp_path / "nowhere")], capsys)
    assert status == 2 and "nowhere" in one_error_line(printed)
    typo = tmp_path / "cifar1O"
    status, printed = train(["--data-dir", str(typo), "--out", str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert status == 2 and str(typo) in one_error_line(printed) and not typo.exists()

    out = str(tmp_path / "run")
    interrupt_after_first_checkpoint(monkeypatch)
    assert train(TINY_RUN + ["--out", out])[0] == 130
    status, printed = train(TINY_RUN + ["--out", out], capsys)  # would overwrite the run
    assert status == 2 and f"--resume {out}" in one_error_line(printed)
    config = read_json(out, "config.json")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**config, "device": "cuda"}, f)  # its random streams would be a GPU's
    status, printed = train(["--resume", out, "--device", "cpu"], capsys)
    assert status == 2 and "was run on cuda" in one_error_line(printed) and "--device cuda" in printed.err
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(out, "last.pt"), "r+b") as f:
        f.truncate(100)  # as a crash during a plain write would have left it
    status, printed = train(["--resume", out], capsys)
    assert status == 2 and os.path.join(out, "last.pt") in one_error_line(printed) and "damaged" in printed.err


def test_a_foreign_checkpoint_a_file_as_out_and_running_out_of_memory_are_one_line_errors(
        tmp_path, monkeypatch, capsys):
    """A last.pt copied from a run of another network or replaced by a best.pt, an --out inside a
    file, a missing GPU on resume, and running out of GPU memory: status 2, one line that says what
    to do."""
    ours, other = str(tmp_path / "ours"), str(tmp_path / "other")
    interrupt_after_first_checkpoint(monkeypatch)
    assert train(TINY_RUN + ["--out", ours])[0] == 130
    assert train(TINY_RUN + ["--epochs", "1", "--set", "group_sizes=1,1,1,1", "--out", other]) == (0, None)
    os.replace(os.path.join(other, "last.pt"), os.path.join(ours, "last.pt"))
    status, printed = train(["--resume", ours], capsys)
    assert status == 2 and "copied from another run" in one_error_line(printed)
    os.replace(os.path.join(other, "best.pt"), os.path.join(ours, "last.pt"))  # weights, no optimizer
    status, printed = train(["--resume", ours], capsys)
    assert status == 2 and "not a checkpoint of this train_cifar.py" in one_error_line(printed)

    (tmp_path / "a_file").write_text("")
    status, printed = train(TINY_RUN + ["--out", str(tmp_path / "a_file" / "run")], capsys)
    assert status == 2 and "cannot make the output folder" in one_error_line(printed)

    config = read_json(ours, "config.json")
    with open(os.path.join(ours, "config.json"), "w") as f:
        json.dump({**config, "device": "cuda"}, f)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, printed = train(["--resume", ours], capsys)  # no --device: the run's own, which is not here
    assert status == 2 and "was run on cuda" in one_error_line(printed)

    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_cifar.Trainer, "train_one_epoch", out_of_memory)
    status, printed = train(TINY_RUN + ["--out", str(tmp_path / "big")], capsys)
    assert status == 2 and "--batch-size 32" in one_error_line(printed)


def test_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    """If a write fails, the error is one line and the old file is left intact, with no debris:
    for a checkpoint (torch.save reports a full disk as a RuntimeError) and for text."""
    checkpoint, text = str(tmp_path / "last.pt"), str(tmp_path / "metrics.jsonl")
    train_cifar.save(checkpoint, {"epoch": 1})
    train_cifar.save(text, "epoch 1\n")

    # Both fakes write the start of the file they are given, then fail, as a disk that fills up
    # mid-write does: a save that wrote in place, or left its temporary file, is caught below.
    def torch_save_on_a_full_disk(obj, path):
        with builtins.open(path, "wb") as f:
            f.write(b"PK\x03\x04")  # the first bytes of torch's zip format
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\nframes...")

    class FullDisk:
        def __init__(self, path, mode="r"):
            self.file = builtins.open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()
            return False

        def write(self, text):
            self.file.write(text[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    with pytest.raises(train_cifar.UserError, match="cannot write .*last.pt: .*unexpected pos 64 vs 0$"):
        train_cifar.save(checkpoint, {"epoch": 2})
    monkeypatch.setattr(train_cifar, "open", FullDisk, raising=False)  # the module's open() only
    with pytest.raises(train_cifar.UserError, match="cannot write .*metrics.jsonl: .*No space left"):
        train_cifar.save(text, "epoch 2\n")
    monkeypatch.undo()
    assert torch.load(checkpoint, weights_only=True) == {"epoch": 1}
    assert open(text).read() == "epoch 1\n" and sorted(os.listdir(tmp_path)) == ["last.pt", "metrics.jsonl"]


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--batch-size", "-1"), ("--lr", "0"),
                                         ("--val-size", "0"), ("--cutmix", "2"), ("--seeds", "0")])
def test_impossible_options_are_refused_before_anything_runs(flag, value, capsys):
    """Options that cannot describe a run stop the script with status 2, naming the option."""
    with pytest.raises(SystemExit) as stop:
        train_cifar.parse_args([flag, value])
    assert stop.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("pair, named, expected", [
    ("use_crpe=maybe", "use_crpe", "true or false"),
    ("num_heads=true", "num_heads", "takes a number"),
    ("dims={[1]:2}", "dims", "takes a number"),
    ("group_sizes=7", "group_sizes=7", "sequence of numbers"),
    ("crpe_windows=3,2", "crpe_windows", "(kernel, heads) pairs"),
    ("dims=41,", "41", "equal segments"),
    ("num_heads=4.5", "num_heads=4.5", "integer"),
    ("crpe_windows=(3.0,2),(5,3),(7,3)", "crpe_windows", "odd positive kernels"),
    ("depth=3", "depth", "no such field"),
    ("num_classes=5", "num_classes", "set by the trainer"),
    ("use_crpe", "use_crpe", "FIELD=VALUE"),
])
def test_a_bad_set_is_one_line_naming_the_field_and_what_it_takes(pair, named, expected, tmp_path, monkeypatch,
                                                                  capsys):
    """A value the field cannot take, or one that breaks a rule of the config (whole numbers,
    odd windows, widths that split), is refused before any data is read."""
    monkeypatch.setattr(train_cifar, "load_data", lambda args: pytest.fail("data read"))
    status, printed = train(TINY_RUN + ["--set", pair, "--out", str(tmp_path / "r")], capsys)
    line = one_error_line(printed)
    assert status == 2 and named in line and expected in line and not (tmp_path / "r").exists()


@pytest.mark.parametrize("pair, expected", [
    (" use_crpe = FALSE", {"use_crpe": False}),
    ("group_sizes=1,3,5", {"group_sizes": (1, 3, 5)}),
    ("group_sizes=7,", {"group_sizes": (7,)}),
    ("dims=[40, 80]", {"dims": [40, 80]}),  # the config keeps it as a tuple
    ("crpe_windows=(3,2),(5,3),(7,3)", {"crpe_windows": ((3, 2), (5, 3), (7, 3))}),
    ("mlp_ratios=2.5,4", {"mlp_ratios": (2.5, 4)}),
    ("num_heads=4", {"num_heads": 4}),
    ("padding_mode=circular", {"padding_mode": "circular"}),
])
def test_set_values_are_read_by_the_type_of_their_field(pair, expected):
    assert train_cifar.config_overrides([pair]) == expected


def test_a_resumed_series_keeps_its_config_changes(tmp_path):
    out = str(tmp_path / "series")
    argv = TINY_RUN + ["--epochs", "1", "--seeds", "2", "--set", "group_sizes=1,1,1,1", "--out", out]
    assert train(argv) == (0, None)
    resumed = train_cifar.resolve_settings(train_cifar.parse_args(["--resume", out]))
    assert resumed.set == {"group_sizes": (1, 1, 1, 1)}  # tuples again, though config.json holds lists


def test_a_resumed_run_keeps_its_settings_and_refuses_others(tmp_path, capsys):
    """--resume takes only where the data is and the (same) device; --set, --epochs or any other
    setting would make the run another one, and are refused; so is a run made by a version of
    this script with other settings."""
    out = str(tmp_path / "r")
    assert train(TINY_RUN + ["--epochs", "1", "--out", out]) == (0, None)
    for change in (["--set", "use_crpe=false"], ["--epochs", "80"]):
        status, printed = train(["--resume", out] + change, capsys)
        assert status == 2 and change[0] in one_error_line(printed)
    status, printed = train(["--resume", out, "--device", "auto"], capsys)  # auto is the CPU here
    assert status == 0 and "finished run" in printed.out
    config = read_json(out, "config.json")
    # One lacks an option this version has; the other has one this version lacks, even left off.
    for older in ({k: v for k, v in config.items() if k != "set"}, {**config, "tta": False}):
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(older, f)
        status, printed = train(["--resume", out], capsys)
        assert status == 2 and "another version" in one_error_line(printed)


def test_an_interruption_before_the_run_has_begun_does_not_point_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted_while_loading(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cifar, "load_data", interrupted_while_loading)
    status, printed = train(TINY_RUN + ["--out", str(tmp_path / "r")], capsys)
    assert status == 130 and "interrupted" in printed.err and "--resume" not in printed.err


# ==============================================================================================
# 4. The parts
# ==============================================================================================

@pytest.mark.parametrize("cuda, mps, choice, expected", [
    (True, True, "auto", "cuda"), (False, True, "auto", "mps"), (False, False, "auto", "cpu"),
    (True, True, "cpu", "cpu"), (False, True, "mps", "mps"), (False, False, "cuda", None),
    (True, False, "mps", None)])
def test_auto_device_is_cuda_then_mps_then_cpu_and_a_missing_one_is_refused(cuda, mps, choice, expected,
                                                                            monkeypatch):
    """--device auto takes CUDA, else Apple's MPS, else the CPU; a device named but absent is an error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    if expected is None:
        with pytest.raises(train_cifar.UserError, match=f"--device {choice}"):
            train_cifar.pick_device(choice)
    else:
        assert train_cifar.pick_device(choice).type == expected


@pytest.mark.parametrize("device, capability, expected", [
    ("cuda", (9, 0), "bf16"), ("cuda", (8, 0), "bf16"), ("cuda", (7, 5), "fp16"), ("mps", None, "fp32"),
    ("cpu", None, "fp32")])
def test_auto_precision_is_bf16_from_ampere_fp16_before_and_fp32_off_cuda(device, capability, expected,
                                                                         monkeypatch):
    """Native bf16 arrived with Ampere (compute capability 8.0); older GPUs get fp16 with loss
    scaling, and the scaler is on only there; MPS and the CPU train in fp32 unless asked."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")  # for GradScaler("cuda")
    precision = train_cifar.pick_precision("auto", torch.device(device))
    assert precision == expected and train_cifar.pick_precision("bf16", torch.device(device)) == "bf16"
    assert train_cifar.make_scaler(torch.device(device), precision).is_enabled() == (precision == "fp16")


def test_a_gpus_random_stream_is_saved_and_restored_with_the_cpus(monkeypatch):
    """On CUDA or MPS the checkpoint holds the GPU's own stream beside the CPU's (here a stand-in
    module plays the GPU)."""
    class StandIn:
        stream = torch.tensor([7], dtype=torch.uint8)

        def get_rng_state(self):
            return self.stream.clone()

        def set_rng_state(self, state):
            self.stream = state.clone()

    gpu = StandIn()
    monkeypatch.setitem(train_cifar.GPU_RANDOM, "cuda", gpu)
    state = train_cifar.rng_state(torch.device("cuda"))
    cpu_draw = torch.rand(3)
    gpu.stream = torch.tensor([8], dtype=torch.uint8)
    train_cifar.set_rng_state(state, torch.device("cuda"))
    assert torch.equal(torch.rand(3), cpu_draw) and gpu.stream.item() == 7
    assert train_cifar.rng_state(torch.device("cpu"))["gpu"] is None


def test_training_metrics_count_the_images_seen_even_when_fewer_than_a_batch(tmp_path, monkeypatch):
    """With 20 training images and batches of 32, an epoch is one step of 20 images: the speed is
    20 images over the epoch's time, and a loss of exactly 1 per image averages to exactly 1."""
    def one_per_image(logits, targets, smoothing):
        return logits.sum() * 0 + 1.0

    monkeypatch.setattr(train_cifar, "loss_function", one_per_image)
    out = str(tmp_path / "r")
    assert train(TINY_RUN + ["--subset", "20", "--epochs", "1", "--out", out]) == (0, None)
    (row,) = metrics(out)
    assert row["step"] == 1 and row["train_loss"] == 1.0 and 0 <= row["train_acc"] <= 100
    assert row["images_per_second"] * row["epoch_seconds"] == pytest.approx(20)


def test_learning_rate_warms_up_then_decays_to_zero():
    """The schedule rises linearly over the warm-up and follows a cosine down to zero."""
    factors = [train_cifar.lr_factor(step, 10, 110) for step in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.5) and factors[-1] < 1e-3
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


@given(seed=seeds)
def test_augmentation_crops_are_shifted_windows_of_the_padded_image(seed):
    """Each augmented image is a 32 x 32 window of its reflect-padded original, maybe mirrored."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator)
    crops = train_cifar.random_crop_flip(images, generator)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4), mode="reflect")
    for image, crop in zip(padded, crops):
        windows = [image[:, y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
        assert any(torch.equal(crop, w) or torch.equal(crop, w.flip(2)) for w in windows)


@given(seed=seeds)
def test_cutmix_pastes_one_box_from_another_image_and_mixes_the_targets_by_its_area(seed):
    """Each image gets a box (the same for all) from an image of the batch, maybe itself, and the
    donor's class gets the box's share of the target."""
    torch.manual_seed(seed)  # the box and the shuffle come from the global stream
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(5, 3, 8, 8, generator=generator)
    mixed, targets = train_cifar.cutmix(images, torch.eye(5))  # sample i is class i
    torch.testing.assert_close(targets.sum(1), torch.ones(5))
    pasted = (mixed != images).any(1)  # (5, 8, 8): pixels that now come from another image
    boxes = set()
    for i in range(5):
        donors = [j for j in range(5) if j != i and targets[i, j] > 0]
        if not donors:  # its own image drawn, or an empty box
            assert torch.equal(mixed[i], images[i])
            continue
        (j,) = donors
        rows, cols = pasted[i].nonzero().unbind(1)
        box = (slice(rows.min().item(), rows.max().item() + 1), slice(cols.min().item(), cols.max().item() + 1))
        assert pasted[i].sum() == pasted[i][box].numel()  # one filled rectangle
        assert torch.equal(mixed[i][:, box[0], box[1]], images[j][:, box[0], box[1]])
        assert targets[i, j].item() == pytest.approx(pasted[i].sum().item() / 64)
        boxes.add((box[0].start, box[0].stop, box[1].start, box[1].stop))
    assert len(boxes) <= 1


def test_batchnorm_statistics_are_recomputed_as_the_plain_average_over_training_images():
    """After recalibration every BatchNorm holds the plain average, over the batches of the given
    images, of each batch's mean and (unbiased) variance of its input, with the network as
    evaluation sees it (drop path off: the second block's rate is 0.5); the momenta are as before,
    and the weights untouched."""
    model = gmf.create_model("groupmixformer_tiny", depths=(2,), drop_path_rate=0.5)
    images = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))

    def statistics_of(batch):
        reference = copy.deepcopy(model).eval()
        for norm in reference.modules():
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.train().reset_running_stats()  # the BatchNorms alone in training mode
                norm.momentum = 1.0  # keep exactly what this batch shows
        with torch.no_grad():
            reference(train_cifar.normalize(batch))
        return {k: v for k, v in reference.state_dict().items() if k.endswith(("running_mean", "running_var"))}

    first, second = statistics_of(images[:64]), statistics_of(images[64:])
    expected = {k: (first[k] + second[k]) / 2 for k in first}
    with torch.no_grad():  # statistics from other images, as training would have left them
        model.train()(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    weights = {k: v.clone() for k, v in model.named_parameters()}
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    train_cifar.recalibrate_batchnorm(model, images, no_autocast, batch_size=64)
    got = {k: v for k, v in model.state_dict().items() if k in expected}
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(torch.equal(weights[k], v) for k, v in model.named_parameters())


def test_a_short_runs_warm_up_is_at_most_a_quarter_of_it(tmp_path):
    """A 2-epoch warm-up in a run of 2 epochs of 3 steps would reach the peak rate only at the
    run's last step: it is cut to a quarter of the run (1 step), and long runs keep theirs."""
    for epochs, warmup_steps in (("2", 1), ("20", 6)):
        args = train_cifar.resolve_settings(train_cifar.parse_args(
            TINY_RUN + ["--epochs", epochs, "--warmup-epochs", "2", "--out", str(tmp_path / epochs)]))
        schedule = train_cifar.Trainer(args).scheduler.lr_lambdas[0]
        assert schedule(warmup_steps - 1) == 1.0 and schedule(warmup_steps - 2) < 1.0


def test_the_untimed_warm_up_leaves_weights_statistics_and_rng_as_they_were():
    """The warm-up pass (on a GPU, or for --compile) must not change the run: not the weights,
    not BatchNorm's statistics, not the random stream that drop path (second block: 0.5) draws from."""
    model = gmf.create_model("groupmixformer_tiny", depths=(2,), drop_path_rate=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    rng = torch.get_rng_state()
    train_cifar.warm_up_untimed(model, model, images, lambda: torch.autocast("cpu", enabled=False))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())


def test_an_image_folder_tree_loads_with_sorted_class_names_as_labels(tmp_path, capsys):
    """--data-dir reads train/<class>/ and test/<class>/ images; labels follow sorted class names.
    Ten classes, the same in both: anything else is refused in one line, naming the folders."""
    from PIL import Image

    names = ["truck", "airplane", "cat", "bird", "deer", "dog", "frog", "horse", "ship", "automobile"]
    for split in ("train", "test"):
        for name in names:
            os.makedirs(tmp_path / split / name)
            pixels = torch.full((32, 32, 3), names.index(name), dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / split / name / "0.png")
    images, labels, test_images, test_labels = train_cifar.load_data(
        train_cifar.parse_args(["--data-dir", str(tmp_path)]))
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8
    assert [names[image.max()] for image in images] == sorted(names)  # sorted: airplane = 0, truck = 9
    assert labels.tolist() == list(range(10)) and test_labels.tolist() == list(range(10))

    os.rename(tmp_path / "test" / "truck", tmp_path / "test" / "lorry")
    status, printed = train(["--data-dir", str(tmp_path), "--device", "cpu", "--model", "groupmixformer_tiny",
                             "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and "lorry" in one_error_line(printed) and "10 class folders" in printed.err


@pytest.mark.slow
def test_a_compiled_run_trains_the_same_network_and_compiles_only_before_the_timed_epochs(
        tmp_path, monkeypatch):
    """--compile trains what the plain model trains (to rounding: the compiler may reorder sums;
    no drop path, whose random masks the compiler may draw differently). Its graphs are compiled
    before epoch 1 begins, in the untimed warm-up, and none is compiled during the timed epochs
    (a recompilation would raise)."""
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    plain, compiled = str(tmp_path / "plain"), str(tmp_path / "compiled")
    run = TINY_RUN + ["--drop-path", "0"]
    assert train(run + ["--out", plain]) == (0, None)
    graphs, train_one_epoch = [], train_cifar.Trainer.train_one_epoch
    counters = torch._dynamo.utils.counters

    def counting(self):  # the graphs compiled so far, as each timed epoch begins and ends
        graphs.append(counters["stats"]["unique_graphs"])
        row = train_one_epoch(self)
        graphs.append(counters["stats"]["unique_graphs"])
        return row

    counters.clear()
    monkeypatch.setattr(train_cifar.Trainer, "train_one_epoch", counting)
    assert train(run + ["--out", compiled, "--compile"]) == (0, None)
    assert graphs[0] > 0 and len(set(graphs)) == 1, graphs
    for expected, got in zip(metrics(plain), metrics(compiled), strict=True):
        for name in ("train_loss", "val_loss"):
            assert got[name] == pytest.approx(expected[name], rel=1e-3), name
