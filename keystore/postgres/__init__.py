"""The PostgreSQL backend of the keystore, for clusters of hosts sharing one database.

Selected by `--db postgresql://...` / `VMSHIELD_DB=postgresql://...`; SQLite stays the
embedded default. See docs/keystore.md ("PostgreSQL").
"""
