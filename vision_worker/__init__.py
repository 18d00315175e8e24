"""The vision worker: SigLIP + projector behind a content-addressed Redis cache."""
