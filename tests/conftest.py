import pathlib
import sys

# The scripts and flow.py live at the repository root, as in CleanRL; make them importable from tests/.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
