"""Sandbox backends behind one small interface (``base.py``); ``factory.py`` picks one from config."""
