"""Make the collection (through .build/ansible_collections) and the lab importable when pytest
runs this directory directly; `make test` sets the same PYTHONPATH."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT / ".build", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
