"""Embedding requests and answers in the OpenAI, llama.cpp and Ollama shapes."""
