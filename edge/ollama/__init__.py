"""Ollama's request and response shapes."""
