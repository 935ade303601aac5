import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# Keep the tiny model's cache inside the test session unless the caller chose one.
os.environ.setdefault("COSMOS3_CACHE", str(Path(__file__).parent.parent / ".pytest_cache" / "cosmos3"))
