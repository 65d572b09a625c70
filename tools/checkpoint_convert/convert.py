"""HF <-> Megatron checkpoint conversion; the same code as `dynamo-mega convert` (dynamo_mega/convert/).

python tools/checkpoint_convert/convert.py hf-to-mcore HF_DIR MCORE_DIR --tp 2 --pp 2
python tools/checkpoint_convert/convert.py mcore-to-hf MCORE_DIR HF_OUT
"""

import sys

from dynamo_mega.convert.cli import main

if __name__ == "__main__":  # dist_checkpointing starts a spawn Manager: importers must not re-run this
    sys.exit(main())
