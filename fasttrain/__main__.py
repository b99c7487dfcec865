"""`python -m fasttrain COMMAND ...`, the same as the `fasttrain` command."""

from fasttrain.cli import console

console()
