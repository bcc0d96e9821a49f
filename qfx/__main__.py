"""``python -m qfx``: the command line (:mod:`qfx.cli`)."""
from qfx.cli import main

raise SystemExit(main())
