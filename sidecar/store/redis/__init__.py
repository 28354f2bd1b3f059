"""The Redis implementation of the store port."""
