"""Run the avr command line as on an install that lacks MODULE (optional dependencies, comma-
separated): importing one fails as it does when it is not installed.

    python tests/support/without_module.py optuna sweep --name S ...
    python tests/support/without_module.py optuna,faiss,h5py train --cache C ...
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    for module in sys.argv[1].split(","):
        sys.modules[module] = None  # `import MODULE` now raises ImportError naming it
    from avr.cli import main

    main(sys.argv[2:])
