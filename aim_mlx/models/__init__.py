"""MLX ports of the AIM encoders. Model modules import only mlx and aim_mlx.models.config."""
