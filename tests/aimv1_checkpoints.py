"""Random-weight AIMv1 checkpoints in the published formats, and a torch reference to check against.

The reference is written here from the architecture (shared/REFERENCE.md, AIMv1; ml-aim's aim-v1 torch
model), not from aim_mlx: patch conv + LayerNorm, 2-D sin-cos positions, pre-norm blocks (LayerNorm eps 1e-6
with bias, fused qkv attention and a GELU MLP, no biases), a final LayerNorm the classifier does not use, and
the attention-probe head (mean of the probed blocks, BatchNorm1d without affine, one learned query, Linear
D -> classes without bias). Its module names are ml-aim's, so `state_dict()` has the published key names.

The repos apple/aim-{600M,1B,3B,7B} were pushed by huggingface_hub's PyTorchModelHubMixin for ml-aim's
`AIMForImageClassification(config)`: config.json is that config dict (img_size, patch_size, embed_dim,
num_blocks, num_heads and, in the final uploads, probe_layers) and the weights are the state dict.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

# Tiny stand-ins with each published size's head count (head_dim 8) and eight blocks.
TINY = {
    "600M": dict(embed_dim=96, num_heads=12),
    "1B": dict(embed_dim=128, num_heads=16),
    "3B": dict(embed_dim=192, num_heads=24),
    "7B": dict(embed_dim=256, num_heads=32),
}


def sincos(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """MAE-style 2-D table: half the channels encode the column index, half the row index, each half
    [sin | cos] of position * 1/10000^(i / (dim/4))."""

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        angles = pos.double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.cat([one_axis(cols.flatten()), one_axis(rows.flatten())], dim=1).float()  # (N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, n, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # each (B, H, N, hd)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim)

    def forward(self, x):
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class Patchifier(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim, eps=1e-6)


class Preprocessor(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.patchifier = Patchifier(dim, patch)

    def forward(self, x):  # (B, 3, H, W)
        tokens = self.patchifier.proj(x)  # (B, D, h, w)
        h, w = tokens.shape[-2:]
        tokens = self.patchifier.norm(tokens.flatten(2).transpose(1, 2))  # (B, N, D), rows outer
        return tokens + sincos(h, w, tokens.shape[-1])


class Trunk(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.post_trunk_norm = nn.LayerNorm(dim, eps=1e-6)


class Head(nn.Module):
    def __init__(self, dim: int, heads: int, classes: int):
        super().__init__()
        self.heads = heads
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, classes, bias=False)
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)

    def pool(self, x):  # (B, N, D) -> (B, D)
        b, n, d = x.shape
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)  # over channels, with the running statistics
        hd = d // self.heads
        q = self.cls_token.expand(b, 1, d).reshape(b, 1, self.heads, hd).transpose(1, 2)  # (B, H, 1, hd)
        k = self.k(x).reshape(b, n, self.heads, hd).transpose(1, 2)
        v = self.v(x).reshape(b, n, self.heads, hd).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, H, 1, hd)
        return out.transpose(1, 2).reshape(b, d)


class ReferenceAIMv1(nn.Module):
    """AIMv1 with its classifier, in eval mode; `run(pixels_nchw)` gives every intermediate."""

    def __init__(
        self, embed_dim, num_heads, num_blocks=8, probe_layers=(2, 3, 4, 5, 6, 7), patch=14, classes=1000
    ):
        super().__init__()
        self.config = dict(
            img_size=224, patch_size=patch, embed_dim=embed_dim, num_blocks=num_blocks, num_heads=num_heads
        )
        self.probe_layers = tuple(probe_layers)
        self.preprocessor = Preprocessor(embed_dim, patch)
        self.trunk = Trunk(embed_dim, num_heads, num_blocks)
        self.head = Head(embed_dim, num_heads, classes)

    @torch.no_grad()
    def run(self, pixels_nchw: torch.Tensor) -> dict:
        x = self.preprocessor(pixels_nchw)
        blocks = []
        for block in self.trunk.blocks:
            x = block(x)
            blocks.append(x)
        probed = torch.stack([blocks[i] for i in self.probe_layers]).mean(0)
        features = self.head.pool(probed)
        return {
            "blocks": [b.numpy() for b in blocks],
            "final": self.trunk.post_trunk_norm(x).numpy(),
            "probed": probed.numpy(),
            "features": features.numpy(),
            "logits": self.head.linear(features).numpy(),
        }

    def outputs(self, pixels_nhwc: np.ndarray) -> dict:
        return self.run(torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2))))


def make_reference(seed: int = 0, **dims) -> ReferenceAIMv1:
    """Seeded random weights; norms, biases, the query and the BatchNorm statistics too, so all matter."""
    torch.manual_seed(seed)
    model = ReferenceAIMv1(**dims).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            elif name.endswith("cls_token"):
                p.copy_(torch.randn_like(p))
        model.head.bn.running_mean.copy_(0.2 * torch.randn_like(model.head.bn.running_mean))
        model.head.bn.running_var.uniform_(0.5, 2.0)
        model.head.bn.num_batches_tracked.fill_(1234)
    return model


def write_checkpoint(
    model: ReferenceAIMv1, folder: Path, probe_layers="listed", weights="safetensors"
) -> Path:
    """`model` as a hub repo folder. probe_layers: "listed" writes the model's list into config.json (the
    final uploads), None leaves it out (the first 600M upload; ml-aim then probes the last 6). weights:
    "safetensors" (model.safetensors, as huggingface_hub's mixin saves now) or "pickle" (pytorch_model.bin,
    as it saved in January 2024, when Apple pushed the repos)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(model.config)
    if probe_layers == "listed":
        config["probe_layers"] = list(model.probe_layers)
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


# The combined repo apple/AIM's file name stems, as ml-aim's README links them.
PTH_STEMS = {"600M": "aim_600m_2bimgs", "1B": "aim_1b_5bimgs", "3B": "aim_3b_5bimgs", "7B": "aim_7b_5bimgs"}


def write_pth_pair(model: ReferenceAIMv1, folder: Path, size: str, probe: str) -> list[Path]:
    """`model` as apple/AIM publishes it: the backbone and the `probe` head as two pickled state dicts
    (torch.save, as ml-aim's load_pretrained reads them back with torch.load), named as the README lists
    them. Returns [backbone, head]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    paths = [
        folder / f"{PTH_STEMS[size]}_attnprobe_backbone.pth",
        folder / f"{PTH_STEMS[size]}_attnprobe_head_{probe}_layers.pth",
    ]
    torch.save({k: v for k, v in state.items() if not k.startswith("head.")}, paths[0])
    torch.save({k: v for k, v in state.items() if k.startswith("head.")}, paths[1])
    return paths
