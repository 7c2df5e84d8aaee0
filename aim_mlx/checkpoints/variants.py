"""Every published AIM checkpoint as data: architecture, pinned hub revision, preprocessing, license.

AIMv2: the revisions are the ones Apple's ml-aim pins (aim-v2/aim/v2/utils.py): at those commits the hub
repos hold Apple's own weight layout; their `main` branches have since moved to the transformers-native
layout. Both load.

AIMv1: the per-model repos apple/aim-{600M,1B,3B,7B}, which ml-aim loads with
`AIMForImageClassification.from_pretrained` at `main` (it pins no revision, so neither does this table).
Each holds one head, trained on the "best" probe layers its config.json lists, and its weights only as
pytorch_model.bin (huggingface_hub's mixin saved pickles in January 2024): aim-mlx loads the same files
from a folder holding them as model.safetensors.
"""

from dataclasses import dataclass

# size -> (hidden_size, num_attention_heads, intermediate_size, num_hidden_layers)
SIZES = {
    "large": (1024, 8, 2816, 24),
    "huge": (1536, 12, 4096, 24),
    "1B": (2048, 16, 5632, 24),
    "3B": (3072, 24, 8192, 24),
}

# ImageNet-1k top-1 with a frozen trunk and attentive probe, from the AIMv2 paper / model cards.
PUBLISHED_TOP1 = {
    ("large", 224): 86.6,
    ("huge", 224): 87.5,
    ("1B", 224): 88.1,
    ("3B", 224): 88.5,
    ("large", 336): 87.6,
    ("huge", 336): 88.2,
    ("1B", 336): 88.7,
    ("3B", 336): 89.2,
    ("large", 448): 87.9,
    ("huge", 448): 88.6,
    ("1B", 448): 89.0,
    ("3B", 448): 89.5,
}

PINNED_REVISIONS = {
    "aimv2-large-patch14-224": "ac764a25c832c7dc5e11871daa588e98e3cdbfb7",
    "aimv2-huge-patch14-224": "9e0bab0e0abb7b20796d2d0b37f39b7c3b1c1af1",
    "aimv2-1B-patch14-224": "4d24a422f71e87d327d476bc405030fe6593d8b1",
    "aimv2-3B-patch14-224": "df1cbc288096c9742ec8bd6709ff82757972338c",
    "aimv2-large-patch14-336": "639423ae9f07319d24a7fc431b61908110d08d3a",
    "aimv2-huge-patch14-336": "21528bd53a2438a84162e79f1f9a46453b88004c",
    "aimv2-1B-patch14-336": "5a15f23f6757776fdd487283353a018677621939",
    "aimv2-3B-patch14-336": "d1adb39ee92dfd7ecf3114b1ee3aa7e9027ce98f",
    "aimv2-large-patch14-448": "cefb13f21003bdadba65bfbee956c82b976cd23d",
    "aimv2-huge-patch14-448": "44e6440a24a8ea966ad0deadf5399a22d852bcc0",
    "aimv2-1B-patch14-448": "7f292735d3a07a911559c0fabb3ad3e9d141713f",
    "aimv2-3B-patch14-448": "70810b618e4456b724bacc8ef4d2d038060ceda6",
    "aimv2-large-patch14-224-distilled": "d6d09b071e8ba31735c5e05ccd4b2a393020ce90",
    "aimv2-large-patch14-336-distilled": "8fe1704e5cc1c80cefc99c194afcefe21dff1faa",
    "aimv2-large-patch14-native": "cfe7bdbbc924a5f65272d5e2c27fe5f61771a629",
    "aimv2-large-patch14-224-lit": "c2cd59a786c4c06f39d199c50d08cc2eab9f8605",
}

LICENSE = "apple-amlr"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "resample": 3,
    "do_center_crop": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(CLIP_MEAN),
    "image_std": list(CLIP_STD),
    "do_convert_rgb": True,
}
DEFAULT_MODEL = "apple/aimv2-large-patch14-224"
DEFAULT_TEXT_MODEL = "apple/aimv2-large-patch14-224-lit"  # the one checkpoint with a text tower


# AIMv1: size -> (hidden_size, num_attention_heads, intermediate_size, num_hidden_layers), the MLP 4 D.
AIMV1_SIZES = {
    "600M": (1536, 12, 6144, 24),
    "1B": (2048, 16, 8192, 24),
    "3B": (3072, 24, 12288, 24),
    "7B": (4096, 32, 16384, 32),
}
# The blocks (0-based) ml-aim's "best" heads read (aim-v1/aim/v1/constants.py, LAYERS_BEST); "last" is the
# last six. ImageNet-1k top-1 of each head, from ml-aim's README.
AIMV1_BEST_LAYERS = {
    "600M": (14, 15, 16, 17, 18, 19),
    "1B": (12, 13, 14, 15, 16, 17),
    "3B": (12, 13, 14, 15, 16, 17),
    "7B": (14, 15, 16, 17, 18, 19),
}
AIMV1_TOP1 = {"600M": (79.4, 78.5), "1B": (82.3, 80.6), "3B": (83.3, 82.2), "7B": (84.0, 82.4)}  # best, last
AIMV1_NAMES = {  # ml-aim's architecture names (load_pretrained), accepted as model ids
    "aim-600M-2B-imgs": "600M",
    "aim-1B-5B-imgs": "1B",
    "aim-3B-5B-imgs": "3B",
    "aim-7B-5B-imgs": "7B",
}
PROBES = ("best", "last")

# The combined repo apple/AIM: each model as torch pickles of state dicts, a backbone and one head per probe
# set, merged without overlap (ml-aim's load_pretrained). ml-aim pins no revision for it either.
AIMV1_COMBINED_REPO = "apple/AIM"
AIMV1_FILE_STEMS = {
    "600M": "aim_600m_2bimgs",
    "1B": "aim_1b_5bimgs",
    "3B": "aim_3b_5bimgs",
    "7B": "aim_7b_5bimgs",
}
# The SHA-256 prefixes ml-aim's README (aim-v1/README.md, "Pre-trained checkpoints") publishes for each file.
AIMV1_SHA256 = {
    "aim_600m_2bimgs_attnprobe_backbone.pth": "0d6f6b8f",
    "aim_600m_2bimgs_attnprobe_head_last_layers.pth": "5ce5a341",
    "aim_600m_2bimgs_attnprobe_head_best_layers.pth": "ebd45c05",
    "aim_1b_5bimgs_attnprobe_backbone.pth": "d254ecd3",
    "aim_1b_5bimgs_attnprobe_head_last_layers.pth": "db3be2ad",
    "aim_1b_5bimgs_attnprobe_head_best_layers.pth": "f1ed7852",
    "aim_3b_5bimgs_attnprobe_backbone.pth": "8475ce4e",
    "aim_3b_5bimgs_attnprobe_head_last_layers.pth": "5c057b30",
    "aim_3b_5bimgs_attnprobe_head_best_layers.pth": "ad380e16",
    "aim_7b_5bimgs_attnprobe_backbone.pth": "184ed94c",
    "aim_7b_5bimgs_attnprobe_head_last_layers.pth": "1e5c99ba",
    "aim_7b_5bimgs_attnprobe_head_best_layers.pth": "73ecd732",
}


def aimv1_pth_files(size: str, probe: str) -> tuple[str, str]:
    """The combined repo's (backbone, head) file names for an AIMv1 `size` and probe set."""
    stem = f"{AIMV1_FILE_STEMS[size]}_attnprobe"
    return f"{stem}_backbone.pth", f"{stem}_head_{probe}_layers.pth"


def aimv1_probe_layers(size: str, probe: str) -> tuple[int, ...]:
    """The blocks an AIMv1 head of `size` reads for probe "best" or "last"."""
    if probe == "best":
        return AIMV1_BEST_LAYERS[size]
    layers = AIMV1_SIZES[size][3]
    return tuple(range(layers - 6, layers))


def aimv1_size(hidden_size: int, num_hidden_layers: int) -> str | None:
    """The published AIMv1 size with these dimensions, or None."""
    for size, (hidden, _, _, layers) in AIMV1_SIZES.items():
        if (hidden, layers) == (hidden_size, num_hidden_layers):
            return size
    return None


# The LiT text tower as published: (hidden_size, intermediate_size, num_hidden_layers, vocab_size).
LIT_TEXT = (768, 2048, 12, 49408)


@dataclass(frozen=True)
class Variant:
    repo_id: str
    family: str  # the model family aim_mlx.registry builds it with: "aimv2", "aimv2-lit" or "aimv1"
    size: str  # large, huge, 1B or 3B (SIZES); AIMv1: 600M, 1B, 3B or 7B (AIMV1_SIZES)
    image_size: int | None  # None: native resolution (any grid of 112-4096 patches)
    revision: str
    distilled: bool = False
    license: str = LICENSE
    pickled: bool = False  # the repo holds its weights only as pytorch_model.bin (the AIMv1 repos)

    @property
    def lit(self) -> bool:
        return self.family == "aimv2-lit"

    @property
    def dims(self) -> tuple[int, int, int, int]:
        return AIMV1_SIZES[self.size] if self.family == "aimv1" else SIZES[self.size]

    @property
    def num_params(self) -> int:
        """Weights in the Linear layers that dominate the count (attention, SwiGLU or AIMv1's two-matrix MLP;
        LiT: the text tower and its token embedding too), for model tables."""
        hidden, _, mlp, layers = self.dims
        params = layers * (4 * hidden * hidden + (2 if self.family == "aimv1" else 3) * hidden * mlp)
        if self.lit:
            width, text_mlp, text_layers, vocab = LIT_TEXT
            params += text_layers * (4 * width * width + 3 * width * text_mlp) + vocab * width
        return params

    @property
    def published_top1(self) -> float | None:
        if self.family == "aimv1":
            return AIMV1_TOP1[self.size][0]  # the best-layers head the hub repo holds
        if self.lit:
            return 77.0  # zero-shot
        if self.image_size is None:
            return 87.3
        if self.distilled:
            return None
        return PUBLISHED_TOP1[(self.size, self.image_size)]

    def config_dict(self) -> dict:
        """The architecture as config.json keys (for building a model when a folder's config is partial)."""
        hidden, heads, mlp, layers = self.dims
        if self.family == "aimv1":  # ml-aim's keys
            return {
                "img_size": 224,
                "patch_size": 14,
                "embed_dim": hidden,
                "num_blocks": layers,
                "num_heads": heads,
                "probe_layers": list(AIMV1_BEST_LAYERS[self.size]),
            }
        return {
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "intermediate_size": mlp,
            "num_hidden_layers": layers,
            "patch_size": 14,
            "image_size": self.image_size or 224,
            "is_native": self.image_size is None,
        }

    def preprocessor_config(self) -> dict:
        """The published preprocessor_config.json (CLIP-style), for folders that lack one. (AIMv1 repos have
        none: their processor is ml-aim's val_transforms, built by the registry.)"""
        if self.image_size is None:  # native: no resize and no crop; see preprocess.native_size
            return {**CLIP_PREPROCESSOR, "do_resize": False, "do_center_crop": False}
        size = self.image_size
        return {
            **CLIP_PREPROCESSOR,
            "size": {"shortest_edge": size},
            "crop_size": {"height": size, "width": size},
        }


def _variant(name: str, revision: str) -> Variant:
    parts = name.split("-")  # aimv2-{family}-patch14-{size}[-distilled|-lit]
    size = parts[3]
    return Variant(
        repo_id=f"apple/{name}",
        family="aimv2-lit" if name.endswith("-lit") else "aimv2",
        size=parts[1],
        image_size=None if size == "native" else int(size),
        revision=revision,
        distilled=name.endswith("-distilled"),
    )


VARIANTS = {f"apple/{name}": _variant(name, rev) for name, rev in PINNED_REVISIONS.items()}
VARIANTS.update(
    (f"apple/aim-{size}", Variant(f"apple/aim-{size}", "aimv1", size, 224, "main", pickled=True))
    for size in AIMV1_SIZES
)


def find_variant(model_id: str) -> Variant | None:
    """The variant for a hub id, with or without the `apple/` prefix, case-insensitively; ml-aim's AIMv1
    names (aim-600M-2B-imgs, ...) too."""
    for name, size in AIMV1_NAMES.items():
        if model_id.lower() == name.lower():
            return VARIANTS[f"apple/aim-{size}"]
    key = model_id if "/" in model_id else f"apple/{model_id}"
    for repo_id, variant in VARIANTS.items():
        if repo_id.lower() == key.lower():
            return variant
    return None
