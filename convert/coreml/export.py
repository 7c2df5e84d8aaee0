"""Core ML export: `export_coreml` checks the options, builds the programs, converts, describes and writes.

No torch: the weights come from `aim_mlx.load` (any published layout, strictly loaded) as numpy arrays and
the graph is written op by op. The modules depend one way: this entry point -> the programs
(vision.py, lit.py, aimv1.py) -> their layers (layers.py); --compress is compress.py and --check is
check.py, which reads packages back from disk through evaluator.py (placement.py on macOS) and imports none
of the others.

A vision checkpoint becomes one `.mlpackage`; an AIMv1 checkpoint one classifier package,
NAMEClassifier.mlpackage (image -> `classLabel`, `classLabel_probs` over ImageNet-1k: its head's softmax,
programs in aimv1.py); the LiT checkpoint becomes a folder (NAME: see `model_name`):
  NAMEImageEncoder.mlpackage  image -> `image_embeds` (1, P), L2-normalised, in the shared space
  NAMETextEncoder.mlpackage   `input_ids` int32 (1, 77) -> `text_embeds` (1, P), L2-normalised
  NAMEClassifier.mlpackage    with labels: image -> `classLabel` and `classLabel_probs` (a Core ML classifier)
  tokenizer/                  the checkpoint's CLIP BPE files (pad with the end-of-text id, context 77)
  lit.json                    package names, logit scale, token ids, context length, image size, mean/std, ...
  label_embeddings.json       with labels: the labels, the prompt template and their (L, P) text embeddings
Either appears whole or not at all (aim_mlx.files.atomic_folder), and only once --check has passed.

Xcode generates a Swift class named after each package file, so the names are valid Swift identifiers and
say which model they hold: two packages called ImageEncoder in one app would collide.
"""

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aim_mlx import __version__
from aim_mlx.checkpoints import hub
from aim_mlx.checkpoints.folder import TOKENIZER_FILES
from aim_mlx.checkpoints.variants import find_variant
from aim_mlx.errors import AimMlxError, ConfigError
from aim_mlx.extras import require
from aim_mlx.files import atomic_folder, normal_mode
from aim_mlx.inputs.preprocess import MAX_PATCHES, MIN_PATCHES
from aim_mlx.loading import load, read_config
from aim_mlx.models.config import AIMv1Config
from aim_mlx.registry import family_of
from aim_mlx.tasks.heads import distinct_head_labels

from . import aimv1 as coreml_aimv1
from . import lit as coreml_lit
from . import probe as coreml_probe
from . import vision as coreml_vision
from .check import check_head_classifier, check_lit, check_package
from .compress import COMPRESSIONS, compress_model

logger = logging.getLogger("aim_mlx")

PRECISIONS = ("float16", "float32")
TARGETS = ("macOS14", "iOS17", "macOS15", "iOS18")
INPUTS = ("image", "tensor")
OUTPUTS = ("pooled", "pooled,tokens")
LICENSE_TEXT = {"apple-amlr": "Apple Machine Learning Research Model License (apple-amlr)"}
SWIFT_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SPELLING = {"aimv2": "AIMv2", "aim": "AIM", "lit": "LiT"}  # how the names' words are written in CamelCase


@dataclass
class ExportResult:
    path: Path
    seconds: float
    size_bytes: int
    check: dict | None = None  # see check.check_package
    metadata: dict = field(default_factory=dict)  # the packages' user-defined metadata (strings)


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise ConfigError(f"unknown {option} {value!r}; choose one of {', '.join(choices)}")
    return value


def validate_options(
    output: Path | None,
    precision: str,
    compress: str,
    target: str,
    input_kind: str,
    outputs: str,
    force: bool,
) -> None:
    """The options, checked before anything is loaded or written (the output's suffix depends on the
    checkpoint's kind: export_coreml checks it once config.json is read)."""
    _choice(precision, PRECISIONS, "--precision")
    _choice(compress, COMPRESSIONS, "--compress")
    _choice(target, TARGETS, "--min-deployment-target")
    _choice(input_kind, INPUTS, "--input")
    _choice(outputs.replace(" ", ""), OUTPUTS, "--outputs")
    if compress == "int4" and target in ("macOS14", "iOS17"):
        raise ConfigError(
            f"--compress int4 needs per-block quantization, which Core ML has from macOS15/iOS18; "
            f"pass --min-deployment-target macOS15 or iOS18 (got {target}), or use --compress int8"
        )
    if output is not None and output.exists() and not force:
        raise ConfigError(f"{output} already exists; pass --force to replace it")


def model_name(source: str, native_size: int | None = None) -> str:
    """The checkpoint's name as a Swift identifier in CamelCase, e.g. apple/aimv2-large-patch14-224-lit ->
    AIMv2LargePatch14_224LiT (a word that starts with a digit gets an underscore before it, so that 14 and
    224 stay apart). The native checkpoint's packages hold one input size, which the name ends with."""
    words = [w for w in re.split(r"[^0-9A-Za-z]+", source.rstrip("/").split("/")[-1]) if w]
    if native_size is not None:
        words.append(str(native_size))
    name = ""
    for word in words:
        word = SPELLING.get(word.lower(), word[:1].upper() + word[1:])
        name += f"_{word}" if word[0].isdigit() else word
    name = name.lstrip("_")
    return name if name and not name[0].isdigit() else f"AIM_{name}"


def _check_swift_name(output: Path, default: str) -> None:
    """Warn when Xcode could not use the package's file name as its generated Swift class name."""
    if not SWIFT_IDENTIFIER.fullmatch(output.stem):
        logger.warning(
            "%s: Xcode names the Swift class it generates after the package file, and %r is not a Swift "
            "identifier, so the class cannot carry that name; name the package e.g. %s.mlpackage (letters, "
            "digits and _, not starting with a digit)",
            output.name,
            output.stem,
            default,
        )


def package_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _source_revision(folder: Path) -> str:
    """The hub commit of a cached snapshot (its folder name), or `local` for a user's folder."""
    return folder.name if folder.parent.name == "snapshots" else "local"


def export_coreml(
    model: str,
    output: str | Path | None = None,
    *,
    revision: str | None = None,
    precision: str = "float16",
    compress: str = "none",
    image_size: int | None = None,
    target: str = "iOS17",
    input_kind: str = "image",
    outputs: str = "pooled",
    check: bool = False,
    force: bool = False,
    labels: list[str] | None = None,
) -> ExportResult:
    """Export an AIMv2 checkpoint (hub id or folder) to Core ML at `output` (default: the current folder,
    named after the checkpoint by `model_name`).

    A vision checkpoint becomes one `.mlpackage`: one (1, 3, S, S) input, `image` (RGB, 0-255; resize and
    centre-crop to S first) or, with input_kind="tensor", normalised `pixel_values`; outputs `image_embeds`
    (1, D) float32, the mean of the final tokens, and with outputs="pooled,tokens" also `last_hidden_state`
    (1, N, D). An AIMv1 checkpoint becomes a Core ML classifier package over its head's ImageNet-1k labels
    (same input; no --labels, --outputs pooled,tokens or other --image-size). The LiT checkpoint becomes a
    folder with an image and a text package (see the module doc), and with `labels` a classifier package
    and the labels' precomputed embeddings.
    `check` verifies the result against MLX (check.py) and writes nothing if it misses its bound.
    """
    output = None if output is None else Path(output).expanduser()
    outputs = outputs.replace(" ", "")
    validate_options(output, precision, compress, target, input_kind, outputs, force)
    require("coremltools")  # before minutes of loading, not after
    if check:
        require("skimage")
    start = time.perf_counter()
    folder = hub.resolve(model, revision)
    raw = read_config(folder)
    lit = family_of(raw).text
    aimv1 = family_of(raw).name == "aimv1"
    probe = family_of(raw).on_base  # a head from aim-mlx train, on its base model
    if aimv1:  # before the weights are read
        _check_aimv1_options(model, AIMv1Config.from_dict(raw), image_size, outputs, labels)
    if probe:
        _check_probe_options(model, image_size, outputs, labels)
    if output is not None and lit and output.suffix == ".mlpackage":
        raise ConfigError(
            f"{output}: the LiT checkpoint exports a folder (image and text packages, tokenizer, lit.json); "
            "name -o without .mlpackage"
        )
    if output is not None and not lit and output.suffix != ".mlpackage":
        raise ConfigError(f"{output}: Core ML ML programs are saved as packages; name the output *.mlpackage")
    if labels is not None and not lit:
        raise ConfigError(f"{model} has no text tower: label embeddings need the LiT (zero-shot) checkpoint")
    net, processor = load(model, revision=revision, dtype="float32")
    vision = net.config.vision if lit else net.base.config if probe else net.config
    if probe:
        head_weights = coreml_probe.probe_weights(net)  # refuses a base it cannot build, before more work
    size = vision.image_size if aimv1 or probe else _image_size(vision, image_size)
    # A folder written by `aim-mlx convert` records where it came from; a head, its base model.
    source = net.base.info.source if probe else raw.get("source_model") or model
    variant = None if Path(source).expanduser().is_dir() else find_variant(source)
    # The name needs the loaded config: a native folder in Apple's layout says so only by its weights.
    native = vision.is_native and not aimv1  # AIMv1's sin-cos positions, but one size: its head's
    name = model_name(variant.repo_id if variant else source, size if native else None)
    if probe:  # named after the head folder: birds-head -> BirdsHeadClassifier
        name = model_name(Path(model).expanduser().resolve().name)
    if aimv1 or probe:
        name += "Classifier"
    if output is None:  # checked now, after loading, since the name comes from the checkpoint
        output = Path(name if lit else f"{name}.mlpackage")
        validate_options(output, precision, compress, target, input_kind, outputs, force)
    elif not lit:
        _check_swift_name(output, name)
    options = {"precision": precision, "compress": compress, "target": target}
    options.update(input_kind=input_kind, outputs=outputs)
    image_processor = processor.image if lit else processor
    # Numbers stay numbers here (lit.json); Core ML's user-defined metadata holds strings (see _strings).
    facts = {
        "source_model": variant.repo_id if variant else source,
        "source_revision": net.base.info.revision or "local"
        if probe
        else raw.get("source_revision") or _source_revision(folder),
        "license": variant.license if variant else "see the source checkpoint",
        "image_mean": [float(v) for v in image_processor.image_mean],
        "image_std": [float(v) for v in image_processor.image_std],
        "image_size": size,
        "embedding_size": vision.hidden_size,
        "precision": precision,
        "compression": compress,
        "input": input_kind,
        "aim_mlx_version": __version__,
    }
    if aimv1:  # ml-aim's preprocessing resizes to 256 before the 224 crop
        facts["model_family"] = "AIMv1"
        facts["resize_shortest_edge"] = int(image_processor.size["shortest_edge"])
        facts["probe_layers"] = [int(i) for i in vision.probe_layers]
    if probe:
        facts["head"] = str(Path(model).expanduser().resolve().name)
        facts["probe"] = net.config.probe
        if isinstance(image_processor.size, dict) and "shortest_edge" in image_processor.size:
            facts["resize_shortest_edge"] = int(image_processor.size["shortest_edge"])
        if net.config.blocks is not None:
            facts["probe_layers"] = [int(i) for i in net.config.blocks]

    try:
        with atomic_folder(output, replace=force) as staging:
            if lit:
                _write_lit(net, processor, folder, staging, options, facts, name, labels)
                report = check_lit(staging, net) if check else None
            else:
                # coremltools saves only to a path named *.mlpackage: the package is saved inside the staging
                # folder, checked there, then its contents move up so that the staging folder is the package.
                package = staging / output.name
                if aimv1 or probe:
                    if aimv1:
                        mlmodel = _aimv1_model(net, image_processor, options, facts)
                    else:
                        mlmodel = _probe_model(net, head_weights, image_processor, options, facts)
                    _save(mlmodel, package)
                    report = check_head_classifier(package, net) if check else None
                else:
                    _save(_vision_model(net, image_processor, size, options, facts), package)
                    report = check_package(package, net) if check else None
                for part in package.iterdir():
                    part.rename(staging / part.name)
                package.rmdir()
            if report is not None and not report["passed"]:
                raise AimMlxError(f"--check failed, nothing written: {report['summary']}")
    except OSError as exc:  # the writes above: a full disk, a read-only folder, a file in the path
        raise AimMlxError(f"cannot write {output} ({exc}); choose a writable location") from exc
    seconds = time.perf_counter() - start
    logger.info("exported %s to %s in %.1f s", model, output, seconds)
    return ExportResult(output, seconds, package_size(output), report, _strings(facts))


def _vision_model(net, image_processor, size: int, options: dict, facts: dict):
    """The vision checkpoint's converted, compressed and described model."""
    program = coreml_vision.build_program(
        coreml_vision.vision_weights(net),
        net.config,
        size,
        image_processor.image_mean,
        image_processor.image_std,
        image_processor.rescale_factor,
        options["input_kind"],
        options["outputs"] == "pooled,tokens",
        _opset(options),
    )
    mlmodel = convert_program(program, options, size)
    tokens = ((size // net.config.patch_size) ** 2, net.config.hidden_size)
    describe(mlmodel, facts, options["input_kind"], size, net.config.hidden_size, tokens)
    return mlmodel


def _check_aimv1_options(model: str, config, image_size, outputs: str, labels) -> None:
    """Refuse the options that do not apply to an AIMv1 classifier, before anything is loaded."""
    if labels is not None:
        raise ConfigError(
            f"{model} is an AIMv1 classifier: its labels are its head's ImageNet-1k classes; drop --labels "
            "(--labels takes the LiT checkpoint)"
        )
    if outputs != "pooled":
        raise ConfigError(
            f"{model} exports as a classifier (labels and probabilities); drop --outputs {outputs}"
        )
    if image_size not in (None, config.image_size):
        raise ConfigError(
            f"--image-size {image_size}: the AIMv1 head was trained on {config.image_size}x"
            f"{config.image_size} crops; drop --image-size"
        )


def _aimv1_model(net, image_processor, options: dict, facts: dict):
    """The AIMv1 checkpoint's Core ML classifier: its head's softmax over the ImageNet-1k labels."""
    config, size = net.config, net.config.image_size
    w = coreml_aimv1.aimv1_weights(net)
    pool = coreml_aimv1.head_probabilities(w, config.num_attention_heads, net.head.bn.eps)
    program = coreml_vision.build_program(
        w,
        config,
        size,
        image_processor.image_mean,
        image_processor.image_std,
        image_processor.rescale_factor,
        options["input_kind"],
        False,
        _opset(options),
        pool=pool,
        probe_layers=tuple(config.probe_layers),
    )
    # Core ML's probabilities are a label -> probability dictionary: the labels must be distinct
    labels = distinct_head_labels(net)
    mlmodel = classifier_model(program, labels, options, size, facts)
    blocks = ", ".join(str(i) for i in config.probe_layers)
    mlmodel.short_description = (
        f"AIMv1 ImageNet-1k classifier ({facts['source_model']}): a {size}x{size} image to one of "
        f"{len(labels)} classes (attention probe over the mean of blocks {blocks}, 0-based)."
    )
    return mlmodel


def _check_probe_options(model: str, image_size, outputs: str, labels) -> None:
    """Refuse the options that do not apply to a trained head's classifier, before anything is loaded."""
    if labels is not None:
        raise ConfigError(f"{model} is a trained head: its labels are its own classes; drop --labels")
    if outputs != "pooled":
        raise ConfigError(
            f"{model} exports as a classifier (labels and probabilities); drop --outputs {outputs}"
        )
    if image_size is not None:
        raise ConfigError(
            f"--image-size {image_size}: a head exports at its base model's size; drop --image-size"
        )


def _probe_model(net, weights, image_processor, options: dict, facts: dict):
    """A trained head's Core ML classifier: its softmax over its labels, on its base's trunk."""
    base_w, head_w = weights
    config, vision = net.config, net.base.config
    size = vision.image_size
    pool = coreml_probe.probe_probabilities(head_w, config, (size // vision.patch_size) ** 2, net.head.bn.eps)
    program = coreml_vision.build_program(
        {**base_w, **head_w},
        vision,
        size,
        image_processor.image_mean,
        image_processor.image_std,
        image_processor.rescale_factor,
        options["input_kind"],
        False,
        _opset(options),
        pool=pool,
        probe_layers=None if config.blocks is None else tuple(config.blocks),
    )
    labels = distinct_head_labels(net)
    mlmodel = classifier_model(program, labels, options, size, facts)
    over = "the final tokens" if config.blocks is None else f"the mean of blocks {config.blocks}"
    mlmodel.short_description = (
        f"Image classifier trained with aim-mlx on {facts['source_model']}: a {size}x{size} image to one of "
        f"{len(labels)} classes ({config.probe} probe over {over})."
    )
    return mlmodel


def _write_lit(
    net, processor, folder: Path, output: Path, options: dict, facts: dict, name: str, labels=None
) -> None:
    """Write the LiT folder's contents into `output` (the staging folder); packages are named after `name`."""
    image_w, text_w = coreml_lit.lit_weights(net)
    vision, size = net.config.vision, net.config.vision.image_size
    heads = vision.num_attention_heads

    def image_program(pool, tokens: bool):
        """The image tower with `pool` on its final tokens (the image package's and the classifier's)."""
        p, kind = processor.image, options["input_kind"]
        mean, std, rescale = p.image_mean, p.image_std, p.rescale_factor
        opset = _opset(options)
        return coreml_vision.build_program(
            image_w, vision, size, mean, std, rescale, kind, tokens, opset, pool=pool
        )

    pool = coreml_lit.image_pool(image_w, heads)
    image = convert_program(image_program(pool, _tokens(options)), options, size)
    projection = int(image_w["image_projector.weight"].shape[0])
    facts = {**facts, "embedding_size": projection}
    tokens = ((size // vision.patch_size) ** 2, vision.hidden_size)
    describe(image, facts, options["input_kind"], size, projection, tokens)
    image.output_description["image_embeds"] = f"(1, {projection}) float32, L2-normalised (shared space)"
    packages = {
        "image_package": f"{name}ImageEncoder.mlpackage",
        "text_package": f"{name}TextEncoder.mlpackage",
    }
    _save(image, output / packages["image_package"])

    text_program = coreml_lit.build_text_program(text_w, net.config.text, _opset(options))
    text = convert_program(text_program, options, None)
    text.author, text.license, text.version = image.author, image.license, image.version
    text.short_description = (
        f"AIMv2 LiT text encoder ({facts['source_model']}): token ids to a {projection}-d embedding."
    )
    length = net.config.text.max_position_embeddings
    text.user_defined_metadata.update(_strings({**facts, "context_length": length}))
    text.input_description["input_ids"] = f"(1, {length}) int32 CLIP BPE ids, padded with the pad id"
    text.output_description["text_embeds"] = f"(1, {projection}) float32, L2-normalised (shared space)"
    _save(text, output / packages["text_package"])

    if labels is not None:
        from aim_mlx.tasks.zeroshot import DEFAULT_TEMPLATE, check_labels, encode_prompts

        labels = check_labels(labels)
        emb = encode_prompts(net, processor, labels, [DEFAULT_TEMPLATE])  # (L, P), MLX float32
        table = {"labels": labels, "template": DEFAULT_TEMPLATE, "embeddings": emb.round(6).tolist()}
        (output / "label_embeddings.json").write_text(json.dumps(table))
        scale = float(np.array(net.logit_scale))
        pool = coreml_lit.label_probabilities(image_w, heads, emb, scale)
        classifier = classifier_model(image_program(pool, False), labels, options, size, facts)
        classifier.short_description = (
            f"AIMv2 LiT zero-shot classifier ({facts['source_model']}): a {size}x{size} image to one of "
            f"{len(labels)} labels (prompt {DEFAULT_TEMPLATE!r})."
        )
        packages["classifier_package"] = f"{name}Classifier.mlpackage"
        _save(classifier, output / packages["classifier_package"])

    copied = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not copied:
        raise AimMlxError(f"{folder} has no tokenizer files to ship with the text package")
    (output / "tokenizer").mkdir()
    for file in copied:
        shutil.copyfile(folder / file, output / "tokenizer" / file)
    lit = {
        **packages,
        "logit_scale": float(np.array(net.logit_scale)),
        "context_length": int(length),
        "bos_token_id": int(net.tokenizer.bos_id),
        "eos_token_id": int(net.tokenizer.eos_id),
        "pad_token_id": int(net.tokenizer.pad_id),
        "tokenizer_files": copied,
        **facts,
    }
    (output / "lit.json").write_text(json.dumps(lit, indent=2))


def classifier_model(program, labels: list[str], options: dict, size: int, facts: dict):
    """A Core ML image classifier: `program` maps the image (options' input kind) to (1, L) probabilities, its
    one output, in the order of `labels`. Core ML's ClassifierConfig adds the outputs `classLabel` (the most
    probable label) and `classLabel_probs` (label -> probability): what Vision's VNCoreMLRequest returns as
    VNClassificationObservations. Any classifier program can come here (AIMv1's ImageNet heads too)."""
    mlmodel = convert_program(program, options, size, labels=labels)
    describe(mlmodel, {**facts, "labels": len(labels)}, options["input_kind"], size, None)
    mlmodel.short_description = (
        f"Image classifier ({facts['source_model']}): a {size}x{size} image to one of {len(labels)} labels."
    )
    mlmodel.output_description["classLabel"] = "the most probable label"
    mlmodel.output_description["classLabel_probs"] = f"each of the {len(labels)} labels' probability"
    return mlmodel


def _tokens(options: dict) -> bool:
    return options["outputs"] == "pooled,tokens"


def _opset(options: dict):
    return getattr(require("coremltools").target, options["target"])


def convert_program(program, options: dict, size: int | None, labels: list[str] | None = None):
    """ct.convert, then --compress. `size` given: an image model (input per options); None: the text model.
    `labels`: an image classifier whose program outputs their probabilities (see classifier_model)."""
    ct = require("coremltools")
    classifier = None
    if size is None:
        shape = tuple(program.functions["main"].inputs["input_ids"].shape)  # (1, context length)
        inputs = [ct.TensorType(name="input_ids", shape=shape, dtype=np.int32)]
        outputs = [ct.TensorType(name="text_embeds", dtype=np.float32)]
    else:
        shape = (1, 3, size, size)
        if options["input_kind"] == "image":
            inputs = [ct.ImageType(name="image", shape=shape, color_layout=ct.colorlayout.RGB)]
        else:
            inputs = [ct.TensorType(name="pixel_values", shape=shape, dtype=np.float32)]
        names = ["image_embeds"] + (["last_hidden_state"] if _tokens(options) else [])
        outputs = [ct.TensorType(name=n, dtype=np.float32) for n in names]
    if labels is not None:  # the outputs are the classifier's, named by Core ML
        outputs, classifier = None, ct.ClassifierConfig(list(labels))
    mlmodel = ct.convert(
        program,
        inputs=inputs,
        outputs=outputs,
        classifier_config=classifier,
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if options["precision"] == "float16" else ct.precision.FLOAT32,
        minimum_deployment_target=getattr(ct.target, options["target"]),
    )
    return compress_model(mlmodel, options["compress"])


def _save(mlmodel, package: Path) -> None:
    """Save `mlmodel` at `package` (named *.mlpackage) with the user's normal permissions: coremltools copies
    its temporary package there, private modes (0700 folders, 0600 files) included."""
    mlmodel.save(str(package))
    for root, _, names in os.walk(package):
        os.chmod(root, normal_mode(folder=True))
        for name in names:
            os.chmod(os.path.join(root, name), normal_mode())


def _image_size(config, image_size: int | None) -> int:
    if not config.is_native:
        if image_size not in (None, config.image_size):
            raise ConfigError(
                f"--image-size {image_size}: this checkpoint has a learned position table for "
                f"{config.image_size}x{config.image_size} images only; drop --image-size"
            )
        return config.image_size
    size = image_size or 224
    patches = (size // config.patch_size) ** 2
    if size % config.patch_size or not MIN_PATCHES <= patches <= MAX_PATCHES:
        p = config.patch_size
        sides = [k * p for k in range(1, math.isqrt(MAX_PATCHES) + 1) if k * k >= MIN_PATCHES]
        raise ConfigError(
            f"--image-size {size}: the native checkpoint takes multiples of {p} with "
            f"{MIN_PATCHES}-{MAX_PATCHES} patches, i.e. {sides[0]} to {sides[-1]} (e.g. 224, 336, 448)"
        )
    return size


def _strings(facts: dict) -> dict[str, str]:
    """Core ML's user-defined metadata: every value a string, a list as comma-separated numbers."""
    return {k: ",".join(f"{x:.8g}" for x in v) if isinstance(v, list) else str(v) for k, v in facts.items()}


def describe(
    mlmodel, facts: dict, input_kind: str, size: int, embedding_size: int | None, tokens: tuple | None = None
) -> None:
    """Author, license, version, description, input/output descriptions and the user-defined fields.
    `embedding_size`: image_embeds' width (None: no image_embeds output); `tokens`: last_hidden_state's
    (N, D), when the package has that output."""
    meta = _strings(facts)
    mlmodel.author = f"Apple ({meta.get('model_family', 'AIMv2')} weights); Core ML package by aim-mlx"
    mlmodel.license = LICENSE_TEXT.get(meta["license"], meta["license"])
    mlmodel.version = f"{meta['source_revision'][:12]}-aim-mlx{__version__}"
    mlmodel.short_description = (
        f"AIMv2 image encoder ({meta['source_model']}): a {size}x{size} image to a "
        f"{embedding_size}-d embedding."
    )
    mlmodel.user_defined_metadata.update(meta)
    if input_kind == "image":
        resize = facts.get("resize_shortest_edge", size)
        mlmodel.input_description["image"] = (
            f"RGB image, exactly {size}x{size}, values 0-255: resize the shortest side to {resize} (bicubic) "
            f"and centre-crop {size}x{size}; the model normalises with mean {meta['image_mean']} "
            f"and std {meta['image_std']}"
        )
    else:
        mlmodel.input_description["pixel_values"] = (
            f"(1, 3, {size}, {size}) float32, RGB, already scaled to 0-1 and normalised with mean "
            f"{meta['image_mean']} and std {meta['image_std']}"
        )
    if embedding_size is not None:
        mlmodel.output_description["image_embeds"] = f"(1, {embedding_size}) float32: mean-pooled tokens"
    if "last_hidden_state" in mlmodel.output_description:
        n, d = tokens
        mlmodel.output_description["last_hidden_state"] = (
            f"(1, {n}, {d}) float32: the {n} patch tokens after the final RMSNorm, rows outer"
        )
