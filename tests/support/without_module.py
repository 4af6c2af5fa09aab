"""Run the avr command line as on an install that lacks MODULE (an optional dependency):
importing it fails as it does when it is not installed.

    python tests/support/without_module.py optuna sweep --name S ...
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    sys.modules[sys.argv[1]] = None  # `import MODULE` now raises ImportError naming it
    from avr.cli import main

    main(sys.argv[2:])
