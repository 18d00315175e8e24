"""The public gateway and its Python client."""
