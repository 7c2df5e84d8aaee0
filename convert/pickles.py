"""AIMv1's published torch pickles in, a safetensors checkpoint out: the one place aim-mlx unpickles anything.

Apple publishes AIMv1 only as pickles, in two forms (shared/REFERENCE.md, AIMv1):
  per-model repos  apple/aim-{600M,1B,3B,7B}: config.json + pytorch_model.bin (huggingface_hub's mixin),
                   the best-layers head only
  combined repo    apple/AIM: a backbone .pth and a head .pth per probe set, the files ml-aim's
                   load_pretrained fetches for its names (aim-600M-2B-imgs, ...); ml-aim's README publishes
                   a SHA-256 prefix for each, checked here before the file is opened
A local folder holding either form, or one of its files, works the same way. Each pickle is read with
`torch.load(weights_only=True)`, which builds tensors and plain containers and refuses anything else without
running it, and `mmap=True`, so tensors are read from disk as they are written out, one at a time, into a
staging folder (config.json + model.safetensors) that `aim-mlx convert` then converts like any checkpoint.
"""

import hashlib
import json
import logging
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from aim_mlx.checkpoints import hub
from aim_mlx.checkpoints.folder import CONFIG_FILE
from aim_mlx.checkpoints.variants import (
    AIMV1_COMBINED_REPO,
    AIMV1_FILE_STEMS,
    AIMV1_NAMES,
    AIMV1_SHA256,
    AIMV1_SIZES,
    aimv1_probe_layers,
    aimv1_pth_files,
    aimv1_size,
    find_variant,
)
from aim_mlx.errors import ConfigError, WeightsError
from aim_mlx.extras import require
from aim_mlx.registry import FAMILIES

logger = logging.getLogger("aim_mlx")

MIXIN_WEIGHTS = "pytorch_model.bin"  # what huggingface_hub's PyTorchModelHubMixin saved until mid-2024
MIN_TORCH = (2, 6)  # torch.load(weights_only=True) could run code before 2.6 (CVE-2025-32434)
_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64"}


@dataclass
class PickleSource:
    """Where a pickled AIMv1 checkpoint is and how to read it."""

    label: str  # the source convert records: a hub id or a local folder
    revision: str | None
    folder: Path
    files: list[str]  # the pickles in `folder`: the weights, or backbone then head
    config: dict  # ml-aim's constructor keys, probe_layers included

    @property
    def paths(self) -> list[Path]:
        return [self.folder / name for name in self.files]


def find_source(hf_path: str, revision: str | None, probe: str | None) -> PickleSource | None:
    """The pickled AIMv1 checkpoint `hf_path` names (downloading what the cache lacks), or None when it is
    not one (a safetensors checkpoint, or anything `hub.resolve` handles)."""
    local = Path(hf_path).expanduser()
    if local.is_file() and local.suffix in (".bin", ".pth"):
        local = local.parent
    if local.is_dir():
        return _local_source(local, probe)
    if hf_path.lower() == AIMV1_COMBINED_REPO.lower():
        raise ConfigError(
            f"{AIMV1_COMBINED_REPO} holds all four AIMv1 models; name one as ml-aim does "
            f"({', '.join(AIMV1_NAMES)}), or its own repo (apple/aim-600M, ...)"
        )
    variant = find_variant(hf_path)
    if variant is None or variant.family != "aimv1":
        return None
    if hf_path.lower() in (name.lower() for name in AIMV1_NAMES) or probe == "last":
        # ml-aim's names load the combined repo's files; the per-model repos hold no last-layers head.
        backbone, head = aimv1_pth_files(variant.size, probe or "best")
        rev = revision or "main"
        folder = hub.download_files(AIMV1_COMBINED_REPO, [backbone, head], rev)
        config = _config(variant.size, probe or "best")
        return PickleSource(AIMV1_COMBINED_REPO, _commit(folder, rev), folder, [backbone, head], config)
    rev = revision or variant.revision
    folder = hub.download_files(variant.repo_id, [CONFIG_FILE, MIXIN_WEIGHTS], rev)
    return _mixin_source(variant.repo_id, _commit(folder, rev), folder, probe)


def _local_source(folder: Path, probe: str | None) -> PickleSource | None:
    if any((folder / name).is_file() for name in hub.WEIGHT_FILES):
        return None  # safetensors first: the ordinary path reads them without torch
    if (folder / MIXIN_WEIGHTS).is_file() and (folder / CONFIG_FILE).is_file():
        return _mixin_source(str(folder.resolve()), None, folder, probe)
    for size in AIMV1_FILE_STEMS:
        backbone, head = aimv1_pth_files(size, probe or "best")
        if (folder / backbone).is_file():
            if not (folder / head).is_file():
                raise ConfigError(
                    f"{folder} has {backbone} but not {head}, the head for the {probe or 'best'} layers"
                )
            return PickleSource(
                str(folder.resolve()), None, folder, [backbone, head], _config(size, probe or "best")
            )
    return None


def _mixin_source(label: str, revision: str | None, folder: Path, probe: str | None) -> PickleSource:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except ValueError as exc:
        raise ConfigError(f"{folder / CONFIG_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or not {"embed_dim", "num_blocks", "num_heads"} <= config.keys():
        raise ConfigError(
            f"{folder} holds {MIXIN_WEIGHTS}, but aim-mlx converts pickles of AIMv1 only and its config.json "
            "is not ml-aim's (embed_dim, num_blocks, num_heads); use a safetensors checkpoint"
        )
    depth = config["num_blocks"]
    config.setdefault("probe_layers", list(range(depth - 6, depth)))  # ml-aim's default: the last six
    variant = find_variant(label)
    if probe is not None:
        FAMILIES["aimv1"].check_probe(config, probe, variant)
    size = variant.size if variant is not None else aimv1_size(config["embed_dim"], depth)
    sets = {"best": aimv1_probe_layers(size, "best") if size else (), "last": range(depth - 6, depth)}
    named = [name for name, layers in sets.items() if list(layers) == config["probe_layers"]]
    if named:
        config["probe"] = named[0]
    return PickleSource(label, revision, folder, [MIXIN_WEIGHTS], config)


def _config(size: str, probe: str) -> dict:
    """A .pth pair's config: what its file names say (the size's heads and probe set); `stage` adds the width,
    depth and patch size the backbone's tensors hold."""
    return {"img_size": 224, "num_heads": AIMV1_SIZES[size][1], "size": size, "probe": probe}


def _complete(config: dict, backbone: dict) -> dict:
    try:
        width, _, patch, _ = backbone["preprocessor.patchifier.proj.weight"].shape
    except (KeyError, ValueError):
        raise WeightsError(
            "the backbone has no 4-D preprocessor.patchifier.proj.weight; is it AIMv1's?"
        ) from None
    depth = 1 + max((int(k.split(".")[2]) for k in backbone if k.startswith("trunk.blocks.")), default=-1)
    size, probe = config.pop("size"), config["probe"]
    layers = aimv1_probe_layers(size, probe) if probe == "best" else range(depth - 6, depth)
    return {
        **config,
        "patch_size": patch,
        "embed_dim": width,
        "num_blocks": depth,
        "probe_layers": list(layers),
    }


def _commit(folder: Path, revision: str) -> str:
    """The commit a hub snapshot folder is named by."""
    return folder.name if folder.parent.name == "snapshots" else revision


def verify(path: Path) -> None:
    """Refuse a file whose SHA-256 does not start with the prefix ml-aim publishes for its name (if any)."""
    expected = AIMV1_SHA256.get(path.name)
    if expected is None:
        logger.info("%s has no published checksum; not verified", path.name)
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    actual = digest.hexdigest()
    if not actual.startswith(expected):
        raise WeightsError(
            f"{path.name} has SHA-256 {actual[:8]}..., not the {expected} ml-aim publishes: download it "
            "again (or pass --no-verify for a file you trained yourself)"
        )


def read_state(path: Path) -> dict:
    """A pickled state dict, tensors memory-mapped: weights-only, names to tensors, or a WeightsError."""
    torch = require("torch")
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        raise WeightsError(
            f"torch {torch.__version__} can run code from a pickle even with weights_only=True; "
            "pip install 'torch>=2.6' to convert pickled checkpoints"
        )
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # an old, non-zip pickle
    except pickle.UnpicklingError as exc:
        # torch's message is a paragraph; the reason follows "WeightsUnpickler error:" on the next lines.
        detail = str(exc).partition("WeightsUnpickler error:")[2].strip().splitlines()
        reason = detail[0].strip() if detail else "it holds more than tensors"
        raise WeightsError(
            f"{path.name} was refused unread by torch's weights-only loader ({reason})"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise WeightsError(f"{path.name} is not a readable torch checkpoint ({_first_line(exc)})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsError(f"{path.name} is not a plain state dict (tensor names to tensors)")
    return state


def stage(source: PickleSource, folder: Path, check: bool = True) -> None:
    """Write `source` into `folder` as config.json + model.safetensors (ml-aim's key names, as stored).
    `check`: verify published checksums first."""
    if check:
        for path in source.paths:
            verify(path)
    states = [read_state(path) for path in source.paths]
    if len(states) == 2 and (overlap := states[0].keys() & states[1].keys()):
        raise WeightsError(f"{source.files[0]} and {source.files[1]} both hold {sorted(overlap)[0]}")
    config = _complete(dict(source.config), states[0]) if "size" in source.config else source.config
    write_safetensors([item for state in states for item in state.items()], folder / "model.safetensors")
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def write_safetensors(tensors: list, path: Path) -> None:
    """(name, torch tensor) pairs as one safetensors file, written a tensor at a time: each memory-mapped
    tensor is read from its pickle as it is written, so no second copy of the checkpoint is held."""
    torch = require("torch")
    header, offset = {}, 0
    for name, tensor in tensors:
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise WeightsError(f"{name} is {dtype}; AIMv1 checkpoints hold floating-point tensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, tensor in tensors:
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
