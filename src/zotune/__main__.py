"""``python -m zotune`` (also under ``torchrun``/``accelerate launch``)."""

import sys

from zotune.cli import main

sys.exit(main())
