"""`python -m enginehouse` is the `enginehouse` command."""

from .cli import main

main()
