"""`python -m editlab.cli ...`, the same as the `editlab` command."""

from . import main

main()
