"""HF Qwen2 directory -> Megatron distributed checkpoint (same as ``megatron-fipo convert --from-hf``).

Usage: python tools/convert_hf_to_mcore.py HF_DIR MCORE_DIR [--tp N --pp N --verify]
(under torchrun for tp * pp > 1).
"""

import sys

from megatron_fipo.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.exit(main(["convert", "--from-hf", sys.argv[1], "--to-mcore", sys.argv[2], *sys.argv[3:]]))
