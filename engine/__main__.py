"""``python -m leanclip ...`` == the ``leanclip`` console script (leanclip.cli)."""
from leanclip.cli import main

raise SystemExit(main())
