"""Recipes: schema, embedded data and models, and the runner."""
