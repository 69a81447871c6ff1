"""``headrace bench``: reproducible measurements of the pipeline and the edge on this machine."""
