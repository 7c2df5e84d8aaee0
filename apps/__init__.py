"""Applications built on the aim-mlx library, installed as `aim_mlx.apps`: `library` (the photo library:
index, search, duplicates)."""
