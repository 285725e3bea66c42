"""Your own model and task: a small CNN on scikit-learn's bundled handwritten digits (no download)."""
