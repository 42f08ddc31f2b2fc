"""``python -m scripts.lab.demo``: the walkthrough (scripts/demo runs it after its setup)."""

import sys

from scripts.lab.demo.walkthrough import main

sys.exit(main())
