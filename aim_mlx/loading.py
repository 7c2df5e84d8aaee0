"""`load()`: a hub id or a local folder in, `(model, processor)` out, built through the family registry."""

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx

from .checkpoints import hub, weights
from .checkpoints.folder import CONFIG_FILE
from .checkpoints.variants import find_variant
from .errors import ConfigError
from .log import logger, warn_once
from .models import quantized
from .platform import backends, devices, malloc
from .registry import ModelInfo, family_of

DTYPES = {name: getattr(mx, name) for name in devices.DTYPES}  # the one list of names, as MLX dtypes
_COMMIT = re.compile(r"[0-9a-f]{40}")


def default_dtype() -> str:
    """AIM_MLX_DTYPE if set; otherwise float16 on a GPU (Apple's, or NVIDIA's with MLX's CUDA build), float32
    on a CPU (MLX's CPU float16 matmul has no BLAS path). Puts platform/devices.py's device choice in place
    first; the dtype then follows MLX's default device, also where a caller set it."""
    devices.apply()  # a mistyped AIM_MLX_DEVICE, or a GPU asked for where there is none, fails here
    return _device_dtype()


def _device_dtype() -> str:
    """The default dtype on MLX's default device as it is now."""
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    return devices.dtype_for(device, os.environ.get("AIM_MLX_DTYPE", ""))


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{folder} has no config.json; pass a folder holding an AIMv2 checkpoint") from exc
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from exc


def fill(model, raw: dict, state: dict[str, mx.array], folder: Path, dtype: mx.Dtype):
    """Put a checkpoint's weights into a freshly built `model`: the quantized layers a converted folder's
    config.json records first, then a strict load, the compute dtype, and evaluation (loads are lazy)."""
    if "quantization" in raw:  # a converted folder (aim-mlx convert -q): swap in its quantized layers
        quantized.from_config(model, raw["quantization"], state)
    weights.load_into(model, state, source=str(folder))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def load(path_or_id: str, revision: str | None = None, dtype: str | None = None, probe: str | None = None):
    """Load an AIM checkpoint from the hub (at the revision ml-aim pins, unless `revision` says otherwise) or
    from a local folder (a checkpoint in any published layout, or one `aim-mlx convert` wrote).

    Returns `(model, processor)`. `processor(images)` gives NHWC float32 pixels; `model.encode_image(pixels)`
    pooled (B, D) embeddings, `model(pixels)` a VisionOutput (LiT: `model(pixels, texts)` logits, and
    `encode_text`); `model.info` says what was loaded (family, source, revision, dims, dtype) and its `key`
    identifies it for caches. `dtype` is float32, float16 or bfloat16 (default: AIM_MLX_DTYPE if set, else
    float16 on a GPU, float32 on a CPU, where half precision is 20-30x slower). The device is MLX's default,
    as platform/devices.py sets it (AIM_MLX_DEVICE). On a CPU with the fast BLAS, float32 blocks run in the
    numpy backend (platform/backends.py; AIM_MLX_BACKEND=mlx keeps them in MLX); results are the same.
    `probe` ("best" or "last", AIMv1 only) says which attention-probe head you expect; a checkpoint holds one
    (its config.json's probe_layers), and a different one is an error. None: the checkpoint's own.
    """
    devices.apply()  # the device, decided once; a bad AIM_MLX_DEVICE fails before any download
    dtype = dtype or _device_dtype()
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    backend = backends.choose(dtype)  # a mistyped AIM_MLX_BACKEND fails before the download, not after
    # Not for AIM_MLX_DTYPE's choice (made once for the environment), however it arrives: as the default,
    # or passed on by a caller that read the default (bench, a photo library reloading its model).
    if dtype != "float32" and mx.default_device() == mx.cpu and dtype != _device_dtype():
        warn_once(
            f"{dtype} on a CPU runs 20-30x slower than float32 (MLX's CPU has no half-precision matmul "
            "kernels); float32 is the fast dtype here"
        )
    found = origin(path_or_id, revision)
    folder, raw, variant, family = found.folder, found.raw, found.variant, found.family
    if family.on_base:
        if probe is not None:
            raise ConfigError(f"{path_or_id} is a trained probe head; --probe applies to AIMv1 models")
        return load_head(found, dtype)
    if probe is not None:  # checked on config.json, before any weights are read
        if family.check_probe is None:
            raise ConfigError(f"{path_or_id} has no attention-probe head; --probe applies to AIMv1 models")
        family.check_probe(raw, probe, variant)
    state = weights.read_folder(folder)
    config = family.config(raw, state, variant)  # the one reading of config.json into the model's config
    processor = family.processor(folder, config, variant)
    info = found.info(config.dims, dtype, backend="mlx" if backend is None else backend.name)
    text = {"tokenizer": processor.tokenizer} if family.text else {}  # encode_text takes strings
    model = family.model(config, backend=backend, info=info, **text)
    fill(model, raw, family.sanitize(state, config.num_channels), folder, DTYPES[dtype])
    del state
    malloc.release_freed_memory()  # the checkpoint's load-time copies (e.g. before an upcast) are garbage now
    logger.info("loaded %s (%s, %s, %s backend)", path_or_id, folder, dtype, info.backend)
    return model, processor


def load_head(found: "Origin", dtype: str):
    """A head folder `aim-mlx train` wrote: its base model, loaded by the source and revision its config.json
    records and refused unless its identity (ModelInfo.key, compared in the dtype it was trained in) is the
    recorded one, then the probe's weights, strictly loaded, in float32."""
    config = found.family.config(found.raw, {}, None)
    base_record = config.base
    base, processor = load(base_record["source"], revision=base_record.get("revision"), dtype=dtype)
    if replace(base.info, dtype=base_record["dtype"]).key != base_record["key"]:
        raise ConfigError(
            f"{found.folder}: its base model {base_record['source']} is not the one the head was trained on "
            "(its identity changed: other weights, files or revision); train the head again on this model"
        )
    info = found.info(dict(base.dims, num_classes=config.num_classes), dtype, backend=base.info.backend)
    model = found.family.model(config, base=base, info=info)
    weights.load_into(model.head, weights.read_folder(found.folder), source=str(found.folder))
    mx.eval(model.head.parameters())
    logger.info("loaded the %s probe %s on %s", config.probe, found.folder, base_record["source"])
    return model, processor


@dataclass
class Origin:
    """Where a checkpoint comes from, known without reading its weights: the folder, its config.json, its
    variant and family, and the fields of its identity that do not depend on the built model."""

    folder: Path
    raw: dict
    variant: object  # a variants.Variant, or None
    family: object  # a registry.Family
    source: str
    revision: str | None
    files: list

    def info(self, dims: dict, dtype: str, backend: str = "mlx") -> ModelInfo:
        """The identity of this checkpoint built with `dims` in `dtype` (what load() attaches as `info`)."""
        quantization = self.raw.get("quantization")
        return ModelInfo(
            self.family.name, self.source, self.revision, dims, dtype, quantization, self.files, backend
        )


def origin(path_or_id: str, revision: str | None = None) -> Origin:
    """Resolve a hub id (downloading what the cache lacks) or a local folder, and read its config.json."""
    folder = hub.resolve(path_or_id, revision)
    local = Path(path_or_id).expanduser().is_dir()
    variant = None if local else find_variant(path_or_id)
    raw = read_config(folder)
    return Origin(
        folder=folder,
        raw=raw,
        variant=variant,
        family=family_of(raw, variant),
        source=str(folder.resolve()) if local else (variant.repo_id if variant else path_or_id),
        revision=None if local else (folder.name if _COMMIT.fullmatch(folder.name) else revision),
        files=_file_stats(folder) if local else [],
    )


def _file_stats(folder: Path) -> list:
    """A local folder's files as (name, size, mtime): what tells an edited checkpoint from the one cached."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file()]
