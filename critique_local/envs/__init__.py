"""Environments (issue 16): a repository's ``.critique/setup.sh`` runs once per environment and
later runs start from what it produced; ``.critique/start.sh`` runs at every sandbox start.
``spec`` (what an environment is, its key), ``scripts`` (running them in a sandbox), ``builder``
(build once, reuse, evict), ``evict`` (the eviction rule); ``critique-local envs`` is ``cli/envs.py``."""
