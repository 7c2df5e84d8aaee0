"""--compress: Core ML's weight compression applied to a converted model (coremltools.optimize.coreml).

int8 is per-channel linear quantization; int4 is per block of 32 input channels, which Core ML has from
macOS15/iOS18; palettizeN replaces each weight by one of 2^N values found by 1-D k-means.

Only weights are compressed: the constants that `linear` ops (and the patch `conv`) take as their weight.
coremltools picks a constant's config from the ops that consume it, so the config is set per op type with no
global one: position tables and the causal mask (consumed by `add`), the token-embedding table (`gather`),
norm weights (`mul`) and the attention-pool query (`matmul`) stay float. Biases are 1-D, which coremltools
never compresses. int4's blocks of 32 input channels do not divide the patch conv's 3: it stays float.
"""

import numpy as np

COMPRESSIONS = ("none", "int8", "int4", "palettize4", "palettize6", "palettize8")
INT4_BLOCK = 32  # int4 scales are per block of 32 input channels (Core ML's per-block mode, iOS18+)


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars: (k centroids, index of each value). Deterministic (quantile start).

    On sorted values every cluster is a contiguous run, so each step is a search and two prefix sums."""
    flat = values.reshape(-1).astype(np.float64)
    ordered = np.sort(flat)
    prefix = np.concatenate([[0.0], np.cumsum(ordered)])
    centroids = np.quantile(ordered, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        edges = np.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2)
        starts, ends = np.r_[0, edges], np.r_[edges, len(ordered)]
        counts = ends - starts
        updated = np.where(counts > 0, (prefix[ends] - prefix[starts]) / np.maximum(counts, 1), centroids)
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    indices = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat)
    return centroids, indices


def _kmeans_lut(nbits: int):
    """A LUT function for `palettize_weights` (mode "custom"): coremltools' own k-means mode needs
    scikit-learn, or kmeans1d with float16 weights only."""

    def lut_function(weight: np.ndarray):
        centroids, indices = kmeans_1d(weight, 1 << nbits)
        return centroids.astype(weight.dtype), indices.astype(np.uint8)

    return lut_function


def compress_model(mlmodel, compress: str):
    """`mlmodel` with its weights compressed as `compress` (one of COMPRESSIONS) says."""
    if compress == "none":
        return mlmodel
    import coremltools.optimize.coreml as cto

    if compress in ("int8", "int4"):
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric",
            dtype=compress,
            granularity="per_channel" if compress == "int8" else "per_block",
            **({"block_size": INT4_BLOCK} if compress == "int4" else {}),
        )
        return cto.linear_quantize_weights(mlmodel, weights_only(cto, op, conv=compress != "int4"))
    nbits = int(compress.removeprefix("palettize"))
    op = cto.OpPalettizerConfig(mode="custom", lut_function=_kmeans_lut(nbits))
    return cto.palettize_weights(mlmodel, weights_only(cto, op, conv=True))


def weights_only(cto, op, conv: bool):
    """An OptimizationConfig that compresses the weights of `linear` ops (and of `conv` ops if `conv`) and
    nothing else: no global config, so every other op's constants stay float."""
    return cto.OptimizationConfig(op_type_configs={"linear": op, "conv": op if conv else None})
