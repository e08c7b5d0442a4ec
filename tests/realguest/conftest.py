import pathlib
import sys

# The helpers here (debian.py, initramfs.py) are plain modules beside the tests.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
