"""ramcli: tag a photo library with the Recognize Anything Model family."""

import os
import sys

__version__ = "0.1.0"

# Apple's MPS backend lacks some operators; with this PyTorch runs them on the CPU instead of
# failing. PyTorch reads it once, when it is imported, so it is set here, before any ramcli
# module imports torch. An explicit setting by the user wins.
if sys.platform == "darwin":
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
