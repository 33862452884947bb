"""``python -m megatron_fipo ...`` (and ``torchrun -m megatron_fipo ...``) runs the CLI."""

import sys

from megatron_fipo.cli import main

if __name__ == "__main__":
    sys.exit(main())
