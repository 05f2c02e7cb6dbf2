"""``python -m ptft_dist.dist`` (and ``python ptft_dist/dist/__main__.py`` for launchers that cannot run ``-m``)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the checkout importable, and not this folder's modules
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p != here]
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ptft_dist.dist.discover import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
