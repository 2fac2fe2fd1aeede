"""Train a scaled-down GroupMixFormer on CIFAR-10, from scratch, on one GPU, a Mac or a CPU.

    python train_cifar.py                                   # downloads CIFAR-10 to ./data, trains, tests once
    python train_cifar.py --data-dir path/to/cifar10-jpeg   # offline: an ImageFolder tree (train/, test/)
    python train_cifar.py --seeds 3                         # seeds 0, 1, 2: mean and std of accuracy and time
    python train_cifar.py --device cpu --subset 8000 --val-size 1000 --batch-size 128 --epochs 2 \
                          --warmup-epochs 0.5               # a first run on a CPU: about 5 minutes
    python train_cifar.py --epochs 100 --cutmix 0.5 --drop-path 0.2 --tta   # longer, more regularised
    python train_cifar.py --synthetic --epochs 1            # the whole pipeline, no files needed
    python train_cifar.py --set group_sizes=1,1,1,1 --set use_crpe=false   # an ablation of GMA
    python train_cifar.py --resume runs/mine                # continue an interrupted run (or series)

The dataset lives on the device as one uint8 tensor; cropping, flipping (and, if asked, cutmix)
run there in batch, so no DataLoader is involved. Recipe: AdamW without decay on biases and norm
scales, linear warm-up then cosine decay per step, label smoothing, gradient clipping, and
autocast on CUDA GPUs (bf16, or fp16 with loss scaling before Ampere; --precision chooses).
5,000 training images are held out for validation: they pick best.pt and are printed every
epoch. Before each evaluation, BatchNorm's statistics are recomputed on 1,024 training images.
The test set is evaluated once, at the end, on the final weights.

Every run writes to --out (default runs/<timestamp>): config.json, metrics.jsonl (one line per
epoch), last.pt and best.pt (written atomically), final.json, and curves.png when matplotlib is
installed. A series (--seeds N) puts each run in OUT/seed<k>/ and the mean and std in
OUT/summary.json. A resumed run ends with exactly the metrics of an uninterrupted one on the CPU
(on a GPU, up to the non-determinism of its kernels). Epoch times leave out one untimed warm-up
step, made on a GPU or with --compile, that compiles and picks convolution algorithms;
final.json's wall_seconds counts everything, loading included.
"""
import argparse
import ast
import copy
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
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
SHORT_RUN_STEPS = 100  # fewer optimisation steps than this test the pipeline, not the model
BATCHNORM_IMAGES = 1024  # training images that set BatchNorm's statistics before each evaluation
CPU_FIRST_RUN = "--device cpu --subset 8000 --val-size 1000 --batch-size 128 --epochs 2 --warmup-epochs 0.5"


class UserError(Exception):
    """A problem the user can fix (missing data, bad checkpoint, full disk): one line, exit 2."""


class Diverged(Exception):
    """The loss became NaN or infinite."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    # data
    add("--data-dir", default=None, help="torchvision's CIFAR-10 folder (cifar-10-batches-py/) or an "
        "ImageFolder tree (train/, test/); default ./data, or on --resume the run's own")
    add("--no-download", action="store_true", help="never download CIFAR-10")
    add("--synthetic", action="store_true", help="generated images: tests the pipeline, no files")
    add("--subset", type=int, default=0, help="use N training images after a seeded shuffle (0: all)")
    add("--val-size", type=int, default=5000, help="training images held out for validation")
    # model
    add("--model", default="groupmixformer_cifar", help=f"one of {gmf.list_models()}")
    add("--attention", default="factorized", choices=gmf.ATTENTION_CORES)
    add("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    add("--set", action="append", default=[], metavar="FIELD=VALUE",
        help="change a field of gmf.GroupMixFormerConfig (repeatable), e.g. --set group_sizes=1,1,1,1 "
             "--set use_crpe=false --set 'crpe_windows=(3,2),(5,3),(7,3)'")
    # recipe
    add("--epochs", type=int, default=40, help="passes over the training images")
    add("--batch-size", type=int, default=256, help="images per optimisation step")
    add("--lr", type=float, default=2e-3, help="peak learning rate of AdamW")
    add("--weight-decay", type=float, default=0.05, help="AdamW weight decay of matrices and kernels")
    add("--warmup-epochs", type=float, default=2.0, help="linear warm-up of the learning rate")
    add("--label-smoothing", type=float, default=0.1, help="label smoothing of the targets")
    add("--grad-clip", type=float, default=5.0, help="max gradient norm (0: off)")
    add("--cutmix", type=float, default=0.0, help="probability of cutmix per batch")
    add("--ema", type=float, default=0.0, help="EMA decay of the weights used for eval (0: off)")
    add("--tta", action=argparse.BooleanOptionalAction, default=False,
        help="average logits over the image and its mirror at eval")
    # run
    add("--device", default=None, choices=["auto", "cuda", "mps", "cpu"],
        help="default auto (CUDA, else Apple's MPS, else the CPU), or on --resume the run's own")
    add("--precision", default="auto", choices=["auto", *AUTOCAST_DTYPES],
        help="autocast dtype. auto: bf16 on CUDA GPUs with native bf16 (Ampere and newer), "
             "fp16 with loss scaling on older ones, fp32 elsewhere")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--seed", type=int, default=0, help="seed of the split, the initialisation and the augmentation")
    add("--seeds", type=int, default=1, help="run seeds SEED, SEED+1, ...: a series, with mean and std")
    add("--out", default=None, help="output folder (default runs/<timestamp>)")
    add("--resume", default=None, help="continue the run (or series) in this folder, or from a last.pt")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    for name in ("subset", "val_size", "warmup_epochs", "grad_clip", "weight_decay", "label_smoothing"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must not be negative")
    if not args.lr > 0:
        p.error(f"--lr {args.lr} must be positive")
    if not 0 <= args.cutmix <= 1 or not 0 <= args.ema < 1:
        p.error(f"--cutmix {args.cutmix} must lie in [0, 1] and --ema {args.ema} in [0, 1)")
    try:
        args.set = config_overrides(args.set)
    except ValueError as error:  # one line that names the field and what it takes
        p.exit(2, f"{p.prog}: error: {error}\n")
    return args


SET_BY_FLAGS = {"num_classes": "10, for CIFAR-10", "in_chans": "3, for RGB images",
                "attention": "--attention", "drop_path_rate": "--drop-path"}


def config_overrides(pairs):
    """--set FIELD=VALUE pairs -> {field: value}, each value parsed and checked against the type
    of the field's default in gmf.GroupMixFormerConfig (the config then checks the rules)."""
    defaults = {f.name: f.default for f in dataclasses.fields(gmf.GroupMixFormerConfig)}
    overrides = {}
    for pair in pairs:
        name, equals, text = (part.strip() for part in pair.partition("="))
        if not equals:
            raise ValueError(f"--set {pair}: expected FIELD=VALUE, e.g. --set use_crpe=false")
        if name in SET_BY_FLAGS:
            raise ValueError(f"--set {name}: this field is set by the trainer ({SET_BY_FLAGS[name]})")
        if name not in defaults:
            raise ValueError(f"--set {name}: GroupMixFormerConfig has no such field; it has "
                             f"{', '.join(sorted(set(defaults) - set(SET_BY_FLAGS)))}")
        overrides[name] = parse_field(name, text, defaults[name])
    return overrides


def as_tuples(value):
    """Lists (from JSON, or typed in brackets) as tuples, at every depth."""
    return tuple(as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def parse_field(name, text, default):
    """`text` read as a value of the same kind as `default`: true/false for a flag, the text itself
    for a word, else a Python literal (lists read as tuples): a number, numbers separated by
    commas (1,3,5,7; one: 7,) or pairs of them ((3,2),(5,3)). Whether the value fits the model
    (an integer width, an odd window) is for the config to say."""
    if isinstance(default, bool):
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise ValueError(f"--set {name}={text}: {name} takes true or false")
    if isinstance(default, str):
        return text
    try:
        value = as_tuples(ast.literal_eval(text))
    except Exception:  # not a Python literal at all
        value = None
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if isinstance(default, tuple) and isinstance(default[0], tuple):
        expected = "(kernel, heads) pairs such as (3,2),(5,3),(7,3) (one pair: (3,8),)"
        fits = isinstance(value, tuple) and value and all(
            isinstance(pair, tuple) and len(pair) == 2 and all(map(number, pair)) for pair in value)
    elif isinstance(default, tuple):
        expected = "numbers separated by commas, such as 1,3,5,7 (one: 7,)"
        fits = isinstance(value, tuple) and value and all(map(number, value))
    else:
        expected, fits = "a number", number(value)
    if not fits:
        raise ValueError(f"--set {name}={text}: {name} takes {expected}")
    return value


# ----------------------------------------------------------------------------------------------
# Data: uint8 tensors (N, 3, 32, 32) and int64 labels
# ----------------------------------------------------------------------------------------------

def load_data(args):
    """(train_images, train_labels, test_images, test_labels), uint8 NCHW and int64, on the CPU."""
    if args.synthetic:
        return synthetic_cifar(args.seed)
    root = args.data_dir
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")):
        return (*load_image_folder(os.path.join(root, "train")), *load_image_folder(os.path.join(root, "test")))
    import torchvision

    try:  # torchvision's own CIFAR-10 files (cifar-10-batches-py/), downloaded if need be
        splits = [torchvision.datasets.CIFAR10(root, train=train, download=not args.no_download)
                  for train in (True, False)]
    except Exception as error:  # not there, no network, a checksum: all end the same way for the user
        raise UserError(f"no CIFAR-10 in {root!r} ({type(error).__name__}: {error}). Give --data-dir a "
                        "folder holding cifar-10-batches-py/ or an ImageFolder tree with train/<class>/ and "
                        "test/<class>/ image folders, or run --synthetic to try the pipeline without data")
    (train, test) = ((torch.from_numpy(s.data).permute(0, 3, 1, 2), torch.tensor(s.targets)) for s in splits)
    return (*train, *test)  # images (N, 32, 32, 3) -> (N, 3, 32, 32)


def load_image_folder(folder):
    """Decode class-folder images (sorted class names = labels, as ImageFolder does) in threads."""
    import numpy as np
    from PIL import Image  # installed with torchvision, which decodes with it too

    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    files = [(os.path.join(folder, c, name), label) for label, c in enumerate(classes)
             for name in sorted(os.listdir(os.path.join(folder, c))) if name.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise UserError(f"no images in {folder}: expected {folder}/<class>/<image>.jpg")

    def decode(path):
        try:
            with Image.open(path) as image:
                pixels = np.array(image.convert("RGB"))  # (H, W, 3) uint8, a writable copy
        except OSError as error:
            raise UserError(f"cannot decode {path}: {error}")
        if pixels.shape != (32, 32, 3):
            raise UserError(f"{path} is {pixels.shape[1]} x {pixels.shape[0]}, not a 32 x 32 CIFAR image")
        return torch.from_numpy(pixels).permute(2, 0, 1)  # (3, 32, 32)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(decode, [path for path, _ in files]))
    return torch.stack(images), torch.tensor([label for _, label in files])


def synthetic_cifar(seed, train=10000, test=500):
    """Ten classes of noisy images, each class a smooth colour pattern: learnable, and file-free."""
    g = torch.Generator().manual_seed(seed)
    prototypes = F.interpolate(torch.rand(10, 3, 4, 4, generator=g), size=32, mode="bilinear")

    def make(n):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = prototypes[labels] + 0.25 * torch.randn(n, 3, 32, 32, generator=g)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels

    return (*make(train), *make(test))


def split_train_val(images, labels, args):
    """A seeded shuffle; the first val_size images validate, the next `subset` (or all) train."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    if args.val_size >= len(images):
        raise UserError(f"--val-size {args.val_size} leaves no training images out of {len(images)}")
    val, train = order[:args.val_size], order[args.val_size:]
    if args.subset:
        train = train[:args.subset]
    return images[train], labels[train], images[val], labels[val]


# ----------------------------------------------------------------------------------------------
# Augmentation, in batch on the device. Random numbers come from the device's own generator
# (the crops) and the CPU's (cutmix's box, which the host needs for slicing): no waiting.
# ----------------------------------------------------------------------------------------------

def normalize(images):
    """uint8 images -> float32, zero mean and unit variance per channel over CIFAR-10."""
    mean, std = channel_statistics(images.device)
    return (images.float() / 255 - mean) / std


@functools.lru_cache
def channel_statistics(device):
    """(1, 3, 1, 1) mean and std, made once per device: a copy from the host at every step would
    make the CPU wait until the GPU has finished its queue."""
    return (torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1))


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


def cutmix(images, targets, generator=None):
    """Paste one random box from a shuffled copy of the batch; mix the one-hot targets by area."""
    B, C, H, W = images.shape
    lam, ry, rx = torch.rand(3).tolist()  # on the CPU: the box's corners are needed on the host
    h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    y, x = int(ry * (H - h + 1)), int(rx * (W - w + 1))
    perm = torch.randperm(B, device=images.device, generator=generator)
    images = images.clone()
    images[:, :, y:y + h, x:x + w] = images[perm, :, y:y + h, x:x + w]
    area = h * w / (H * W)
    return images, (1 - area) * targets + area * targets[perm]


# ----------------------------------------------------------------------------------------------
# Devices, precision, files
# ----------------------------------------------------------------------------------------------

def pick_device(choice):
    """auto: CUDA, else Apple's MPS, else the CPU. A device asked for by name must be there."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if choice == "auto":
        choice = next(name for name in ("cuda", "mps", "cpu") if available[name])
    elif not available[choice]:
        raise UserError(f"--device {choice} was asked for, but PyTorch sees no {choice.upper()} device "
                        "here (--device auto takes what there is)")
    return torch.device(choice)


def pick_precision(choice, device):
    """bf16 keeps float32's exponent range, so it needs no loss scaling; CUDA GPUs before Ampere
    (T4, V100, RTX 20xx) only emulate it, slowly, but have fast fp16. Elsewhere: fp32."""
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


def make_scaler(device, precision):
    """fp16 overflows above 65504 and flushes small gradients to zero, so on CUDA the loss is
    scaled up before backward and steps whose gradients overflowed are skipped. Elsewhere (and
    in bf16 and fp32) the scaler is off and passes everything straight through."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")


def rng_state(device):
    """Every random stream a run draws from: the CPU's, and the GPU's own on CUDA or MPS."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if device.type == "mps":
        torch.mps.set_rng_state(state["mps"])


def write_atomically(path, write):
    """write(temporary path), then rename it over `path`: a crash or a full disk never leaves
    half a file, and the previous file stays as it was."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {path}: {error}")


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    write_atomically(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or unsafe content
        raise UserError(f"cannot read checkpoint {path}: it is damaged or not a train_cifar.py "
                        f"checkpoint ({type(error).__name__})")
    required = {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "settings", "rng", "history",
                "wall_seconds"}
    if not isinstance(checkpoint, dict) or not required <= checkpoint.keys():
        raise UserError(f"{path} is not a checkpoint of this train_cifar.py: start a new run")
    return checkpoint


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up from 0 to 1, then cosine decay to 0, per optimisation step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def loss_function(logits, targets, label_smoothing):
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate(model, images, labels, tta, autocast, batch_size=1000):
    """(mean loss, accuracy in %) of the model in eval mode."""
    model.eval()
    loss_sum, correct = torch.zeros((), device=images.device), torch.zeros((), device=images.device)
    for i in range(0, len(images), batch_size):
        x, y = normalize(images[i:i + batch_size]), labels[i:i + batch_size]
        with autocast():
            logits = model(x).float()
            if tta:
                logits = (logits + model(x.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(images), 100.0 * correct.item() / len(images)


@torch.no_grad()
def recalibrate_batchnorm(model, images, autocast, batch_size):
    """Set every BatchNorm's running statistics to the plain average of their per-batch values
    over these training images (un-augmented), as the current weights see them ("precise
    BatchNorm").

    Training keeps them as an exponential average (momentum 0.1) over the last few dozen steps,
    made with weights that have moved on since; after a few steps they still hold much of their
    initial mean 0 and variance 1, and eval mode predicts nonsense: a 7-step run on synthetic
    data scored 11% on validation as trained, and 99.4% after this. Only training images are used."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative average over the batches that follow
    model.train()
    for i in range(0, len(images), batch_size):
        with autocast():
            model(normalize(images[i:i + batch_size]))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


class EMA:
    """Exponential moving average of the weights and BatchNorm statistics: after each step,
    ema <- decay * ema + (1 - decay) * current for every float tensor; counters are copied."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))  # views, kept
        self.averaged = [pair for pair in pairs if pair[0].is_floating_point()]  # sorted once, not per step
        self.copied = [pair for pair in pairs if not pair[0].is_floating_point()]  # counters

    @torch.no_grad()
    def update(self):
        ema, now = zip(*self.averaged)
        torch._foreach_lerp_(ema, now, 1 - self.decay)  # every tensor in a few kernel launches
        for ema, now in self.copied:
            ema.copy_(now)


class Trainer:
    """One run, in the steps a reader can name: set up (or resume), train an epoch, end the
    epoch (validate, print, checkpoint), and test once at the end."""

    def __init__(self, args):
        self.wall_started = time.perf_counter()
        checkpoint = load_checkpoint(args.resume) if args.resume else None
        if checkpoint:  # the run continues exactly as it was set up, wherever its data now is
            saved = checkpoint["settings"]
            args = saved_settings(saved, args, resume=args.resume,
                                  out=os.path.dirname(os.path.abspath(args.resume)))
            print(f"resuming {args.resume} after epoch {checkpoint['epoch']} (its saved settings are used)")
        self.device = device = pick_device(args.device or "auto")
        if checkpoint and device.type != saved["device"]:  # random streams differ between devices
            raise UserError(f"{args.resume} was written on {saved['device']} and continues only there "
                            f"(--device {saved['device']})")
        if not args.synthetic and args.data_dir is not None and not os.path.isdir(args.data_dir):
            raise UserError(f"the data folder {args.data_dir} does not exist (a typing error?); without "
                            "--data-dir, CIFAR-10 is downloaded into ./data")
        args.device, args.data_dir = device.type, args.data_dir or "./data"
        args.precision = pick_precision(args.precision, device)  # saved as chosen, resumed as saved
        self.args = args
        if device.type == "cpu":
            print(f"warning: training on the CPU, which is slow (an estimate follows the first steps). "
                  f"A first run that learns in minutes: {CPU_FIRST_RUN}", file=sys.stderr)

        torch.manual_seed(args.seed)  # the initialisation, drop path and the augmentation
        try:
            self.model = gmf.create_model(args.model, num_classes=10, drop_path_rate=args.drop_path,
                                          attention=args.attention, **args.set).to(device)
        except ValueError as error:  # an unknown model, before any data is read
            raise UserError(str(error))
        self.net = torch.compile(self.model) if args.compile else self.model  # what the steps call
        images, labels, test_images, test_labels = load_data(args)
        train_images, train_labels, val_images, val_labels = split_train_val(images, labels, args)
        self.train_images, self.train_labels, self.val_images, self.val_labels, self.test_images, \
            self.test_labels = (t.to(device) for t in (train_images, train_labels, val_images, val_labels,
                                                       test_images, test_labels))

        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # time each convolution's algorithms once, keep the fastest
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.optimizer = torch.optim.AdamW(gmf.param_groups(self.model, args.weight_decay), lr=args.lr,
                                           fused=device.type == "cuda")  # one kernel for all tensors
        self.steps_per_epoch = max(1, len(self.train_images) // args.batch_size)  # drop the ragged batch
        total_steps = args.epochs * self.steps_per_epoch
        # A warm-up longer than a quarter of the run would leave a short run little time at full rate.
        warmup_steps = max(1, min(int(args.warmup_epochs * self.steps_per_epoch), total_steps // 4))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
        self.scaler = make_scaler(device, args.precision)
        self.ema = EMA(self.model, args.ema) if args.ema else None
        self.start_epoch, self.step, self.history, self.wall_before = 1, 0, [], 0.0
        if checkpoint:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.scaler.load_state_dict(checkpoint["scaler"])
            if self.ema:
                self.ema.model.load_state_dict(checkpoint["ema"])
            set_rng_state(checkpoint["rng"], device)
            self.start_epoch, self.step = checkpoint["epoch"] + 1, checkpoint["step"]
            self.history, self.wall_before = checkpoint["history"], checkpoint["wall_seconds"]

        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "config.json"), vars(args))
        changed = "".join(f", {name}={value}" for name, value in args.set.items())
        print(f"model {args.model}{changed}: {sum(p.numel() for p in self.model.parameters()):,} parameters | train "
              f"{len(self.train_images)}, val {len(self.val_images)}, test {len(self.test_images)} images | "
              f"{args.epochs} epochs of {self.steps_per_epoch} steps | {device_name(device)}, {args.precision}")
        print(f"{'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'val_loss':>8} {'val_acc':>7} "
              f"{'lr':>9} {'seconds':>8} {'img/s':>8}")
        for row in self.history:
            print_row(row)
        if total_steps < SHORT_RUN_STEPS:
            print(f"note: {total_steps} steps in all test the pipeline but are too few for the accuracy to "
                  f"mean much; a first run that learns on a CPU: {CPU_FIRST_RUN}")
        if (args.compile or device.type != "cpu") and self.start_epoch <= args.epochs:
            warm_up_untimed(self.net, self.model, self.train_images[:args.batch_size], self.autocast)

    def wall_seconds(self):
        """Seconds of this run in all its processes, loading included (not the time between an
        interruption and its resume, nor the part of an epoch an interruption threw away)."""
        return self.wall_before + time.perf_counter() - self.wall_started

    def autocast(self):  # matmuls and convs in bf16 or fp16 (on a GPU, norms and softmax stay in fp32)
        dtype = AUTOCAST_DTYPES[self.args.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def train_one_epoch(self, epoch):
        args = self.args
        self.model.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        order = torch.randperm(len(self.train_images), device=self.device)
        for i in range(self.steps_per_epoch):
            index = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = random_crop_flip(normalize(self.train_images[index]))
            y = self.train_labels[index]
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
            self.scheduler.step()
            self.step += 1
            if self.ema:
                self.ema.update()
            loss_sum += loss.detach() * len(index)  # summed on the device: no wait per step
            correct += (logits.argmax(1) == y).sum()
            if self.device.type == "cpu" and epoch == self.start_epoch and i == 2:
                per_step = (time.perf_counter() - started) / 3
                left = (args.epochs - epoch + 1) * self.steps_per_epoch - 3
                print(f"estimated training time on this CPU: {per_step * left / 60:.1f} min "
                      f"({per_step:.2f} s per step)", flush=True)
        seen = self.steps_per_epoch * args.batch_size
        train_loss = loss_sum.item() / seen
        if not math.isfinite(train_loss):
            last = os.path.join(args.out, "last.pt")
            kept = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint written"
            raise Diverged(f"the training loss became {train_loss} in epoch {epoch}; stopped, {kept}")
        seconds = time.perf_counter() - started
        return dict(epoch=epoch, step=self.step, train_loss=train_loss, train_acc=100.0 * correct.item() / seen,
                    lr=self.scheduler.get_last_lr()[0], epoch_seconds=seconds, images_per_second=seen / seconds)

    def end_of_epoch(self, row):
        """Validate, print, write metrics, best.pt and last.pt. last.pt goes last: whatever an
        interruption leaves behind, resuming from last.pt redoes the epochs after it exactly."""
        args, out = self.args, self.args.out
        eval_model = self.ema.model if self.ema else self.model
        # In batches of the training size: on a GPU a new shape would mean a new algorithm search.
        recalibrate_batchnorm(eval_model, self.train_images[:BATCHNORM_IMAGES], self.autocast, args.batch_size)
        row["val_loss"], row["val_acc"] = evaluate(eval_model, self.val_images, self.val_labels, args.tta,
                                                   self.autocast)
        best_before = max((r["val_acc"] for r in self.history), default=-1.0)
        self.history.append(row)
        print_row(row)
        write_text(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in self.history))
        if row["val_acc"] > best_before:
            best = {"model": eval_model.state_dict(), "epoch": row["epoch"], "val_acc": row["val_acc"],
                    "settings": vars(args)}
            write_atomically(os.path.join(out, "best.pt"), lambda tmp: torch.save(best, tmp))
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "epoch": row["epoch"], "step": self.step, "settings": vars(args),
                 "rng": rng_state(self.device), "history": self.history, "wall_seconds": self.wall_seconds()}
        if self.ema:
            state["ema"] = self.ema.model.state_dict()
        write_atomically(os.path.join(out, "last.pt"), lambda tmp: torch.save(state, tmp))

    def test_once(self):
        """The test set, once, with the final weights: no choice was ever made by looking at it."""
        args, history = self.args, self.history
        model = self.ema.model if self.ema else self.model
        test_loss, test_acc = evaluate(model, self.test_images, self.test_labels, args.tta, self.autocast)
        final = dict(test_acc=test_acc, test_loss=test_loss, val_acc=history[-1]["val_acc"],
                     epochs=args.epochs, seed=args.seed, train_seconds=sum(r["epoch_seconds"] for r in history),
                     wall_seconds=self.wall_seconds(),
                     device=device_name(self.device),
                     precision=args.precision, torch=torch.__version__, model=args.model,
                     parameters=sum(p.numel() for p in self.model.parameters()), command=" ".join(sys.argv))
        write_json(os.path.join(args.out, "final.json"), final)
        plot_curves(args.out, history)
        print(f"test accuracy {test_acc:.2f}% (final weights, evaluated once) | training "
              f"{final['train_seconds']:.1f} s, whole run {final['wall_seconds']:.1f} s | in {args.out}")
        return final


def warm_up_untimed(net, model, images, autocast):
    """One training pass (forward and backward) outside the timed epochs, then the weights,
    BatchNorm statistics and random state restored, so that the run is the same as without it.

    It takes the one-time costs out of epoch 1's time: torch.compile's compilation, and on a GPU
    the choice of convolution algorithms (cudnn.benchmark) and the loading of kernels. The whole
    run's wall time still counts them."""
    print("warming up (one untimed training pass) ...", flush=True)
    state, rng = copy.deepcopy(model.state_dict()), rng_state(images.device)
    model.train()
    with autocast():
        net(normalize(images)).float().sum().backward()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    set_rng_state(rng, images.device)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)  # epoch 1's timer starts on an idle GPU


def print_row(row):
    print(f"{row['epoch']:>5} {row['train_loss']:>10.4f} {row['train_acc']:>9.2f} {row['val_loss']:>8.4f} "
          f"{row['val_acc']:>7.2f} {row['lr']:>9.2e} {row['epoch_seconds']:>8.1f} "
          f"{row['images_per_second']:>8.0f}", flush=True)  # at once, in a log file too


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def plot_curves(out, history):
    """curves.png: losses and accuracies per epoch, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric, label in zip(axes, ("loss", "acc"), ("loss", "accuracy (%)")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], label="validation")
        ax.set(xlabel="epoch", ylabel=label)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Runs and series
# ----------------------------------------------------------------------------------------------

def train(args):
    """One run, fresh or resumed; returns what it writes to final.json."""
    final_path = os.path.join(args.out, "final.json")
    if args.resume and os.path.exists(final_path):
        print(f"{args.out} is a finished run: its results are in {final_path}")
        with open(final_path) as f:
            return json.load(f)
    trainer = Trainer(args)
    for epoch in range(trainer.start_epoch, trainer.args.epochs + 1):
        trainer.end_of_epoch(trainer.train_one_epoch(epoch))
    return trainer.test_once()


def train_series(args):
    """Seeds SEED .. SEED+N-1, each a whole run in OUT/seed<k>; the mean and sample standard
    deviation of the final test accuracy and of the times go to OUT/summary.json. Nothing is
    selected: every seed's final result counts."""
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "series.json"), vars(args))
    finals = []
    for seed in range(args.seed, args.seed + args.seeds):
        out = os.path.join(args.out, f"seed{seed}")
        resume = os.path.join(out, "last.pt") if os.path.exists(os.path.join(out, "last.pt")) else None
        print(f"--- seed {seed} ({'continued' if resume else 'new'}): {out}")
        finals.append(train(argparse.Namespace(**{**vars(args), "seed": seed, "seeds": 1, "out": out,
                                                  "resume": resume})))
    summary = {"seeds": [f["seed"] for f in finals]}
    for key in ("test_acc", "train_seconds", "wall_seconds"):
        values = [f[key] for f in finals]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[key] = dict(mean=statistics.mean(values), std=std, values=values)
    write_json(os.path.join(args.out, "summary.json"), summary)
    acc, seconds = summary["test_acc"], summary["train_seconds"]
    print(f"{len(finals)} seeds: test accuracy {acc['mean']:.2f} ± {acc['std']:.2f}% | training "
          f"{seconds['mean']:.1f} ± {seconds['std']:.1f} s (mean ± sample std) | {args.out}/summary.json")
    return summary


def saved_settings(saved, args, **changes):
    """A resumed run's settings: as saved, except where its data is and which device runs it,
    when given on the command line."""
    saved = {**saved, "set": {name: as_tuples(value) for name, value in saved.get("set", {}).items()}}
    return argparse.Namespace(**{**saved, "data_dir": args.data_dir or saved["data_dir"],
                                 "device": args.device or saved["device"], **changes})


def resolve_run(args):
    """Fill in --out, and for --resume find the checkpoint (a last.pt, or a run or series folder)."""
    if args.resume and args.set:
        raise UserError(f"--set cannot change a run that exists: {args.resume} keeps the config it was "
                        "started with (start a new run with --out to try another)")
    if not args.resume:
        args.out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        if any(os.path.exists(os.path.join(args.out, name)) for name in ("last.pt", "series.json")):
            raise UserError(f"{args.out} already holds a run: continue it with --resume {args.out}, "
                            "or choose another --out")
        return args
    if os.path.isfile(os.path.join(args.resume, "series.json")):
        with open(os.path.join(args.resume, "series.json")) as f:
            return saved_settings(json.load(f), args, out=args.resume, resume=None)
    path = os.path.join(args.resume, "last.pt") if os.path.isdir(args.resume) else args.resume
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: --resume takes a run folder, a series folder or a last.pt")
    args.resume, args.out = path, os.path.dirname(os.path.abspath(path))
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        args = resolve_run(args)
        train_series(args) if args.seeds > 1 else train(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Diverged as error:
        print(f"error: {error} (try a lower --lr)", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"\ninterrupted: continue with --resume {args.out}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
