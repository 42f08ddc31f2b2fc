"""The vmshield keystore: VMs, disks, users, permissions, USB rules and an audit chain.

Layers, bottom up:

- models, errors: plain records and the keystore's errors (derived from the product's one
  hierarchy in ``nbd_plugin.errors``);
- auth, audit: argon2id verifiers with lockout; the hash-chained audit trail;
- repository: the ``Repository`` protocol every backend implements; ``sqlite/``: the embedded
  SQLite backend (connection, schema and migrations, principals, repository, USB rule store);
- services: the workflows (disk create, serve, destroy, jobs) callable without click;
- cli: the thin ``vmshield`` command tree over the services.

Nothing stored here decrypts a disk: passwords are argon2id verifiers; a user's password is
the passphrase of their LUKS keyslot, and only the keyslot decrypts.
"""
