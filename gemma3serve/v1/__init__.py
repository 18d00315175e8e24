"""Generated gRPC stubs of protos/gemma3serve/v1 (do not edit)."""
