"""Model sources: the built-in zoo, local Hugging Face directories and torch factories."""
