"""Tooling for a real multi-site ColD Fusion deployment (see the README, "Multi-site deployment")."""
