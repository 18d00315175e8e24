"""Versioned gRPC APIs of the Gemma 3 services."""
