"""Engines: anything with the Engine protocol's shape (echo, llama.cpp, diffusers), and the
optional abilities some of them add (``abilities``)."""
