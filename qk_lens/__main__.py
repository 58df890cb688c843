"""``python -m qk_lens ...`` is the ``qk-lens`` command."""

from qk_lens.cli import main

raise SystemExit(main())
