"""Leaving psft-lite: the exact merge, the GGUF writer, its check in llama.cpp, and the Ollama Modelfile."""
