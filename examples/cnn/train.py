"""TT Wide-ResNet-28-k on CIFAR-10: a dense baseline and a TT model trained on the same schedule.

Wide-ResNet-28-k (pre-activation basic blocks, widths 16k/32k/64k, dropout optional) where the
3×3 convolutions of the chosen stages are TTConv2d layers (1×1 C→r1, 3×3 r1→r2, 1×1 r2→K, run by
torchrec_tt's fused op on CUDA). The stem convolution, the 1×1 shortcuts, BN and the classifier
stay dense. Both models see the same data order, augmentation (4-pixel pad + random crop,
horizontal flip), SGD (Nesterov, momentum 0.9, weight decay 5e-4), cosine learning-rate schedule
and batch size. Prints a progress bar per epoch, then an accuracy, compression and throughput
summary (training images/s of every model, measured in the same run, the first --warmup-steps
steps left out: cuDNN autotuning and the TT dispatch's measurements happen there); writes the
curves (JSON) and a plot (PNG) to --out.

The TT layers run the path chosen by --conv-path (torchrec_tt.conv_dispatch): ``auto`` (default)
measures the fused op against the cuDNN composition once per layer shape, as
cudnn.benchmark does (--no-conv-benchmark: the documented default, the composition);
``fused`` / ``composed`` force one.

Data: the offline CIFAR-10 copy in shared/data/cifar10 (JPEG-re-encoded, see its README), read in
place: --data, else $TORCHREC_TT_CIFAR10, else ../shared/data/cifar10 beside the repository,
/work/shared/data/cifar10, or .data/cifar10 in the repository (for a GPU machine the data was
copied to).

    # dense vs TT (stage 3 at rank 64; stages 2+3 at rank 64) on the GPU, 30 epochs
    python examples/cnn/train.py --width 10 --tt 3:64 --tt 2,3:64 --epochs 30
    # the TT model of docs/benchmarks.md that is within 0.5 points of dense at 3.23x (25 epochs):
    # cores from the TT-SVD of a kaiming draw, weight decay on the reconstructed weights
    python examples/cnn/train.py --tt 3:128 --epochs 25 --tt-init spectral --tt-decay frobenius
    # training throughput only (random images, no data needed): dense vs TT, images/s
    python examples/cnn/train.py --synthetic 38400 --epochs 1 --limit-batches 300 --tt 2,3:32
    # CPU smoke run (< 1 minute)
    .venv/bin/python examples/cnn/train.py --depth 10 --width 1 --epochs 1 --limit-batches 4 \\
        --train-files 0 --test-limit 512 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from torchrec_tt import TTConv2d, conv_dispatch
from torchrec_tt.modules.conv import tt_svd_conv_weight

REPO = Path(__file__).resolve().parents[2]
MEAN = (0.4913, 0.4821, 0.4465)  # train-split statistics of this JPEG copy (its README)
STD = (0.2452, 0.2428, 0.2606)


# --- data -------------------------------------------------------------------------------------


def find_data(arg: str | None) -> Path:
    cands = [arg] if arg else []
    cands += [os.environ.get("TORCHREC_TT_CIFAR10"), REPO.parent / "shared/data/cifar10",
              "/work/shared/data/cifar10", REPO / ".data/cifar10"]
    for c in cands:
        if c and (Path(c) / "test.npz").exists():
            return Path(c)
    raise SystemExit(f"CIFAR-10 not found (looked in {[str(c) for c in cands if c]}); pass --data")


def load_cifar10(root: Path, train_files: list[int], test_limit: int | None):
    """uint8 NCHW tensors (x_train, y_train, x_test, y_test), read in place from the npz files."""
    parts = [np.load(root / f"train_{k}.npz") for k in train_files]
    x_tr = np.concatenate([p["x"] for p in parts])
    y_tr = np.concatenate([p["y"] for p in parts])
    t = np.load(root / "test.npz")
    x_te, y_te = t["x"], t["y"]
    if test_limit:
        x_te, y_te = x_te[:test_limit], y_te[:test_limit]
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    return to(x_tr), torch.from_numpy(y_tr.astype(np.int64)), to(x_te), torch.from_numpy(y_te.astype(np.int64))


def synthetic_cifar10(n_train: int, n_test: int, seed: int):
    """Random uint8 images and labels with CIFAR-10's shapes, for throughput runs only (nothing to
    learn; the accuracy is chance)."""
    g = torch.Generator().manual_seed(seed)
    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    def labels(n: int) -> torch.Tensor:
        return torch.randint(0, 10, (n,), generator=g, dtype=torch.int64)
    return images(n_train), labels(n_train), images(n_test), labels(n_test)


def normalize(x_u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x_u8.device).view(1, 3, 1, 1)
    return (x_u8.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pad 4 (reflect) + random 32×32 crop + random horizontal flip, batched on x's device."""
    n = x.shape[0]
    xp = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (n,), generator=gen, device="cpu").to(x.device)
    dy = torch.randint(0, 9, (n,), generator=gen, device="cpu").to(x.device)
    ar = torch.arange(32, device=x.device)
    rows = (dy[:, None] + ar)[:, None, :, None]
    cols = (dx[:, None] + ar)[:, None, None, :]
    out = xp[torch.arange(n, device=x.device)[:, None, None, None],
             torch.arange(3, device=x.device)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen, device="cpu").to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


# --- model ------------------------------------------------------------------------------------


class ConvFactory:
    """3×3 convolutions: TTConv2d in the TT stages (ranks per stage), nn.Conv2d elsewhere."""

    def __init__(self, tt_stages: set[int], ranks: dict[int, int], path: str = "auto") -> None:
        self.tt_stages, self.ranks, self.path = tt_stages, ranks, path

    def __call__(self, cin: int, cout: int, stride: int, stage: int) -> nn.Module:
        if stage in self.tt_stages:
            r = self.ranks[stage]
            return TTConv2d(cin, cout, 3, stride=stride, padding=1, bias=False, ranks=(r, r),
                            path=self.path)
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, stage: int, conv: ConvFactory, dropout: float):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = conv(cin, cout, stride, stage)
        self.conv2 = conv(cout, cout, 1, stage)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if (cin != cout or stride != 1) else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(F.relu(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, conv: ConvFactory, dropout: float = 0.0,
                 classes: int = 10, tt_init: str = "kaiming"):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        blocks, cin = [], 16
        for stage, (w, s) in enumerate(zip(widths, (1, 2, 2)), start=1):
            for i in range(n):
                blocks.append(Block(cin, w, s if i == 0 else 1, stage, conv, dropout))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, TTConv2d):
                init_tt_spectral(m) if tt_init == "spectral" else init_tt_like_kaiming(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@torch.no_grad()
def init_tt_like_kaiming(m: TTConv2d) -> None:
    """Scales the last core so the reconstructed weight has the variance of kaiming_normal
    (fan_out, relu) that the dense convolutions get: 2 / (K·KH·KW)."""
    target = 2.0 / (m.out_channels * m.kernel_size[0] * m.kernel_size[1])
    m.core2.mul_(math.sqrt(target / m.full_weight().var().item()))


@torch.no_grad()
def init_tt_spectral(m: TTConv2d) -> None:
    """Spectral initialisation (Khodak et al., ICLR 2021, "Initialization and Regularization of
    Factorized Neural Layers"): the cores are the TT-SVD of the kaiming_normal weight the dense
    layer would get, truncated to the layer's ranks, instead of independent random cores."""
    w = torch.empty(m.out_channels, m.in_channels, *m.kernel_size, device=m.core0.device)
    nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
    r1, r2 = m.core0.shape[0], m.core1.shape[0]
    for core, value in zip(m.cores(), tt_svd_conv_weight(w, (r1, r2))):
        core.copy_(value.reshape(core.shape))


def frobenius_decay(model: nn.Module) -> torch.Tensor:
    """Sum of ||W||² over the TT layers' reconstructed weights. Weight decay on the cores
    penalises a product of norms (a nuclear-norm-like pressure to lower rank); decaying the
    reconstructed weight instead regularises what the dense layer would regularise (Khodak et al.,
    "Frobenius decay")."""
    terms = [tt_weight_norm_sq(m) for m in model.modules() if isinstance(m, TTConv2d)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def tt_weight_norm_sq(m: TTConv2d) -> torch.Tensor:
    """||W||² of the reconstructed weight from r×r Gram matrices, without forming W:
    W[:, :, i, j] = C2·B_ij·C0, so ||W||² = Σ_ij tr(B_ijᵀ·(C2ᵀC2)·B_ij·(C0C0ᵀ))."""
    c0 = m.core0.float().flatten(1)  # [r1, C]
    c2 = m.core2.float().flatten(1)  # [K, r2]
    b = m.core1.float()              # [r2, r1, KH, KW]
    return torch.einsum("baij,bc,cdij,da->", b, c2.T @ c2, b, c0 @ c0.T)


def param_counts(model: nn.Module) -> dict[str, int]:
    tt = sum(p.numel() for m in model.modules() if isinstance(m, TTConv2d) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    dense_equiv = total - tt + sum(
        m.parameter_counts()["dense"] for m in model.modules() if isinstance(m, TTConv2d)
    )
    return {"total": total, "tt_layers": tt, "dense_equivalent": dense_equiv}


# --- training ---------------------------------------------------------------------------------


def evaluate(model: nn.Module, x_te: torch.Tensor, y_te: torch.Tensor, args, amp) -> float:
    model.eval()
    correct = 0
    with torch.no_grad(), amp():
        for i in range(0, x_te.shape[0], 500):
            xb = normalize(x_te[i:i + 500]).contiguous(memory_format=torch.channels_last)
            correct += (model(xb).argmax(1) == y_te[i:i + 500]).sum().item()
    model.train()
    return 100.0 * correct / x_te.shape[0]


def train_one(name: str, model: nn.Module, data, args, device: torch.device) -> dict:
    x_tr, y_tr, x_te, y_te = data
    model = model.to(device).to(memory_format=torch.channels_last)
    steps_per_epoch = x_tr.shape[0] // args.batch_size
    if args.limit_batches:
        steps_per_epoch = min(steps_per_epoch, args.limit_batches)
    total = steps_per_epoch * args.epochs
    frob = args.tt_decay == "frobenius" and any(isinstance(m, TTConv2d) for m in model.modules())
    core_ids = {id(p) for m in model.modules() if isinstance(m, TTConv2d) for p in m.cores()}
    cores = [p for p in model.parameters() if id(p) in core_ids]
    others = [p for p in model.parameters() if id(p) not in core_ids]
    # With Frobenius decay the cores get no plain weight decay: the loss carries wd/2·||W||².
    groups = [{"params": others}] + ([{"params": cores, "weight_decay": 0.0 if frob else args.wd}]
                                     if cores else [])
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1))))
    use_amp = device.type == "cuda" and args.amp == "bf16"

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else torch.autocast(
            device.type, enabled=False)

    # --compile: the first step runs eagerly, so that --conv-path auto measures its plans there;
    # the compiled graphs then hold the measured choice as a constant (torchrec_tt.conv_dispatch).
    compiled = torch.compile(model, backend=args.compile) if args.compile != "none" else model
    gen = torch.Generator().manual_seed(args.seed)  # same data order and augmentation per model
    curves = {"epoch": [], "train_loss": [], "train_acc": [], "test_acc": [], "epoch_s": []}
    timed_s, timed_images = 0.0, 0  # throughput window: all steps but the first warmup ones
    warm_left = args.warmup_steps

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(x_tr.shape[0], generator=gen)
        t0 = time.perf_counter()
        t_timed, timed_from = (t0, 0) if warm_left == 0 else (None, 0)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"{name} epoch {epoch}/{args.epochs}", leave=False,
                   dynamic_ncols=True, mininterval=1.0, disable=args.no_progress)
        for step in bar:
            if t_timed is None and step == warm_left:
                sync()
                t_timed, timed_from = time.perf_counter(), step
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            xb = augment(normalize(x_tr[idx.to(x_tr.device)]), gen)
            xb = xb.contiguous(memory_format=torch.channels_last)
            yb = y_tr[idx.to(y_tr.device)]
            with amp():
                out = (model if epoch == 1 and step == 0 else compiled)(xb)
                loss = F.cross_entropy(out, yb)
            if frob:  # outside autocast: a sum of squares in fp32, not bf16
                loss = loss + 0.5 * args.wd * frobenius_decay(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 20 == 0 or step == steps_per_epoch - 1:
                loss_sum += loss.item() * yb.shape[0]
                correct += (out.argmax(1) == yb).sum().item()
                seen += yb.shape[0]
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        sync()
        t1 = time.perf_counter()
        dt = t1 - t0
        if t_timed is not None:
            timed_s += t1 - t_timed
            timed_images += (steps_per_epoch - timed_from) * args.batch_size
            warm_left = 0
        else:
            warm_left -= steps_per_epoch
        acc = evaluate(compiled, x_te, y_te, args, amp)
        curves["epoch"].append(epoch)
        curves["train_loss"].append(loss_sum / max(seen, 1))
        curves["train_acc"].append(100 * correct / max(seen, 1))
        curves["test_acc"].append(acc)
        curves["epoch_s"].append(dt)
        print(f"{name}: epoch {epoch}/{args.epochs} train loss {loss_sum / max(seen, 1):.3f} "
              f"test acc {acc:.2f}% ({dt:.1f}s)", flush=True)
    counts = param_counts(model)
    tt_layers = [m for m in model.modules() if isinstance(m, TTConv2d)]
    return {"name": name, "curves": curves, "params": counts, "final_acc": curves["test_acc"][-1],
            "best_acc": max(curves["test_acc"]), "epoch_s": float(np.median(curves["epoch_s"])),
            "images_per_s": timed_images / timed_s if timed_s > 0 else float("nan"),
            "timed_steps": timed_images // args.batch_size,
            "conv_paths": conv_paths(tt_layers) if tt_layers else {}}


def conv_paths(tt_layers: list[TTConv2d]) -> dict[str, int]:
    """How many TT layers' training calls ran each path (from the measured plans, else the
    module's or the default path): what --conv-path auto picked."""
    counts: dict[str, int] = {}
    for m in tt_layers:
        if m.path != "auto" or conv_dispatch.settings.path != "auto":
            p = m.path if m.path != "auto" else conv_dispatch.settings.path
        else:
            found = {v.path for k, v in m.plans().items() if k.train}
            p = found.pop() if len(found) == 1 else (
                "mixed" if found else conv_dispatch.default_path(m.core0.device.type, True))
        counts[p] = counts.get(p, 0) + 1
    return counts


# --- plot -------------------------------------------------------------------------------------


def plot(results: list[dict], path: Path) -> None:
    """Test accuracy and train loss per epoch. Uses matplotlib when installed; otherwise draws the
    curves (no text) into a PNG with a minimal built-in writer, so a plot always exists."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for r in results:
            c = r["curves"]
            ax[0].plot(c["epoch"], c["test_acc"], marker="o", label=f"{r['name']} ({r['final_acc']:.2f}%)")
            ax[1].plot(c["epoch"], c["train_loss"], marker="o", label=r["name"])
        ax[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="CIFAR-10 test accuracy")
        ax[1].set(xlabel="epoch", ylabel="train loss", title="training loss")
        for a in ax:
            a.grid(alpha=0.3)
            a.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return
    except ImportError:
        pass
    w, h = 640, 320
    img = np.full((h, w, 3), 255, np.uint8)
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for panel, key in enumerate(("test_acc", "train_loss")):
        x0, x1, y0, y1 = panel * w // 2 + 30, (panel + 1) * w // 2 - 10, 20, h - 30
        img[y1, x0:x1] = 0
        img[y0:y1, x0] = 0
        vals = [v for r in results for v in r["curves"][key]]
        lo, hi = min(vals), max(vals) + 1e-9
        n = max(len(r["curves"][key]) for r in results)
        for ci, r in enumerate(results):
            ys = r["curves"][key]
            pts = [(x0 + (x1 - x0) * (i / max(n - 1, 1)), y1 - (y1 - y0) * (v - lo) / (hi - lo))
                   for i, v in enumerate(ys)]
            for (ax_, ay), (bx, by) in zip(pts, pts[1:] or pts):
                for t in np.linspace(0, 1, 200):
                    px, py = int(ax_ + t * (bx - ax_)), int(ay + t * (by - ay))
                    img[max(py - 1, 0):py + 2, max(px - 1, 0):px + 2] = colors[ci % len(colors)]
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=28)
    ap.add_argument("--width", type=int, default=10, help="k of WRN-28-k")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--tt-stages", default="3", help="comma list of stages (1-3) with TT 3x3 convs")
    ap.add_argument("--tt-ranks", default="32", help="one rank for all TT stages, or one per TT stage")
    ap.add_argument("--tt", action="append", default=None, metavar="STAGES:RANKS",
                    help="a TT configuration, e.g. '3:64' or '2,3:32,64'; repeat to train several "
                    "(overrides --tt-stages/--tt-ranks)")
    ap.add_argument("--tt-init", choices=["kaiming", "spectral"], default="kaiming",
                    help="TT cores: random, scaled to kaiming variance; or the TT-SVD of a kaiming init")
    ap.add_argument("--tt-decay", choices=["cores", "frobenius"], default="cores",
                    help="weight decay on the TT cores, or on the reconstructed weights (Frobenius decay)")
    ap.add_argument("--models", default="dense,tt", help="which of dense,tt to train (same schedule)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--limit-batches", type=int, default=0, help="steps per epoch cap (0: all)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--amp", choices=["bf16", "none"], default="bf16", help="autocast on CUDA")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None)
    ap.add_argument("--train-files", default="0,1,2,3", help="which train_k.npz parts to use")
    ap.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(REPO / "runs/cnn"))
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--conv-path", "--conv_path", choices=list(conv_dispatch.PATHS), default="auto",
                    help="TT layers: auto (measured plan, or the default), fused (our op), composed "
                    "(three cuDNN convolutions through autograd)")
    ap.add_argument("--no-conv-benchmark", action="store_true",
                    help="with --conv-path auto: no measuring, the dispatch's default path")
    ap.add_argument("--compile", choices=["none", "inductor", "aot_eager", "eager"], default="none",
                    help="torch.compile the model with this backend (the first step runs eagerly)")
    ap.add_argument("--warmup-steps", type=int, default=20,
                    help="first steps left out of the images/s measurement")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="N random training images (and 1,000 test images) instead of CIFAR-10: "
                    "for throughput only")
    args = ap.parse_args(argv)
    if args.warmup_steps < 0:
        ap.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.synthetic < 0:
        ap.error(f"--synthetic must be >= 0, got {args.synthetic}")
    return args


def parse_tt_config(stages_s: str, ranks_s: str) -> tuple[list[int], dict[int, int]]:
    stages = sorted({int(x) for x in stages_s.split(",") if x.strip()})
    if not stages or not set(stages) <= {1, 2, 3}:
        raise SystemExit(f"TT stages must be among 1-3, got {stages_s!r}")
    rank_list = [int(r) for r in ranks_s.split(",")]
    if len(rank_list) not in (1, len(stages)):
        raise SystemExit(f"TT ranks {ranks_s!r}: give one rank, or one per TT stage")
    return stages, {s: rank_list[0] if len(rank_list) == 1 else rank_list[i] for i, s in enumerate(stages)}


def summary(results: list[dict]) -> str:
    dense = next((r for r in results if r["name"] == "dense"), None)
    lines = ["| model | params | compression vs dense | final test acc | best | Δ final vs dense | s/epoch "
             "| images/s | × dense | TT conv path |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["params"]
        comp = p["dense_equivalent"] / p["total"]
        delta = f"{r['final_acc'] - dense['final_acc']:+.2f}" if dense else "n/a"
        speed = f"{r['images_per_s'] / dense['images_per_s']:.2f}×" if dense else "n/a"
        paths = ", ".join(f"{k} {v}" for k, v in r.get("conv_paths", {}).items()) or "-"
        lines.append(f"| {r['name']} | {p['total']:,} | {comp:.2f}× | {r['final_acc']:.2f}% | "
                     f"{r['best_acc']:.2f}% | {delta} | {r['epoch_s']:.1f} | "
                     f"{r['images_per_s']:,.0f} | {speed} | {paths} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    # --conv-path auto measures like cudnn.benchmark above; fused / composed are per module.
    conv_dispatch.settings.benchmark = args.conv_path == "auto" and not args.no_conv_benchmark
    specs = args.tt or [f"{args.tt_stages}:{args.tt_ranks}"]
    tt_configs = [parse_tt_config(*spec.split(":")) for spec in specs]
    if args.synthetic:
        root = f"random images (--synthetic {args.synthetic}, seed {args.seed})"
        data = synthetic_cifar10(args.synthetic, args.test_limit or 1000, args.seed)
    else:
        root = find_data(args.data)
        data = load_cifar10(root, [int(k) for k in args.train_files.split(",")], args.test_limit or None)
    data = tuple(t.to(device) for t in data)
    print(f"CIFAR-10 from {root}: {data[0].shape[0]} train / {data[2].shape[0]} test images; "
          f"WRN-{args.depth}-{args.width}, TT configs {specs}, {args.epochs} epochs, device {device}, "
          f"TT conv path {args.conv_path}"
          + (" (measured)" if conv_dispatch.settings.benchmark else ""), flush=True)
    runs: list[tuple[str, set[int], dict[int, int]]] = []
    for which in args.models.split(","):
        if which == "dense":
            runs.append(("dense", set(), {}))
        elif which == "tt":
            for stages, ranks in tt_configs:
                label = f"TT s{''.join(map(str, stages))} r{'/'.join(str(ranks[s]) for s in stages)}"
                label += "".join(f" {v}" for v in (args.tt_init, args.tt_decay)
                                 if v not in ("kaiming", "cores"))
                runs.append((label, set(stages), ranks))
        else:
            raise SystemExit(f"--models: unknown model {which!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"wrn{args.depth}-{args.width}_{time.strftime('%Y%m%d-%H%M%S')}"
    results = []
    for label, stages, ranks in runs:
        torch.manual_seed(args.seed)
        model = WideResNet(args.depth, args.width, ConvFactory(stages, ranks, args.conv_path), args.dropout,
                           tt_init=args.tt_init)
        results.append(train_one(label, model, data, args, device))
        # Written after every model, so an interrupted run keeps what finished.
        (out / f"{tag}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
        plot(results, out / f"{tag}.png")
    print("\n" + summary(results))
    print(f"\ncurves: {out / (tag + '.json')}\nplot:   {out / (tag + '.png')}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
