"""What is PostgreSQL's alone under the one storage layer, for hosts sharing one database
(`--db postgresql://...`); its modules: docs/architecture.md, its use: docs/keystore.md.
"""
