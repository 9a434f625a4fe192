"""``python -m s2reg`` runs the command line."""

from .cli import main

main()
