"""Training-step throughput: ramcli's step vs an official-style step, same model and batch.

    .venv/bin/python bench/train_step.py [--preset tiny|swin_b] [--batch 32] [--steps 10]

Official-style = what the official pretrain.py does: fp32, attention through the plain math
path (no fused kernels), no gradient checkpointing. ramcli's step = bf16 autocast on CUDA and
PyTorch's fused scaled-dot-product attention (flash / memory-efficient kernels). Both run a full
RAM step (Swin + recognition decoder + tag encoder + text decoder, ASL + LM losses, AdamW) on
random images and captions, measured in the same process. Goal on GPU: >= 1.5x.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ramcli.models.caption import CaptionTokenizer
from ramcli.models.labels import LabelSet
from ramcli_train import losses
from ramcli_train.config import resolve
from ramcli_train.model import TrainableRAM, label_embeddings

CAPTION = "a picture of a man riding a red bicycle down a busy city street next to a bus"


def build(preset: str, device: torch.device) -> tuple[TrainableRAM, int]:
    cfg = resolve(preset, overrides={"family": "ram", "pretrained_backbone": False})
    classes = 4585 if preset != "tiny" else 50
    labels = LabelSet(tuple(f"tag{i}" for i in range(classes)), tuple(f"tag{i}" for i in range(classes)), (0.68,) * classes)
    arch = cfg.arch(classes)
    tok = CaptionTokenizer.from_vocab()
    ccfg = cfg.caption_config(arch, len(tok))
    torch.manual_seed(0)
    model = TrainableRAM(arch, labels, label_embeddings(labels, arch, "random"), ccfg, tok).to(device)
    return model, cfg.image_size


def run(model, size, batch, steps, device, fast: bool) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.05)
    images = torch.randn(batch, 3, size, size, device=device)
    classes = model.arch.num_classes
    tags = (torch.rand(batch, classes, device=device) < 5 / classes).float()
    captions = [CAPTION] * batch
    backend = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if fast else [SDPBackend.MATH]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast and device.type == "cuda")

    def step():
        with sdpa_kernel(backend), amp:
            loss = losses.combine(model(images, tags, tags, captions))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=["tiny", "swin_b", "swin_l"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, size = build(args.preset, device)
    model.train()
    official = run(model, size, args.batch, args.steps, device, fast=False)
    ours = run(model, size, args.batch, args.steps, device, fast=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.preset} batch {args.batch} on {name}")
    print(f"{'step':<34}{'img/s':>10}")
    print(f"{'official-style (fp32, math attn)':<34}{official:>10.1f}")
    print(f"{'ramcli (bf16 autocast, fused attn)':<34}{ours:>10.1f}")
    print(f"speed-up {ours / official:.2f}x (goal >= 1.5x on GPU)")


if __name__ == "__main__":
    main()
