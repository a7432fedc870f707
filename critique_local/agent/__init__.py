"""Driving ``opencode serve`` headless: its HTTP client, its config, and its events."""
