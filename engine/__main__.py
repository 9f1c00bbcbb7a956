"""``python -m engine ...`` == the ``leanclip`` console script (engine.cli)."""
from engine.cli import main

raise SystemExit(main())
