"""Verbs over adapters and checkpoints: pure tensor math with IO kept at the edges."""
