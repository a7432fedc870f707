"""Repositories: name and ref validation, where a repository comes from, and checkouts."""
