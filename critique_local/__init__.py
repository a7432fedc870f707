"""critique-local: a self-hosted Coding Agent API over OpenCode in sandboxes."""

__version__ = "0.1.0"
