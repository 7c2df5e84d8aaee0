"""`python -m aim_mlx`: the `aim-mlx` command, for environments without the script on PATH."""

from .cli import main

if __name__ == "__main__":
    main()
