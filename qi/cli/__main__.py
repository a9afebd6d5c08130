"""``python -m qi.cli``: the ``qi`` command without its console script."""

from qi.cli import main

main()
