"""edgellm: a gRPC edge inference daemon for large language models."""

__version__ = "0.1.0"
