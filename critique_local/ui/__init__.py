"""The web page for runs (``/ui/``): see ``web.py``."""
