"""The Ollama backend: the server's API through the official client, and its registry."""
