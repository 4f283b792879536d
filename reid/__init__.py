"""reid: photo-identification of individual whales and dolphins."""

__version__ = "0.1.0"
