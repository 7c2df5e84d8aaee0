"""The file names a checkpoint folder is made of (config, weights, tokenizer), for the hub, the weight reader,
conversion and export alike."""

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
# Any one of these makes a folder loadable; the index lists shards named like SHARD_PATTERN.
# (mlx_model.safetensors: Apple's MLX flavour, as a cache filled by ml-aim's MLX backend holds it.)
SAFETENSORS_FILES = ("model.safetensors", "mlx_model.safetensors")
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model-*-of-*.safetensors"
# A text tower's tokenizer (LiT); absent from the vision-only checkpoints.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")
