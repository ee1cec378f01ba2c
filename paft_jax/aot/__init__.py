"""Ahead-of-time compilation for TPU topologies and attached devices: per-chip memory before renting a slice."""
