"""AUTOMATIC1111's web API (``/sdapi/v1``): request and response shapes."""
