"""Train a scaled-down GroupMixFormer on CIFAR-10, from scratch, on one GPU, a Mac or a CPU.

    python train_cifar.py                                   # downloads CIFAR-10 to ./data, trains, tests once
    python train_cifar.py --data-dir path/to/cifar10-jpeg   # offline: cifar-10-batches-py/ or train/ + test/ folders
    python train_cifar.py --device cpu --subset 8000 --val-size 1000 --batch-size 128 --epochs 2 \
                          --warmup-epochs 0.5               # a first run on a CPU: about 5 minutes
    python train_cifar.py --seeds 3 --out runs/three        # seeds 0, 1, 2: mean and std of accuracy and time
    python train_cifar.py --set group_sizes=1,1,1,1 --set use_crpe=false   # an ablation of GMA
    python train_cifar.py --resume runs/three               # continue an interrupted run or series
    python train_cifar.py --synthetic --epochs 1            # the whole pipeline, no files needed

The images live on the device as one uint8 tensor and are cropped and flipped (and, if asked,
cutmixed) there in batch: no DataLoader. The recipe: AdamW without decay on biases and norm
scales, linear warm-up then cosine decay per step, label smoothing (so the training loss cannot
fall below about 0.5; validation and test losses are plain cross-entropy), gradient clipping, and
autocast on CUDA (bf16, or fp16 with loss scaling before Ampere). 5,000 training images are held
out for validation. Before each evaluation BatchNorm's statistics are recomputed on training
images. The test set is evaluated once, at the end, on the final weights.

A run writes to --out: config.json, metrics.jsonl, last.pt and best.pt (the weights of the best
validation epoch), final.json, and curves.png if matplotlib is installed; all but the picture are
written atomically. A series (--seeds N) writes OUT/config.json, OUT/seed<k>/ and OUT/summary.json.
A resumed run ends with exactly the metrics of an uninterrupted one (on a GPU, up to its kernels'
non-determinism). Epoch times leave out one untimed warm-up step, made on a GPU or with
--compile; final.json's wall_seconds counts the rest too: loading, warm-up, evaluation.
"""
import argparse
import ast
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

import gmf

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
BATCHNORM_IMAGES = 1024  # training images that set BatchNorm's statistics before each evaluation
SHORT_RUN_STEPS = 100  # fewer optimisation steps than this test the pipeline, not the model
CPU_FIRST_RUN = "--device cpu --subset 8000 --val-size 1000 --batch-size 128 --epochs 2 --warmup-epochs 0.5"


class UserError(Exception):
    """A problem the user can fix (no data, a bad checkpoint, a full disk): one line, exit status 2."""


def first_line(error):
    """An exception's message up to its first line break (torch's can run to a stack of frames)."""
    return str(error).partition("\n")[0]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where the help text says what happens without it."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, []) else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsShown)
    add = p.add_argument
    add("--data-dir", help="cifar-10-batches-py/ or train/ + test/ image folders; without it: ./data "
        "(downloaded), or on --resume the run's own")
    add("--synthetic", action="store_true", help="generated images: tests the pipeline, needs no files")
    add("--subset", type=int, default=0, help="train on N images after a seeded shuffle (0: all)")
    add("--val-size", type=int, default=5000, help="training images held out for validation")
    add("--model", default="groupmixformer_cifar", help=f"one of {gmf.list_models()}")
    add("--attention", default="factorized", choices=gmf.ATTENTION_CORES, help="the attention core")
    add("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    add("--set", action="append", default=[], metavar="FIELD=VALUE",
        help="change a field of gmf.GroupMixFormerConfig (repeatable): --set group_sizes=1,1,1,1")
    add("--epochs", type=int, default=40, help="passes over the training images")
    add("--batch-size", type=int, default=256, help="images per optimisation step")
    add("--lr", type=float, default=2e-3, help="peak learning rate of AdamW")
    add("--weight-decay", type=float, default=0.05, help="of matrices and kernels only")
    add("--warmup-epochs", type=float, default=2.0, help="linear warm-up (at most a quarter of the run)")
    add("--label-smoothing", type=float, default=0.1, help="of the training targets")
    add("--grad-clip", type=float, default=5.0, help="max gradient norm (0: off)")
    add("--cutmix", type=float, default=0.0, help="probability of cutmix per batch")
    add("--device", choices=["auto", "cuda", "mps", "cpu"], help="without it: auto (CUDA, else MPS, else "
        "the CPU), or on --resume the run's own")
    add("--precision", default="auto", choices=["auto", *AUTOCAST_DTYPES],
        help="autocast dtype; auto: bf16 on CUDA from Ampere on, fp16 with loss scaling before, else "
        "fp32 (fp16 on the CPU or MPS has no loss scaling)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--seed", type=int, default=0, help="of the split, the initialisation, the augmentation (and "
        "of --synthetic's images)")
    add("--seeds", type=int, default=1, help="run seeds SEED, SEED+1, ... and report mean and std")
    add("--out", help="output folder; without it: runs/<date-time>")
    add("--resume", metavar="OUT", help="continue the run or series in this folder")
    args = p.parse_args(argv)
    for name, lowest in (("epochs", 1), ("batch_size", 1), ("seeds", 1), ("val_size", 1), ("subset", 0),
                         ("warmup_epochs", 0), ("weight_decay", 0), ("label_smoothing", 0), ("grad_clip", 0)):
        if getattr(args, name) < lowest:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least {lowest}")
    if not args.lr > 0:
        p.error(f"--lr {args.lr} must be positive")
    if not 0 <= args.cutmix <= 1:
        p.error(f"--cutmix {args.cutmix} must lie in [0, 1]")
    return args


SET_BY_FLAGS = {"num_classes": "10, for CIFAR-10", "in_chans": "3, for RGB images",
                "attention": "--attention", "drop_path_rate": "--drop-path"}


def config_overrides(pairs):
    """--set FIELD=VALUE pairs -> {field: value}. A bool field takes true or false, a str field
    the text as typed; any other is read as a Python literal: 4, or 1,3,5,7, or (3,2),(5,3),(7,3)
    (one item alone takes a trailing comma: 7,). gmf.model_config then checks the config's rules."""
    defaults = {f.name: f.default for f in dataclasses.fields(gmf.GroupMixFormerConfig)}
    overrides = {}
    for pair in pairs:
        name, equals, text = (part.strip() for part in pair.partition("="))
        if not equals:
            raise UserError(f"--set {pair}: expected FIELD=VALUE, e.g. --set use_crpe=false")
        if name in SET_BY_FLAGS:
            raise UserError(f"--set {name}: this field is set by the trainer ({SET_BY_FLAGS[name]})")
        if name not in defaults:
            raise UserError(f"--set {name}: GroupMixFormerConfig has no such field; it has "
                            f"{', '.join(sorted(set(defaults) - set(SET_BY_FLAGS)))}")
        if isinstance(defaults[name], str):
            overrides[name] = text
        elif isinstance(defaults[name], bool):
            if text.lower() not in ("true", "false"):
                raise UserError(f"--set {name}={text}: {name} takes true or false")
            overrides[name] = text.lower() == "true"
        else:
            try:
                overrides[name] = ast.literal_eval(text)
            except Exception:  # not a Python literal at all
                raise UserError(f"--set {name}={text}: {name} takes a number, numbers separated by commas "
                                "(1,3,5,7) or pairs ((3,2),(5,3))") from None
    return overrides


# ----------------------------------------------------------------------------------------------
# Data: uint8 images (N, 3, 32, 32) and int64 labels
# ----------------------------------------------------------------------------------------------

def load_data(args):
    """(train_images, train_labels, test_images, test_labels) on the CPU."""
    if args.synthetic:
        return synthetic_cifar(args.seed)
    root = args.data_dir
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")):
        folders = [os.path.join(root, split) for split in ("train", "test")]
        classes = [sorted(d for d in os.listdir(f) if os.path.isdir(os.path.join(f, d))) for f in folders]
        if len(classes[0]) != 10 or classes[0] != classes[1]:
            raise UserError(f"{root}: train/ and test/ must hold the same 10 class folders, not {classes[0]} "
                            f"and {classes[1]}")
        return (*load_image_folder(folders[0], classes[0]), *load_image_folder(folders[1], classes[1]))
    import torchvision

    try:  # torchvision's own CIFAR-10 files (cifar-10-batches-py/), downloaded if need be
        splits = [torchvision.datasets.CIFAR10(root, train=train, download=True) for train in (True, False)]
    except Exception as error:  # not there, no network, a bad checksum: all end the same way
        raise UserError(f"no CIFAR-10 in {root!r} ({type(error).__name__}: {error}). Give --data-dir a "
                        "folder holding cifar-10-batches-py/ or train/<class>/ and test/<class>/ image "
                        "folders, or run --synthetic to try the pipeline without data")
    arrays = []
    for split in splits:  # images (N, 32, 32, 3) -> (N, 3, 32, 32), labels (N,)
        arrays += [torch.from_numpy(split.data).permute(0, 3, 1, 2), torch.tensor(split.targets)]
    return tuple(arrays)


def load_image_folder(folder, classes):
    """Decode <class>/<image> files in threads; labels follow the sorted class names, as in ImageFolder."""
    import numpy as np
    from PIL import Image  # installed with torchvision, which decodes with it too

    files = [(os.path.join(folder, c, name), label) for label, c in enumerate(classes)
             for name in sorted(os.listdir(os.path.join(folder, c)))
             if name.lower().endswith((".jpg", ".jpeg", ".png"))]
    if not files:
        raise UserError(f"no images in {folder}: expected {folder}/<class>/<image>.jpg")

    def decode(path):
        try:
            with Image.open(path) as image:
                pixels = np.array(image.convert("RGB"))  # (H, W, 3) uint8
        except OSError as error:
            raise UserError(f"cannot decode {path}: {error}")
        if pixels.shape != (32, 32, 3):
            raise UserError(f"{path} is {pixels.shape[1]} x {pixels.shape[0]}, not a 32 x 32 CIFAR image")
        return torch.from_numpy(pixels).permute(2, 0, 1)  # (3, 32, 32)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(decode, [path for path, _ in files]))
    return torch.stack(images), torch.tensor([label for _, label in files])


def synthetic_cifar(seed, n_train=10000, n_test=500):
    """Ten classes of noisy images, each class a smooth colour pattern: learnable, and file-free."""
    g = torch.Generator().manual_seed(seed)
    prototypes = F.interpolate(torch.rand(10, 3, 4, 4, generator=g), size=32, mode="bilinear")

    def make(n):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = prototypes[labels] + 0.25 * torch.randn(n, 3, 32, 32, generator=g)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels

    return (*make(n_train), *make(n_test))


def split_train_val(images, labels, args):
    """A seeded shuffle; the first val_size images validate, the next `subset` (or all) train."""
    if args.val_size >= len(images):
        raise UserError(f"--val-size {args.val_size} leaves no training images out of {len(images)}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    val, train = order[:args.val_size], order[args.val_size:]
    train = train[:args.subset] if args.subset else train
    return images[train], labels[train], images[val], labels[val]


# ----------------------------------------------------------------------------------------------
# Augmentation, in batch on the device
# ----------------------------------------------------------------------------------------------

def normalize(images):
    """uint8 images -> float32 with zero mean and unit variance per channel over CIFAR-10."""
    mean, std = channel_statistics(images.device)
    return (images.float() / 255 - mean) / std


@functools.lru_cache
def channel_statistics(device):
    """Made once per device: a copy from the host at every step would wait for the GPU's queue."""
    return tuple(torch.tensor(values, device=device).view(1, 3, 1, 1) for values in (CIFAR_MEAN, CIFAR_STD))


def random_crop_flip(images, generator=None, pad=4):
    """Random 32 x 32 crops of the reflect-padded batch, and a random half mirrored."""
    B, C, H, W = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (B,), device=device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (B,), device=device, generator=generator)
    rows = (dy[:, None] + torch.arange(H, device=device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(B, device=device)[:, None, None, None]
    channels = torch.arange(C, device=device)[None, :, None, None]
    crops = padded[batch, channels, rows, cols]  # (B, C, H, W)
    flip = torch.rand(B, device=device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def cutmix(images, targets):
    """Paste one random box from a shuffled copy of the batch; mix the one-hot targets by area."""
    B, C, H, W = images.shape
    lam, ry, rx = torch.rand(3).tolist()  # on the CPU: the host needs the box's corners to slice
    h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    y, x = int(ry * (H - h + 1)), int(rx * (W - w + 1))
    perm = torch.randperm(B, device=images.device)
    images = images.clone()
    images[:, :, y:y + h, x:x + w] = images[perm, :, y:y + h, x:x + w]
    area = h * w / (H * W)
    return images, (1 - area) * targets + area * targets[perm]


# ----------------------------------------------------------------------------------------------
# Device, precision, random streams, files
# ----------------------------------------------------------------------------------------------

def devices_here():
    return {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}


def pick_device(choice):
    """auto: CUDA, else Apple's MPS, else the CPU. A device asked for by name must be there."""
    available = devices_here()
    if choice in (None, "auto"):
        choice = next(name for name in ("cuda", "mps", "cpu") if available[name])
    elif not available[choice]:
        raise UserError(f"--device {choice} was asked for, but PyTorch sees no {choice.upper()} device "
                        "here (--device auto takes what there is)")
    return torch.device(choice)


def pick_precision(choice, device):
    """bf16 keeps float32's exponent range and needs no loss scaling; CUDA GPUs before Ampere
    (T4, V100, RTX 20xx) emulate it slowly but have fast fp16. Elsewhere: fp32."""
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


def make_scaler(device, precision):
    """fp16 overflows above 65504 and flushes small gradients to zero, so for fp16 on CUDA the loss
    is scaled up before backward and steps whose gradients overflowed are skipped. Otherwise the
    scaler is off and passes everything through."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")


GPU_RANDOM = {"cuda": torch.cuda, "mps": torch.mps}  # the modules that hold a GPU's random stream


def rng_state(device):
    """Every random stream a run draws from: the CPU's, and on CUDA or MPS the GPU's own."""
    gpu = GPU_RANDOM.get(device.type)
    return {"cpu": torch.get_rng_state(), "gpu": gpu.get_rng_state() if gpu else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type in GPU_RANDOM:
        GPU_RANDOM[device.type].set_rng_state(state["gpu"])


def save(path, content):
    """Text, or a torch object, written to a temporary file that is then renamed over `path`: a
    crash or a full disk never leaves half a file, and the previous one stays as it was."""
    tmp = f"{path}.tmp"
    try:
        if isinstance(content, str):
            with open(tmp, "w") as f:
                f.write(content)
        else:
            torch.save(content, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {path}: {first_line(error)}")


CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "history", "wall_seconds"}


def load_checkpoint(path):
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or unsafe content
        raise UserError(f"cannot read {path}: it is damaged or not a checkpoint ({type(error).__name__}); "
                        "delete it to start the run again")
    if not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= checkpoint.keys():
        raise UserError(f"{path} is not a checkpoint of this train_cifar.py: start a new run")
    return checkpoint


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def lr_factor(step, warmup_steps, total_steps):
    """Per optimisation step: a linear warm-up (step s of w runs at (s + 1) / w of the peak),
    then a cosine decay from 1 towards 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def loss_function(logits, targets, label_smoothing):
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate(model, images, labels, autocast, batch_size=1000):
    """(mean loss, accuracy in %) of the model in eval mode."""
    model.eval()
    loss_sum, correct = torch.zeros((), device=images.device), torch.zeros((), device=images.device)
    for i in range(0, len(images), batch_size):
        x, y = normalize(images[i:i + batch_size]), labels[i:i + batch_size]
        with autocast():
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(images), 100.0 * correct.item() / len(images)


@torch.no_grad()
def recalibrate_batchnorm(model, images, autocast, batch_size):
    """Set every BatchNorm's running statistics to the plain average of their per-batch values
    over these (un-augmented) training images, as the current weights see them in eval mode (the
    BatchNorms alone in training mode, so that drop path is off).

    Training keeps an exponential average (momentum 0.1) over the last few dozen steps, made with
    weights that have moved on since; after a few steps it still holds much of its initial mean 0
    and variance 1, and eval mode predicts nonsense: a 7-step run on synthetic data scored 11% on
    validation as trained, and 99.4% after this."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative average over the batches that follow
    model.eval()
    for norm in norms:
        norm.train()
    for i in range(0, len(images), batch_size):
        with autocast():
            model(normalize(images[i:i + batch_size]))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def warm_up_untimed(net, model, images, autocast):
    """One forward and backward pass before the timed epochs, then the gradients dropped and
    BatchNorm's statistics and the random streams put back (no optimizer step is taken), so that the
    run is the same as without it. It takes torch.compile's compilation and, on a GPU, cuDNN's
    choice of algorithms out of epoch 1's time."""
    print("warming up (one untimed training pass) ...", flush=True)
    state, rng = {k: v.clone() for k, v in model.state_dict().items()}, rng_state(images.device)
    model.train()
    with autocast():
        net(normalize(images)).float().sum().backward()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    set_rng_state(rng, images.device)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)  # epoch 1's timer starts on an idle GPU


# The console table: its header, and one row per epoch.
HEADER = (f"{'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'val_loss':>8} {'val_acc':>7} {'lr':>9} "
          f"{'seconds':>8} {'img/s':>8}")
ROW = ("{epoch:>5} {train_loss:>10.4f} {train_acc:>9.2f} {val_loss:>8.4f} {val_acc:>7.2f} {lr:>9.2e} "
       "{epoch_seconds:>8.1f} {images_per_second:>8.0f}")


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def plot_curves(out, history):
    """curves.png: losses and accuracies per epoch, when matplotlib is installed."""
    try:
        from matplotlib.figure import Figure  # not pyplot: no window, no global backend, nothing to close
    except ImportError:
        return
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(9, 3.5))
    for ax, metric, label in zip(fig.subplots(1, 2), ("loss", "acc"), ("loss", "accuracy (%)")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], label="validation")
        ax.set(xlabel="epoch", ylabel=label)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(os.path.join(out, "curves.png"), dpi=80)
    except OSError as error:  # a picture is not worth stopping for: the numbers are in metrics.jsonl
        print(f"warning: curves.png not written ({error})", file=sys.stderr)


class Trainer:
    """One run, in steps a reader can name: set up (or resume from last.pt), train one epoch, end
    the epoch (validate, print, checkpoint), and test once at the end."""

    def __init__(self, args, checkpoint=None):
        self.wall_started = time.perf_counter()
        self.args, self.device = args, torch.device(args.device)
        torch.manual_seed(args.seed)  # the initialisation, drop path and the augmentation
        self.model = gmf.create_model(args.model, num_classes=10, drop_path_rate=args.drop_path,
                                      attention=args.attention, **args.set).to(self.device)
        # What the training steps call; evaluation calls the plain model (its eval-mode graph
        # would be a second compilation, for a small share of the time).
        self.net = torch.compile(self.model) if args.compile else self.model
        images, labels, test_images, test_labels = load_data(args)
        data = (*split_train_val(images, labels, args), test_images, test_labels)
        (self.train_images, self.train_labels, self.val_images, self.val_labels,
         self.test_images, self.test_labels) = (t.to(self.device) for t in data)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # time each convolution's algorithms once, keep the fastest
            # fp32 matmuls and convs (outside autocast, or with --precision fp32) run as TF32 on
            # tensor cores: 10 bits of mantissa, several times faster, plenty for training.
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.optimizer = torch.optim.AdamW(gmf.param_groups(self.model, args.weight_decay), lr=args.lr,
                                           fused=self.device.type == "cuda")  # one kernel for all tensors
        self.steps_per_epoch = max(1, len(self.train_images) // args.batch_size)  # drop the ragged batch
        total_steps = args.epochs * self.steps_per_epoch
        # A warm-up longer than a quarter of the run would leave a short run little time at full rate.
        warmup_steps = max(1, min(int(args.warmup_epochs * self.steps_per_epoch), total_steps // 4))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
        self.scaler = make_scaler(self.device, args.precision)
        self.epoch, self.step, self.history, self.wall_seconds_before = 0, 0, [], 0.0
        if checkpoint:
            try:
                for name in ("model", "optimizer", "scheduler", "scaler"):
                    getattr(self, name).load_state_dict(checkpoint[name])
            except (RuntimeError, ValueError, KeyError) as error:
                raise UserError(f"{args.out}/last.pt does not fit this run's network and settings "
                                f"({first_line(error)}): was it copied from another run?")
            set_rng_state(checkpoint["rng"], self.device)
            self.epoch, self.step = checkpoint["epoch"], checkpoint["step"]
            self.history, self.wall_seconds_before = checkpoint["history"], checkpoint["wall_seconds"]
            print(f"resuming {args.out} after epoch {self.epoch}, with the settings it was started with")

        os.makedirs(args.out, exist_ok=True)  # a series' seed<k>/ folder is made here
        save(os.path.join(args.out, "config.json"), json.dumps(vars(args), indent=2))
        changed = "".join(f", {name}={value}" for name, value in args.set.items())
        print(f"model {args.model}{changed}: {sum(p.numel() for p in self.model.parameters()):,} parameters | "
              f"train {len(self.train_images)}, val {len(self.val_images)}, test {len(self.test_images)} "
              f"images | {args.epochs} epochs of {self.steps_per_epoch} steps, {warmup_steps} of warm-up | "
              f"{device_name(self.device)}, {args.precision}")
        if total_steps < SHORT_RUN_STEPS:
            print(f"note: {total_steps} steps in all test the pipeline but are too few for the accuracy to "
                  "mean much")
        print(HEADER)
        for row in self.history:
            print(ROW.format(**row), flush=True)
        if (args.compile or self.device.type != "cpu") and self.epoch < args.epochs:
            warm_up_untimed(self.net, self.model, self.train_images[:args.batch_size], self.autocast)

    def autocast(self):  # matmuls and convs in bf16 or fp16 (on a GPU, norms and softmax stay in fp32)
        dtype = AUTOCAST_DTYPES[self.args.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def wall_seconds(self):
        """This run's seconds in all its processes, loading included (not the time between an
        interruption and its resume, nor the part of an epoch an interruption threw away)."""
        return self.wall_seconds_before + time.perf_counter() - self.wall_started

    def train_one_epoch(self):
        args = self.args
        self.epoch += 1
        self.model.train()
        started = time.perf_counter()
        loss_sum, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        order = torch.randperm(len(self.train_images), device=self.device)
        for i in range(self.steps_per_epoch):
            index = order[i * args.batch_size:(i + 1) * args.batch_size]
            x, y = random_crop_flip(normalize(self.train_images[index])), self.train_labels[index]
            targets = F.one_hot(y, 10).float()
            if args.cutmix and torch.rand(()).item() < args.cutmix:  # a CPU draw: no waiting on the GPU
                x, targets = cutmix(x, targets)
            with self.autocast():
                logits = self.net(x)
            loss = loss_function(logits, targets, args.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if args.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.scheduler.get_last_lr()[0]  # the rate of this step
            self.scheduler.step()
            self.step += 1
            loss_sum += loss.detach() * len(index)  # summed on the device: no waiting at every step
            correct += (logits.argmax(1) == y).sum()
        seen = min(len(self.train_images), self.steps_per_epoch * args.batch_size)
        train_loss = loss_sum.item() / seen  # .item() waits for the GPU: the epoch's time below is real
        if not math.isfinite(train_loss):
            last = os.path.join(args.out, "last.pt")
            kept = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written"
            raise UserError(f"the training loss became {train_loss} in epoch {self.epoch}; stopped ({kept}). "
                            "Start a new run with a lower --lr")
        seconds = time.perf_counter() - started
        return dict(epoch=self.epoch, step=self.step, train_loss=train_loss,
                    train_acc=100.0 * correct.item() / seen, lr=lr,
                    epoch_seconds=seconds, images_per_second=seen / seconds)

    def end_of_epoch(self, row):
        """Validate, print, then write metrics.jsonl, best.pt and, last, last.pt: whatever an
        interruption leaves behind, resuming from last.pt redoes the epochs after it exactly."""
        args = self.args
        # In batches of the training size: a BatchNorm's statistics are per-batch averages, as in training.
        recalibrate_batchnorm(self.model, self.train_images[:BATCHNORM_IMAGES], self.autocast, args.batch_size)
        row["val_loss"], row["val_acc"] = evaluate(self.model, self.val_images, self.val_labels, self.autocast)
        best_before = max((r["val_acc"] for r in self.history), default=-1.0)
        self.history.append(row)
        print(ROW.format(**row), flush=True)  # at once, in a log file too
        save(os.path.join(args.out, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in self.history))
        if row["val_acc"] > best_before:  # for whoever wants the validation-best weights; the test uses the last
            save(os.path.join(args.out, "best.pt"), {"model": self.model.state_dict(), "epoch": self.epoch,
                                                     "val_acc": row["val_acc"], "settings": vars(args)})
        save(os.path.join(args.out, "last.pt"), {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
            "step": self.step, "rng": rng_state(self.device), "history": self.history,
            "wall_seconds": self.wall_seconds(), "settings": vars(args)})

    def test_once(self):
        """The test set, once, with the final weights: no choice was ever made by looking at it."""
        args = self.args
        test_loss, test_acc = evaluate(self.model, self.test_images, self.test_labels, self.autocast)
        final = dict(test_acc=test_acc, test_loss=test_loss, val_acc=self.history[-1]["val_acc"],
                     epochs=args.epochs, seed=args.seed, wall_seconds=self.wall_seconds(),
                     train_seconds=sum(r["epoch_seconds"] for r in self.history),
                     device=device_name(self.device), precision=args.precision, torch=torch.__version__,
                     model=args.model, parameters=sum(p.numel() for p in self.model.parameters()),
                     command=" ".join(sys.argv))
        save(os.path.join(args.out, "final.json"), json.dumps(final, indent=2))
        plot_curves(args.out, self.history)
        print(f"test accuracy {test_acc:.2f}% (final weights, evaluated once) | training "
              f"{final['train_seconds']:.1f} s, whole run {final['wall_seconds']:.1f} s | in {args.out}")
        return final


# ----------------------------------------------------------------------------------------------
# Runs and series
# ----------------------------------------------------------------------------------------------

def resolve_settings(args):
    """The settings a run goes by. A new run's are checked, and get an --out folder; --resume
    takes those the run (or series) was started with, except where its data now is. Both then
    get a device and a precision. args.set arrives as a list of FIELD=VALUE and leaves as a dict."""
    if args.resume:
        defaults = vars(parse_args([]))
        changed = [k for k, v in vars(args).items()
                   if k not in ("resume", "data_dir", "device") and v != defaults[k]]
        if changed:
            raise UserError(f"--resume continues {args.resume} with the settings it was started with; "
                            f"--{changed[0].replace('_', '-')} cannot change them (start a new run with --out)")
        args = read_settings(args.resume, defaults, data_dir=args.data_dir, device=args.device)
    else:
        args.set = config_overrides(args.set)
        args.out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        if os.path.isdir(args.out) and os.listdir(args.out):
            raise UserError(f"{args.out} is not empty: continue the run in it with --resume {args.out}, "
                            "or choose another --out")
    try:  # an unknown model, or a config GMA cannot be built from, named before any data is read
        config = gmf.model_config(args.model, num_classes=10, attention=args.attention,
                                  drop_path_rate=args.drop_path, **args.set)
    except ValueError as error:
        raise UserError(str(error))
    args.set = {name: getattr(config, name) for name in args.set}  # lists (as typed, or from JSON) as tuples
    if not args.synthetic and args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise UserError(f"the data folder {args.data_dir} does not exist (mistyped, or moved?): --data-dir "
                        "says where the data is; without it a new run downloads CIFAR-10 into ./data")
    args.data_dir = os.path.abspath(args.data_dir or "./data")  # a resumed run finds it from anywhere
    device = pick_device(args.device)
    args.device, args.precision = device.type, pick_precision(args.precision, device)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot make the output folder {args.out}: {error}")
    if device.type == "cpu":
        print(f"warning: training on the CPU, which is slow. A first run that learns in minutes: "
              f"{CPU_FIRST_RUN}", file=sys.stderr)
    return args


def read_settings(out, defaults, data_dir, device):
    """The settings in OUT/config.json, with the data folder and device given on the command line
    (the device must be the run's own: its random streams are that device's). `defaults` are this
    version's settings, by name: a run saved with others was made by another version."""
    path = os.path.join(out, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"no run in {out} (no readable config.json): --resume takes a run's --out folder")
    missing = sorted(set(defaults) - set(saved))
    dropped = sorted(set(saved) - set(defaults))  # options this version does not have
    if missing or dropped:
        raise UserError(f"{out} was made by another version of train_cifar.py ({', '.join(missing + dropped)}) "
                        "and cannot be continued exactly: start a new run")
    elsewhere = device is not None and pick_device(device).type != saved["device"]
    if elsewhere or not devices_here().get(saved["device"]):
        raise UserError(f"{out} was run on {saved['device']} and continues only there (--device "
                        f"{saved['device']}): its random streams are that device's")
    return argparse.Namespace(**{**saved, "data_dir": data_dir or saved["data_dir"], "out": out, "resume": out})


def train(args):
    """One run, continued from its last.pt if it has one; returns what it writes to final.json."""
    final, last = os.path.join(args.out, "final.json"), os.path.join(args.out, "last.pt")
    if os.path.exists(final):
        print(f"{args.out} is a finished run: its results are in {final}")
        with open(final) as f:
            return json.load(f)
    trainer = Trainer(args, load_checkpoint(last) if os.path.exists(last) else None)
    while trainer.epoch < args.epochs:
        trainer.end_of_epoch(trainer.train_one_epoch())
    return trainer.test_once()


def train_series(args):
    """Seeds SEED .. SEED+N-1, each a whole run in OUT/seed<k>; the mean and sample standard
    deviation of their final test accuracies and times go to OUT/summary.json. No seed is left out."""
    save(os.path.join(args.out, "config.json"), json.dumps(vars(args), indent=2))
    finals = []
    for seed in range(args.seed, args.seed + args.seeds):
        out = os.path.join(args.out, f"seed{seed}")
        print(f"--- seed {seed}: {out}")
        finals.append(train(argparse.Namespace(**{**vars(args), "seed": seed, "seeds": 1, "out": out})))
    summary = {"seeds": [f["seed"] for f in finals]}
    for key in ("test_acc", "train_seconds", "wall_seconds"):
        values = [f[key] for f in finals]
        summary[key] = dict(mean=statistics.mean(values), std=statistics.stdev(values), values=values)
    save(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2))
    acc, seconds = summary["test_acc"], summary["train_seconds"]
    print(f"{len(finals)} seeds: test accuracy {acc['mean']:.2f} ± {acc['std']:.2f}% | training "
          f"{seconds['mean']:.1f} ± {seconds['std']:.1f} s (mean ± sample std) | {args.out}/summary.json")
    return summary


def main(argv=None):
    args = parse_args(argv)
    try:
        args = resolve_settings(args)
        if args.seeds > 1:
            train_series(args)
        else:
            train(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(f"error: out of memory on the {args.device} at --batch-size {args.batch_size}: start a new run "
              "(another --out) with a smaller batch, and a lower --lr with it", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        started = args.out and os.path.exists(os.path.join(args.out, "config.json"))
        print("\ninterrupted" + (f": continue with --resume {args.out}" if started else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
