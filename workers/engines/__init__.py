"""Engines: anything with the Engine protocol's shape (echo, llama.cpp; diffusers later)."""
