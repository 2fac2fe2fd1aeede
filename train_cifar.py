"""Train a scaled-down GroupMixFormer on CIFAR-10, from scratch, on one GPU (or a CPU).

    python train_cifar.py                                   # GPU: download CIFAR-10 to ./data, train, test
    python train_cifar.py --data-dir path/to/cifar10-jpeg   # offline: an ImageFolder tree (train/, test/)
    python train_cifar.py --preset long                     # 100 epochs, with cutmix and flip averaging
    python train_cifar.py --device cpu --subset 2000 --epochs 1 --val-size 500   # CPU smoke run
    python train_cifar.py --synthetic --epochs 1            # the whole pipeline, no files needed
    python train_cifar.py --resume auto --out runs/mine     # continue an interrupted run
    python train_cifar.py --resume runs/mine/last.pt        # the same, naming the checkpoint

The dataset lives on the device as one uint8 tensor; cropping, flipping (and, if asked, cutmix)
run there in batch, so no DataLoader is involved. Recipe: AdamW without decay on biases and norm
scales, linear warm-up then cosine decay per step, label smoothing, gradient clipping, bf16
autocast on the GPU (fp16 with loss scaling on GPUs older than Ampere; --precision chooses).
5,000 training images are held out for validation: they pick best.pt and are printed every
epoch. The test set is evaluated once, at the end, on the final weights.

Every run writes to --out (default runs/<timestamp>): config.json, metrics.jsonl (one line per
epoch), last.pt (every epoch, written atomically) and best.pt, final.json, and curves.png when
matplotlib is installed. An interrupted run resumed with --resume ends with exactly the metrics
of an uninterrupted one on the CPU (on a GPU, up to the non-determinism of its kernels).
Epoch times leave out one untimed warm-up pass, made on a GPU or with --compile, that compiles
and picks convolution algorithms; final.json's wall_seconds counts everything, loading included.
"""
import argparse
import copy
import functools
import json
import math
import os
import pickle
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

import gmf

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class UserError(Exception):
    """A problem the user can fix (missing data, bad checkpoint, full disk): one line, exit 2."""


class Diverged(Exception):
    """The loss became NaN or infinite."""


# Named recipes: a preset changes these defaults, and flags given on the command line still win.
PRESETS = {
    "fast": {},  # the defaults below
    "long": dict(epochs=100, cutmix=0.5, drop_path=0.2, tta=True),  # more regularisation for 2.5x the epochs
}


def preset_flags(name):
    """A preset written as the flags it stands for, e.g. '--epochs 100 --tta'."""
    return " ".join(f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}")
                    for key, value in PRESETS[name].items())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", default="./data",
                      help="torchvision CIFAR-10 root (cifar-10-batches-py/) or ImageFolder tree (train/, test/)")
    data.add_argument("--no-download", action="store_true", help="never download CIFAR-10")
    data.add_argument("--synthetic", action="store_true", help="generated images: tests the pipeline, no files")
    data.add_argument("--subset", type=int, default=0, help="use N training images after a seeded shuffle (0: all)")
    data.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="groupmixformer_cifar", help=f"one of {gmf.list_models()}")
    model.add_argument("--attention", default="factorized", choices=gmf.ATTENTION_CORES)
    model.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    recipe = p.add_argument_group("recipe")
    recipe.add_argument("--preset", default="fast", choices=PRESETS,
                        help="fast: the defaults shown here; long: " + preset_flags("long"))
    recipe.add_argument("--epochs", type=int, default=40, help="passes over the training images")
    recipe.add_argument("--batch-size", type=int, default=256, help="images per optimisation step")
    recipe.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW")
    recipe.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay of matrices and kernels")
    recipe.add_argument("--warmup-epochs", type=float, default=2.0, help="linear warm-up of the learning rate")
    recipe.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the cross-entropy targets")
    recipe.add_argument("--grad-clip", type=float, default=5.0, help="max gradient norm (0: off)")
    recipe.add_argument("--cutmix", type=float, default=0.0, help="probability of cutmix per batch (long runs)")
    recipe.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights used for eval (0: off)")
    recipe.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                        help="average logits over the image and its mirror at eval")
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                     help="autocast dtype. auto: bf16 on GPUs with native bf16 (Ampere and newer), fp16 "
                          "with loss scaling on older GPUs, fp32 on the CPU")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default=None, help="output folder (default runs/<timestamp>)")
    run.add_argument("--resume", default=None, help="a last.pt to continue from, or 'auto' for OUT/last.pt")
    args = p.parse_args(argv)
    if PRESETS[args.preset]:
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    for name in ("subset", "val_size", "warmup_epochs", "grad_clip", "weight_decay", "label_smoothing"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must not be negative")
    if not args.lr > 0:
        p.error(f"--lr {args.lr} must be positive")
    if not 0 <= args.cutmix <= 1 or not 0 <= args.ema < 1:
        p.error(f"--cutmix {args.cutmix} must lie in [0, 1] and --ema {args.ema} in [0, 1)")
    return args


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
    if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        if args.no_download:
            raise UserError(no_data_message(root, "and --no-download is set"))
        download_cifar(root)
    return load_cifar_pickles(os.path.join(root, "cifar-10-batches-py"))


def no_data_message(root, why):
    return (f"no CIFAR-10 in {root!r} {why}. Give --data-dir a folder holding cifar-10-batches-py/ "
            "or an ImageFolder tree with train/<class>/ and test/<class>/ image folders, "
            "or run --synthetic to try the pipeline without data")


def download_cifar(root):
    import torchvision

    print(f"downloading CIFAR-10 into {root} ...", flush=True)
    try:
        torchvision.datasets.CIFAR10(root, train=True, download=True)
    except Exception as error:  # no network, proxy, checksum: all end the same way for the user
        raise UserError(no_data_message(root, f"and downloading failed ({type(error).__name__}: {error})"))


def load_cifar_pickles(folder):
    def read(names):
        images, labels = [], []
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(torch.as_tensor(batch["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            labels.append(torch.as_tensor(batch["labels"], dtype=torch.int64))
        return torch.cat(images), torch.cat(labels)

    try:
        return (*read([f"data_batch_{i}" for i in range(1, 6)]), *read(["test_batch"]))
    except (OSError, pickle.UnpicklingError, KeyError, ValueError) as error:
        raise UserError(f"cannot read CIFAR-10 from {folder}: {error}")


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
# Augmentation and normalisation, in batch on the device
# ----------------------------------------------------------------------------------------------

def normalize(images):
    """uint8 images -> float32, zero mean and unit variance per channel over CIFAR-10."""
    mean, std = channel_statistics(images.device)
    return (images.float() / 255 - mean) / std


@functools.lru_cache
def channel_statistics(device):
    """CIFAR-10's channel mean and std, (1, 3, 1, 1) each, made once per device: copying them from
    the host at every step would make the CPU wait until the GPU has finished its queue."""
    return (torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1))


def random_crop_flip(images, generator, pad=4):
    """Random 32 x 32 crops of the reflect-padded batch, and a random half mirrored."""
    B, C, H, W = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (B,), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (B,), device=images.device, generator=generator)
    rows = (dy[:, None] + torch.arange(H, device=images.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=images.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(B, device=images.device)[:, None, None, None]
    channels = torch.arange(C, device=images.device)[None, :, None, None]
    crops = padded[batch, channels, rows, cols]  # (B, C, H, W)
    flip = torch.rand(B, device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def cutmix(images, targets, generator):
    """Paste a random box from a shuffled copy of the batch; mix the one-hot targets by area.

    The box is drawn with Python's `random` on the host (seeded and checkpointed like the rest):
    numbers drawn on the GPU would have to be waited for before slicing."""
    B, C, H, W = images.shape
    lam = random.random()
    h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    y, x = random.randint(0, H - h), random.randint(0, W - w)
    perm = torch.randperm(B, device=images.device, generator=generator)
    images = images.clone()
    images[:, :, y:y + h, x:x + w] = images[perm, :, y:y + h, x:x + w]
    area = h * w / (H * W)
    return images, (1 - area) * targets + area * targets[perm]


# ----------------------------------------------------------------------------------------------
# Checkpoints: everything needed to continue exactly, loadable with weights_only=True
# ----------------------------------------------------------------------------------------------

def save_atomically(obj, path):
    """Write to a temporary file and rename it over `path`: a crash never leaves half a file."""
    tmp = f"{path}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {path}: {error}")


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or unsafe content
        raise UserError(f"cannot read checkpoint {path}: it is damaged or not a train_cifar.py "
                        f"checkpoint ({type(error).__name__})")
    required = {"model", "optimizer", "scheduler", "epoch", "step", "config", "rng", "history"}
    if not isinstance(checkpoint, dict) or not required <= checkpoint.keys():
        raise UserError(f"{path} is not a train_cifar.py checkpoint (missing "
                        f"{sorted(required - set(checkpoint)) if isinstance(checkpoint, dict) else 'everything'})")
    if not {"torch", "python", "augment", "device"} <= checkpoint["rng"].keys():
        raise UserError(f"{path} was written by an older train_cifar.py, which did not record the device "
                        f"of its random states: start a new run")
    return checkpoint


def rng_state(generator):
    """Every random stream the run draws from: torch's (dropout, drop path), Python's (cutmix),
    the augmentation generator's, and on a GPU that device's own."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "augment": generator.get_state(),
             "device": generator.device.type}
    if generator.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(generator.device)
    return state


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    generator.set_state(state["augment"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], generator.device)


def _as_python_state(state):
    version, internal, gauss = state  # weights_only loading turns the inner tuple into a list
    return version, tuple(internal), gauss


def find_resume_checkpoint(args):
    """The checkpoint --resume names: a file, a run folder, or 'auto' (OUT/last.pt or the newest run)."""
    if args.resume != "auto":
        return os.path.join(args.resume, "last.pt") if os.path.isdir(args.resume) else args.resume
    if args.out:
        path = os.path.join(args.out, "last.pt")
        return path if os.path.exists(path) else None
    runs = sorted(d for d in (os.listdir("runs") if os.path.isdir("runs") else [])
                  if os.path.exists(os.path.join("runs", d, "last.pt")))
    return os.path.join("runs", runs[-1], "last.pt") if runs else None


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
def evaluate(model, images, labels, batch_size, tta, autocast):
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


class EMA:
    """Exponential moving average of the weights (and of the BatchNorm statistics):
    after each step, ema <- decay * ema + (1 - decay) * current, for every tensor.

    It keeps views of the model's tensors, so build it after the model has its device and dtype."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))  # views, kept
        self.averaged = [(ema, current) for ema, current in pairs if ema.is_floating_point()]
        self.copied = [(ema, current) for ema, current in pairs if not ema.is_floating_point()]  # counters

    @torch.no_grad()
    def update(self):
        ema, current = zip(*self.averaged)
        torch._foreach_lerp_(ema, current, 1 - self.decay)  # every tensor in a few kernel launches
        for ema, current in self.copied:
            ema.copy_(current)


def build_model(config, device):
    overrides = dict(num_classes=10, drop_path_rate=config["drop_path"], attention=config["attention"])
    try:
        model = gmf.create_model(config["model"], **overrides)
    except ValueError as error:
        raise UserError(str(error))
    return model.to(device)


def pick_device(choice):
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def pick_precision(choice, device):
    """The autocast dtype: native bf16 where the GPU has it, else fp16 (with loss scaling) on a GPU.

    bf16 keeps float32's exponent range, so it trains without loss scaling; a GPU older than
    Ampere (T4, V100, RTX 20xx) only emulates it, slowly, but has fast fp16 tensor cores.
    Either can be asked for on the CPU too, where they run the GPU's arithmetic (slowly)."""
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def train(args):
    wall_started = time.perf_counter()
    resume_path = find_resume_checkpoint(args) if args.resume else None
    if args.resume and args.resume != "auto" and resume_path is None:
        raise UserError(f"no checkpoint at {args.resume}")
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    if checkpoint:
        config = checkpoint["config"]  # the run continues exactly as it was configured
        config.update(data_dir=args.data_dir, device=args.device)
        out = os.path.dirname(os.path.abspath(resume_path))
        print(f"resuming {resume_path} after epoch {checkpoint['epoch']} (its saved config is used)")
    else:
        config = {k: v for k, v in vars(args).items() if k not in ("resume", "out")}
        out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    run_args = argparse.Namespace(**config)
    device = pick_device(run_args.device)
    if checkpoint and checkpoint["rng"]["device"] != device.type:  # their random streams differ
        written_on = {"cpu": "the CPU", "cuda": "a CUDA GPU"}[checkpoint["rng"]["device"]]
        raise UserError(f"{resume_path} was written on {written_on} and can only be resumed on one "
                        f"(--device {checkpoint['rng']['device']})")
    if device.type == "cpu":
        print("warning: no GPU in use, training on the CPU; this is slow (an estimate follows the "
              "first steps). Use --subset and --epochs for a quick run.", file=sys.stderr)

    torch.manual_seed(run_args.seed)
    random.seed(run_args.seed)
    generator = torch.Generator(device=device).manual_seed(run_args.seed)

    images, labels, test_images, test_labels = load_data(run_args)
    train_images, train_labels, val_images, val_labels = split_train_val(images, labels, run_args)
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    val_images, val_labels = val_images.to(device), val_labels.to(device)
    test_images, test_labels = test_images.to(device), test_labels.to(device)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(config, device)
    params = sum(p.numel() for p in model.parameters())
    forward = torch.compile(model) if run_args.compile else model
    optimizer = torch.optim.AdamW(gmf.param_groups(model, run_args.weight_decay), lr=run_args.lr,
                                  betas=(0.9, 0.999), fused=device.type == "cuda")
    steps_per_epoch = max(1, len(train_images) // run_args.batch_size)  # drop the ragged last batch
    total_steps = run_args.epochs * steps_per_epoch
    warmup_steps = max(1, int(run_args.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
    ema = EMA(model, run_args.ema) if run_args.ema else None
    precision = config["precision"] = pick_precision(run_args.precision, device)  # resumed as chosen

    def autocast():  # matmuls and convs in bf16 or fp16 (on a GPU, norms and softmax stay in fp32)
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision), enabled=precision != "fp32")

    # fp16 overflows above 65504 and flushes small gradients to zero: the loss is multiplied by a
    # large factor before backward, and steps whose gradients overflowed are skipped (the schedule
    # moves on regardless; PyTorch warns once if the very first step is skipped).
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    start_epoch, step, history, best_val = 1, 0, [], -1.0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler.is_enabled() and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if ema:
            ema.model.load_state_dict(checkpoint["ema"])
        set_rng_state(checkpoint["rng"], generator)
        start_epoch, step, history = checkpoint["epoch"] + 1, checkpoint["step"], checkpoint["history"]
        best_val = max((row["val_acc"] for row in history), default=-1.0)

    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "config.json"), {**config, "out": out})
    print(f"model {run_args.model}: {params:,} parameters | train {len(train_images)}, val {len(val_images)}, "
          f"test {len(test_images)} images | {run_args.epochs} epochs of {steps_per_epoch} steps | "
          f"device {device_name(device)}, {precision} | out {out}")
    print(f"{'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'val_loss':>8} {'val_acc':>7} "
          f"{'lr':>9} {'seconds':>8} {'img/s':>8}")
    for row in history:
        print_row(row)

    if (run_args.compile or device.type == "cuda") and start_epoch <= run_args.epochs:
        warm_up_untimed(forward, model, train_images[:run_args.batch_size], autocast)

    show_progress = sys.stdout.isatty()  # an in-place step counter, for people watching a terminal
    progress_every = max(1, steps_per_epoch // 20)
    train_seconds = sum(row["epoch_seconds"] for row in history)
    for epoch in range(start_epoch, run_args.epochs + 1):
        model.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        order = torch.randperm(len(train_images), device=device, generator=generator)
        for i in range(steps_per_epoch):
            index = order[i * run_args.batch_size:(i + 1) * run_args.batch_size]
            x = random_crop_flip(normalize(train_images[index]), generator)
            y = train_labels[index]
            targets = F.one_hot(y, 10).float()
            if run_args.cutmix and random.random() < run_args.cutmix:
                x, targets = cutmix(x, targets, generator)
            with autocast():
                logits = forward(x)
            loss = loss_function(logits, targets, run_args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # without fp16, scale() and step() pass straight through
            if run_args.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), run_args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            if ema:
                ema.update()
            loss_sum += loss.detach() * len(index)
            correct += (logits.argmax(1) == y).sum()
            if show_progress and (i + 1) % progress_every == 0:
                print(f"\r  epoch {epoch}: step {i + 1}/{steps_per_epoch}", end="", flush=True)
            if device.type == "cpu" and epoch == start_epoch and i == 2:
                per_step = (time.perf_counter() - started) / 3
                remaining = per_step * ((run_args.epochs - epoch + 1) * steps_per_epoch - 3)
                print(f"\restimated training time on this CPU: {remaining / 60:.1f} min "
                      f"({per_step:.2f} s per step, {total_steps} steps in all)", flush=True)
        seen = min(steps_per_epoch * run_args.batch_size, len(train_images))
        train_loss = loss_sum.item() / seen
        if not math.isfinite(train_loss):
            last = os.path.join(out, "last.pt")
            kept = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written"
            raise Diverged(f"the training loss became {train_loss} in epoch {epoch}; stopped, {kept}")
        epoch_seconds = time.perf_counter() - started
        train_seconds += epoch_seconds
        eval_model = ema.model if ema else model
        val_loss, val_acc = evaluate(eval_model, val_images, val_labels, 1000, run_args.tta, autocast)
        row = dict(epoch=epoch, step=step, train_loss=train_loss, train_acc=100.0 * correct.item() / seen,
                   val_loss=val_loss, val_acc=val_acc, lr=scheduler.get_last_lr()[0],
                   epoch_seconds=epoch_seconds, images_per_second=seen / epoch_seconds)
        history.append(row)
        if show_progress:
            print("\r" + " " * 40 + "\r", end="")
        print_row(row)
        # last.pt goes last: whatever an interruption leaves behind, resuming from last.pt redoes
        # the epochs after it and rewrites the metrics and best.pt exactly as they were.
        write_metrics(out, history)
        if val_acc > best_val:
            best_val = val_acc
            save_atomically({"model": eval_model.state_dict(), "epoch": epoch, "val_acc": val_acc,
                             "config": config}, os.path.join(out, "best.pt"))
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, "config": config,
                 "scaler": scaler.state_dict(), "rng": rng_state(generator), "history": history}
        if ema:
            state["ema"] = ema.model.state_dict()
        save_atomically(state, os.path.join(out, "last.pt"))

    # The test set, once, with the final weights: no choice was ever made by looking at it.
    eval_model = ema.model if ema else model
    test_loss, test_acc = evaluate(eval_model, test_images, test_labels, 1000, run_args.tta, autocast)
    final = dict(test_acc=test_acc, test_loss=test_loss,
                 val_acc=history[-1]["val_acc"] if history else None,
                 best_val_acc=best_val if history else None, epochs=run_args.epochs,
                 train_seconds=train_seconds, wall_seconds=time.perf_counter() - wall_started,
                 device=device_name(device), precision=precision, torch=torch.__version__,
                 parameters=params, model=run_args.model, command=" ".join(sys.argv))
    write_json(os.path.join(out, "final.json"), final)
    plot_curves(out, history)
    print(f"test accuracy {test_acc:.2f}% (final weights, evaluated once) | training "
          f"{train_seconds:.1f} s, whole run {final['wall_seconds']:.1f} s | results in {out}")
    return final


def warm_up_untimed(forward, model, images, autocast):
    """One training pass (forward and backward) outside the timed epochs, then the state
    (weights, BatchNorm statistics, RNG) restored, so that the run is the same as without it.

    It takes the one-time costs out of epoch 1's time: torch.compile's compilation, and on a GPU
    the choice of convolution algorithms (cudnn.benchmark) and the loading of kernels. The whole
    run's wall time still counts them. Evaluation runs the plain model: at batch 1,000 it is not
    held back by Python's overhead."""
    print("warming up (one untimed training pass) ...", flush=True)
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(images.device) if images.is_cuda else None
    model.train()
    with autocast():
        forward(normalize(images)).float().sum().backward()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], images.device)
        torch.cuda.synchronize(images.device)  # the timer of epoch 1 starts on an idle GPU


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def print_row(row):
    print(f"{row['epoch']:>5} {row['train_loss']:>10.4f} {row['train_acc']:>9.2f} {row['val_loss']:>8.4f} "
          f"{row['val_acc']:>7.2f} {row['lr']:>9.2e} {row['epoch_seconds']:>8.1f} "
          f"{row['images_per_second']:>8.0f}", flush=True)


def write_json(path, obj):
    try:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error}")


def write_metrics(out, history):
    path = os.path.join(out, "metrics.jsonl")
    try:
        with open(f"{path}.tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in history)
        os.replace(f"{path}.tmp", path)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error}")


def plot_curves(out, history):
    """curves.png: losses and accuracies per epoch, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [r["train_loss"] for r in history], label="train")
    left.plot(epochs, [r["val_loss"] for r in history], label="validation")
    left.set(xlabel="epoch", ylabel="loss")
    right.plot(epochs, [r["train_acc"] for r in history], label="train")
    right.plot(epochs, [r["val_acc"] for r in history], label="validation")
    right.set(xlabel="epoch", ylabel="accuracy (%)")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=80)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Diverged as error:
        print(f"error: {error} (try a lower --lr)", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("\ninterrupted: continue with --resume auto --out <the run's folder>", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
