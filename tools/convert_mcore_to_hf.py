"""Megatron distributed checkpoint -> HF Qwen2 directory (same as ``megatron-fipo convert --from-mcore``).

Usage: python tools/convert_mcore_to_hf.py MCORE_DIR HF_DIR [--tp N --pp N --dtype bfloat16 --verify]
(under torchrun for tp * pp > 1; the checkpoint may have been saved at any tp / pp).
"""

import sys

from megatron_fipo.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.exit(main(["convert", "--from-mcore", sys.argv[1], "--to-hf", sys.argv[2], *sys.argv[3:]]))
