"""``python -m rayvisor ...`` is the ``rayvisor`` command."""

from .cli import main

main()
