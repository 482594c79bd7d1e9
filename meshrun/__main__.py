import sys

from ._cliclient import program  # standard library only: a served command loads nothing of the CLI

sys.exit(program())
