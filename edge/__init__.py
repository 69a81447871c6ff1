"""The HTTP edge: OpenAI, llama.cpp, Ollama and A1111 surfaces over JetStream."""
