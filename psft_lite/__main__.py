"""`python -m psft_lite …` (also how launchers such as torchrun and accelerate start it)."""

from psft_lite.cli import main

main()
