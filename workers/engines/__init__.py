"""Engines: anything with the Engine protocol's shape (echo here; llama.cpp and diffusers later)."""
