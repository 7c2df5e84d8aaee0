"""Checks of saved Core ML packages against the MLX model they were exported from, on real photos.

Encoders, LiT text packages and classifiers are compared with MLX float32 within bounds set per precision and
compression. Where Core ML cannot run (Linux), the outputs come from evaluator.py, the numpy evaluator of the
program as written; on macOS each check also runs `MLModel.predict` and a CPU_AND_NE prediction, whose op
placement placement.py reads.
"""

import json
import logging
import sys
from pathlib import Path

import numpy as np

from aim_mlx.extras import require

from .evaluator import classifier_classes, classifier_logits, load_program, run_program
from .placement import neural_engine_run, placement_line

logger = logging.getLogger("aim_mlx")

# (precision, compression) -> the bound each package must meet on real photos against MLX float32.
# float32: max |error| / max |reference| over every output; the others: the lowest per-image cosine of
# `image_embeds`. 4-bit bounds are this project's own choice (the issue sets none): they catch a wrong
# dequantization, which gives cosines near 0, while allowing 4-bit rounding.
# A package with tokens (`last_hidden_state`) must also meet the cosine bound with its lowest per-token
# cosine. Measured on the tiny random-weight checkpoints of tests/ (and the same with activations in the
# thousands), the per-token minimum sits at most 1e-3 below the pooled cosine (float16 >= 0.9999995, int8
# 0.99996, palettize6 0.9990 against a pooled 0.9992, palettize4 0.9925 against 0.9935), so one bound serves
# both; a full-size model has not been measured on the evaluator.
MAX_REL_ERROR_FP32 = 1e-4
MIN_COSINE = {"none": 0.999, "int8": 0.995, "palettize8": 0.995, "palettize6": 0.99, "int4": 0.95}
MIN_COSINE_DEFAULT = 0.9  # palettize4


def photos() -> list:
    """Real photos from scikit-image's data module (no download)."""
    require("skimage")
    from PIL import Image
    from skimage import data

    return [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket")]


def tolerance(precision: str, compression: str) -> tuple[str, float]:
    """(metric, bound) for a package: ('max_rel_error', upper bound) or ('cosine', lower bound)."""
    if precision == "float32" and compression == "none":
        return "max_rel_error", MAX_REL_ERROR_FP32
    return "cosine", MIN_COSINE.get(compression, MIN_COSINE_DEFAULT)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def check_package(package: str | Path, model, images=None) -> dict:
    """Compare a package's outputs (numpy evaluator; on macOS also MLModel.predict) with `model`, the MLX
    float32 encoder it was exported from, on real photos. Returns the figures and whether they pass."""
    import mlx.core as mx

    from aim_mlx.inputs.preprocess import ImageProcessor

    spec, program = load_program(package)
    meta = dict(spec.description.metadata.userDefined)
    size = int(meta["image_size"])
    mean = tuple(float(v) for v in meta["image_mean"].split(","))
    std = tuple(float(v) for v in meta["image_std"].split(","))
    processor = ImageProcessor.clip(size)
    processor.image_mean, processor.image_std = mean, std
    images = photos() if images is None else images
    raw = np.stack([processor.center_crop(np.asarray(processor.resize(im.convert("RGB")))) for im in images])
    pixels = np.stack([processor.preprocess_one(im) for im in images])  # (B, S, S, 3), what MLX sees
    x = mx.array(pixels)
    reference = {  # the model interface (aim_mlx/registry.py): LiT's encode_image is its image-text space
        "image_embeds": np.array(model.encode_image(x), np.float32),
        "last_hidden_state": np.array(model.forward_intermediates(x, indices=[-1], norm=True)[0], np.float32),
    }
    main_input = next(iter(program.functions["main"].inputs))
    feed = raw if main_input == "image" else pixels
    got = [run_program(program, {main_input: f.transpose(2, 0, 1)[None].astype(np.float32)}) for f in feed]
    figures = _compare(got, reference)
    metric, bound = tolerance(meta.get("precision", "float16"), meta.get("compression", "none"))
    value = figures[metric]
    tokens = (
        f", tokens {figures['tokens_cosine']:.6g}"
        if metric == "cosine" and "tokens_cosine" in figures
        else ""
    )
    report = {
        **figures,
        "metric": metric,
        "bound": bound,
        "passed": _passes(figures, metric, bound),
        "images": len(images),
        "summary": f"{metric} {value:.3g}{tokens} ({'<=' if metric == 'max_rel_error' else '>='} {bound} "
        f"needed) on {len(images)} photos",
        "predict": "skipped: Core ML predicts only on macOS",
    }
    problem = input_problem(spec, meta)
    if problem:
        report.update(passed=False, summary=problem)
    if sys.platform == "darwin":
        mlmodel, feeds = _mac_feeds(package, main_input, raw, pixels)
        predicted = _compare([mlmodel.predict(f) for f in feeds], reference)
        report["predict"] = predicted
        report["passed"] = report["passed"] and _passes(predicted, metric, bound)
        report["summary"] += f"; MLModel.predict {metric} {predicted[metric]:.3g}"
        # Not run on this project's machines (Linux): written to coremltools' documented API, untested.
        outputs, devices = neural_engine_run(package, feeds)
        report["predict_cpu_and_ne"] = _compare(outputs, reference)
        report["placement"] = devices
        report["passed"] = report["passed"] and _passes(report["predict_cpu_and_ne"], metric, bound)
        report["summary"] += (
            f"; CPU_AND_NE {metric} {report['predict_cpu_and_ne'][metric]:.3g}; {placement_line(devices)}"
        )
    logger.info("checked %s: %s", package, report["summary"])
    return report


def check_text_package(package: str | Path, model, texts: list[str]) -> dict:
    """A LiT text package (numpy evaluator; on macOS also MLModel.predict) against `model.encode_text`."""
    spec, program = load_program(package)
    meta = dict(spec.description.metadata.userDefined)
    ids = np.asarray(model.tokenizer(texts), np.int32)  # (B, 77), padded with the end-of-text id
    reference = np.array(model.encode_text(ids), np.float32)
    got = np.concatenate([run_program(program, {"input_ids": row[None]})["text_embeds"] for row in ids])
    figures = _compare([{"image_embeds": got}], {"image_embeds": reference})
    metric, bound = tolerance(meta.get("precision", "float16"), meta.get("compression", "none"))
    value = figures[metric]
    passed = value <= bound if metric == "max_rel_error" else value >= bound
    report = {**figures, "metric": metric, "bound": bound, "passed": bool(passed), "texts": len(texts)}
    report["summary"] = f"{metric} {value:.3g} on {len(texts)} texts"
    if sys.platform == "darwin":
        import coremltools as ct

        mlmodel = ct.models.MLModel(str(package))
        predicted = np.concatenate([mlmodel.predict({"input_ids": row[None]})["text_embeds"] for row in ids])
        report["predict"] = _compare([{"image_embeds": predicted}], {"image_embeds": reference})
        ok = (
            report["predict"][metric] <= bound
            if metric == "max_rel_error"
            else report["predict"][metric] >= bound
        )
        report["passed"] = bool(passed and ok)
        # Not run on this project's machines (Linux), as in check_package.
        outputs, devices = neural_engine_run(package, [{"input_ids": row[None]} for row in ids])
        got_ne = np.concatenate([o["text_embeds"] for o in outputs])
        report["predict_cpu_and_ne"] = _compare([{"image_embeds": got_ne}], {"image_embeds": reference})
        report["placement"] = devices
        report["passed"] = report["passed"] and _passes(report["predict_cpu_and_ne"], metric, bound)
        report["summary"] += f"; CPU_AND_NE {metric} {report['predict_cpu_and_ne'][metric]:.3g}; " + (
            placement_line(devices)
        )
    return report


def _passes(figures: dict, metric: str, bound: float) -> bool:
    """float32: max |error| over every output; otherwise the pooled cosine and, where the package has
    tokens, their lowest per-token cosine (see MIN_COSINE)."""
    if metric == "max_rel_error":
        return bool(figures[metric] <= bound)
    return bool(figures["cosine"] >= bound and figures.get("tokens_cosine", bound) >= bound)


def input_problem(spec, meta: dict) -> str | None:
    """One line saying how the package's input description disagrees with its metadata, or None: an image
    package takes one RGB image of exactly image_size x image_size, a tensor package (1, 3, S, S)."""
    from coremltools.proto import FeatureTypes_pb2

    size = int(meta["image_size"])
    if len(spec.description.input) != 1:
        return f"the package has {len(spec.description.input)} inputs; an image encoder takes one"
    (feature,) = spec.description.input
    kind = feature.type.WhichOneof("Type")
    if meta.get("input", "image") == "image":
        if kind != "imageType":
            return f"input {feature.name!r} is a {kind}, but the metadata says the package takes an image"
        image = feature.type.imageType
        space = FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(image.colorSpace)
        if space != "RGB":
            return f"input {feature.name!r} has colour layout {space}; the model expects RGB"
        if (image.width, image.height) != (size, size):
            return f"input {feature.name!r} is {image.width}x{image.height}; the metadata says {size}x{size}"
        return None
    if kind != "multiArrayType":
        return f"input {feature.name!r} is a {kind}, but the metadata says the package takes a tensor"
    shape = list(feature.type.multiArrayType.shape)
    if shape != [1, 3, size, size]:
        return f"input {feature.name!r} has shape {shape}; the metadata says (1, 3, {size}, {size})"
    return None


def _compare(outputs: list[dict], reference: dict) -> dict:
    """Lowest per-image cosine of image_embeds, lowest per-token cosine of last_hidden_state (when there)
    and max |error| / max |reference| over the outputs given."""
    embeds = np.concatenate([o["image_embeds"] for o in outputs]).astype(np.float32)
    figures = {"cosine": float(_cosines(embeds, reference["image_embeds"]).min())}
    if "last_hidden_state" in outputs[0]:
        tokens = np.concatenate([np.asarray(o["last_hidden_state"], np.float32) for o in outputs])
        d = tokens.shape[-1]
        figures["tokens_cosine"] = float(
            _cosines(tokens.reshape(-1, d), reference["last_hidden_state"].reshape(-1, d)).min()
        )
    errors = []
    for name in ("image_embeds", "last_hidden_state"):
        if name in outputs[0]:
            got = np.concatenate([np.asarray(o[name], np.float32) for o in outputs])
            errors.append(np.abs(got - reference[name]).max() / np.abs(reference[name]).max())
    figures["max_rel_error"] = float(max(errors))
    return figures


def check_lit(folder: str | Path, net, texts=("a photo of a cat", "a photo of a rocket", "coffee")) -> dict:
    """A LiT export folder against MLX: its image package on photos, its text package on prompts. The
    package names come from the folder's lit.json, as an app would read them."""
    folder = Path(folder)
    facts = json.loads((folder / "lit.json").read_text())
    image = check_package(folder / facts["image_package"], net)
    text = check_text_package(folder / facts["text_package"], net, list(texts))
    report = {
        "passed": image["passed"] and text["passed"],
        "image": image,
        "text": text,
        "summary": f"image: {image['summary']}; text: {text['summary']}",
        "predict": image["predict"],
    }
    if "classifier_package" in facts:  # with --labels; the labels and prompt are in label_embeddings.json
        table = json.loads((folder / "label_embeddings.json").read_text())
        classifier = check_classifier(
            folder / facts["classifier_package"], net, table["labels"], table["template"]
        )
        report["classifier"] = classifier
        report["passed"] = report["passed"] and classifier["passed"]
        report["summary"] += f"; classifier: {classifier['summary']}"
    return report


# (precision, compression) -> the largest |probability difference| a classifier package may show against
# MLX float32 zero-shot on the photos. This project's choice, like the 4-bit cosines: float32 must agree to
# float32 rounding; float16 and 8-bit within a few hundredths; the 4-bit bound only catches broken weights.
# With every probability within b, the top label can differ from MLX's only where its top two are within 2b.
MAX_PROB_ERROR_FP32 = 1e-4
MAX_PROB_ERROR = {"none": 0.01, "int8": 0.03, "palettize8": 0.03, "palettize6": 0.05}
MAX_PROB_ERROR_DEFAULT = 0.25  # int4, palettize4


def prob_tolerance(precision: str, compression: str) -> float:
    if precision == "float32" and compression == "none":
        return MAX_PROB_ERROR_FP32
    return MAX_PROB_ERROR.get(compression, MAX_PROB_ERROR_DEFAULT)


def _mac_feeds(package, main_input: str, raw, pixels):
    """macOS only: the package as an MLModel, and its inputs for the photos (PIL images, or tensors)."""
    import coremltools as ct
    from PIL import Image

    if main_input == "image":
        feeds = [{"image": Image.fromarray(r)} for r in raw]
    else:
        feeds = [{"pixel_values": p.transpose(2, 0, 1)[None]} for p in pixels]
    return ct.models.MLModel(str(package)), feeds


def check_classifier(package: str | Path, model, labels: list[str], template: str, images=None) -> dict:
    """A zero-shot classifier package (numpy evaluator; on macOS also MLModel.predict) against MLX's zero-shot
    on real photos: `aim_mlx.tasks.zeroshot.predict` on `model`'s image embeddings and the labels' prompt
    embeddings. Reports each photo's top label from both and the largest probability difference."""
    import mlx.core as mx

    from aim_mlx.tasks.zeroshot import predict

    spec, program = load_program(package)
    meta = dict(spec.description.metadata.userDefined)
    images = photos() if images is None else images
    raw, pixels = _photo_inputs(meta, images)
    image = np.array(model.encode_image(mx.array(pixels)), np.float32)  # (B, P)
    ids = np.asarray(model.tokenizer([template.format(label) for label in labels]), np.int32)
    text = np.array(model.encode_text(ids), np.float32)  # (L, P)
    reference = predict(image, text, labels, float(model.logit_scale), top_k=len(labels))
    main_input = next(iter(program.functions["main"].inputs))
    feed = raw if main_input == "image" else pixels
    got = [run_program(program, {main_input: f.transpose(2, 0, 1)[None].astype(np.float32)}) for f in feed]
    bound = prob_tolerance(meta.get("precision", "float16"), meta.get("compression", "none"))
    report = {**_compare_classes(got, reference, labels), "bound": bound, "images": len(images)}
    report["passed"] = report["max_prob_error"] <= bound
    report["predict"] = "skipped: Core ML predicts only on macOS"
    if sys.platform == "darwin":
        mlmodel, feeds = _mac_feeds(package, main_input, raw, pixels)
        report["predict"] = _compare_classes([mlmodel.predict(f) for f in feeds], reference, labels)
        report["passed"] = bool(report["passed"] and report["predict"]["max_prob_error"] <= bound)
    report["summary"] = (
        f"max |probability error| {report['max_prob_error']:.3g} (<= {bound} needed), top label as MLX's on "
        f"{report['top_agrees']} of {len(images)} photos"
    )
    return report


def _photo_inputs(meta: dict, images) -> tuple[np.ndarray, np.ndarray]:
    """(raw (B, S, S, 3) uint8 resized and cropped: what an `image` input takes; pixels (B, S, S, 3): what MLX
    and a `pixel_values` input take), for the size, mean and std in a package's metadata."""
    from aim_mlx.inputs.preprocess import ImageProcessor

    processor = ImageProcessor.clip(int(meta["image_size"]))
    if "resize_shortest_edge" in meta:  # AIMv1: ml-aim resizes to 256 before the 224 crop
        processor.size = {"shortest_edge": int(meta["resize_shortest_edge"])}
    processor.image_mean = tuple(float(v) for v in meta["image_mean"].split(","))
    processor.image_std = tuple(float(v) for v in meta["image_std"].split(","))
    raw = np.stack([processor.center_crop(np.asarray(processor.resize(im.convert("RGB")))) for im in images])
    return raw, np.stack([processor.preprocess_one(im) for im in images])


def _compare_classes(outputs: list[dict], reference: list, labels: list[str]) -> dict:
    """Classifier outputs (classLabel, classLabel_probs) against zero-shot Predictions of all labels."""
    top = [o["classLabel"] for o in outputs]
    errors = [
        abs(o["classLabel_probs"][label] - p)
        for o, ref in zip(outputs, reference, strict=True)
        for label, p in zip(ref.labels, ref.probs, strict=True)
    ]
    return {
        "top_labels": top,
        "reference_top_labels": [ref.labels[0] for ref in reference],
        "top_agrees": sum(t == ref.labels[0] for t, ref in zip(top, reference, strict=True)),
        "max_prob_error": float(max(errors)),
        "labels": len(labels),
    }


def check_head_classifier(package: str | Path, model, images=None) -> dict:
    """A classifier package exported from a model with a trained head (AIMv1's ImageNet-1k probe) against
    the MLX model's `classify` on real photos, through the numpy evaluator (on macOS also MLModel.predict):
    the package's labels must be the head's (repeated names made distinct: heads.distinct_head_labels), its
    logits (what its softmax takes) within the float32 bound or cosine of MLX's, its probabilities within
    the classifier bound of the softmax of MLX's logits; top-1 and top-5 agreement are reported."""
    import mlx.core as mx

    from aim_mlx.tasks.heads import distinct_head_labels

    spec, program = load_program(package)
    meta = dict(spec.description.metadata.userDefined)
    images = photos() if images is None else images
    raw, pixels = _photo_inputs(meta, images)
    logits = np.array(model.classify(mx.array(pixels)).astype(mx.float32), np.float64)  # (B, classes)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = distinct_head_labels(model)
    main_input = next(iter(program.functions["main"].inputs))
    feed = raw if main_input == "image" else pixels
    name = classifier_logits(program)
    got = [
        run_program(program, {main_input: f.transpose(2, 0, 1)[None].astype(np.float32)}, extra=[name])
        for f in feed
    ]
    precision, compression = meta.get("precision", "float16"), meta.get("compression", "none")
    metric, bound = tolerance(precision, compression)
    prob_bound = prob_tolerance(precision, compression)
    figures = _compare_head(got, name, logits, probs, labels)
    report = {**figures, "metric": metric, "bound": bound, "prob_bound": prob_bound, "images": len(images)}
    report["passed"] = _head_passes(figures, metric, bound, prob_bound)
    report["predict"] = "skipped: Core ML predicts only on macOS"
    if sys.platform == "darwin":  # not run on this project's machines (Linux): no logits from predict
        mlmodel, feeds = _mac_feeds(package, main_input, raw, pixels)
        predicted = _compare_head([mlmodel.predict(f) for f in feeds], None, logits, probs, labels)
        report["predict"] = predicted
        report["passed"] = report["passed"] and _head_passes(predicted, None, bound, prob_bound)
    report["summary"] = (
        f"logits {metric} {figures[metric]:.3g} ({'<=' if metric == 'max_rel_error' else '>='} {bound} "
        f"needed), max |probability error| {figures['max_prob_error']:.3g} (<= {prob_bound}), top-1 as "
        f"MLX's on {figures['top1_agrees']} of {len(images)} photos, top-5 in order on "
        f"{figures['top5_agrees']}"
    )
    if classifier_classes(program) != labels:  # label i must name logit i
        report.update(passed=False, summary="the package's labels are not the head's classes, in order")
    logger.info("checked %s: %s", package, report["summary"])
    return report


def _compare_head(outputs, logits_name, logits, probs, labels) -> dict:
    """A classifier package's outputs against a head's (B, classes) logits and probabilities. Without
    `logits_name` (MLModel.predict gives no logits) only the probabilities and ranks are compared."""
    got = np.array([[o["classLabel_probs"][label] for label in labels] for o in outputs])  # (B, classes)
    order = np.argsort(-probs, axis=1, kind="stable")
    top5 = [[labels[i] for i in row[:5]] for row in order]
    got_top5 = [
        sorted(o["classLabel_probs"], key=o["classLabel_probs"].get, reverse=True)[:5] for o in outputs
    ]
    figures = {
        "top_labels": [o["classLabel"] for o in outputs],
        "reference_top_labels": [row[0] for row in top5],
        "top1_agrees": sum(o["classLabel"] == row[0] for o, row in zip(outputs, top5, strict=True)),
        "top5_agrees": sum(g == row for g, row in zip(got_top5, top5, strict=True)),
        "max_prob_error": float(np.abs(got - probs).max()),
    }
    if logits_name is not None:
        ours = np.concatenate([np.asarray(o[logits_name], np.float64).reshape(1, -1) for o in outputs])
        figures["cosine"] = float(_cosines(ours, logits).min())
        figures["max_rel_error"] = float(np.abs(ours - logits).max() / np.abs(logits).max())
    return figures


def _head_passes(figures: dict, metric: str | None, bound: float, prob_bound: float) -> bool:
    """Probabilities within `prob_bound`; the logits (when there) within the float32 bound or the cosine."""
    if figures["max_prob_error"] > prob_bound:
        return False
    if metric is None:
        return True
    value = figures[metric]
    return bool(value <= bound if metric == "max_rel_error" else value >= bound)
