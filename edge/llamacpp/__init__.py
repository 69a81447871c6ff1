"""llama.cpp server's (and LLMUnity's) request and response shapes."""
