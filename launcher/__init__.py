"""The gemma3-stack launcher (see __main__)."""
