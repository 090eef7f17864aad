"""Backbones, the momentum-encoder/queue machinery and the contrastive objectives."""
