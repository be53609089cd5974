"""The Hugging Face Llama format: name and layout mapping, export, and weights to start from."""
