"""The vmshield keystore: one SQLite file of VMs, disks, users, permissions, USB rules, audit.

Entry points for other components (see docs/keystore.md):

- `keystore.usbrules.load_rules(db, vm)`, `keystore.usbrules.RulesWatcher` — USB whitelist;
- `keystore.audit.append_audit(db, actor, action, vm, detail)`, `keystore.audit.verify(db)`;
- `keystore.sqlite_repo.SqliteRepository` — the async repository (`get_erase_permission`,
  `set_disk_state`, ...), implementing `keystore.repository.Repository`.

Nothing stored here decrypts a disk: passwords are argon2id verifiers; a user's password is
the passphrase of their LUKS keyslot, and only the keyslot decrypts.
"""
