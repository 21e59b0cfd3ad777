"""ramcli: tag a photo library with the Recognize Anything Model family."""

__version__ = "0.1.0"
