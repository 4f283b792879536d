"""reid: photo-identification of individual whales and dolphins."""

import os

# albumentations asks PyPI for its latest version at import: no network calls from a pipeline that runs offline
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
